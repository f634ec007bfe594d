# tarweb.py: developer entry points. Everything except `peerbench` works from a fresh clone.
PYTHON ?= python3
DEMO_HTTP ?= 127.0.0.1:8080
DEMO_HTTPS ?= 127.0.0.1:8443
# `make peerbench` compares tarweb.py with other servers using the shared peer benchmark.
PEERBENCH ?= ../shared/peerbench
PEERS ?= nginx extra
WORKLOADS ?= W1 W2 W3 W4
RUNS ?= 1
# The server's --crypto in `make demo` and `make peerbench`: auto, libcrypto or python.
CRYPTO ?= auto

.PHONY: test test-tls test-secure test-ktls fuzz demo bench bench-quick profile peerbench clean

# Everything with the default crypto backend (TARWEB_TEST_CRYPTO unset: python), then the TLS
# classes again with libcrypto, then the server classes again with --secure.
test:
	$(PYTHON) test_tarweb.py -v
	$(MAKE) --no-print-directory test-tls CRYPTO_BACKENDS=libcrypto
	$(MAKE) --no-print-directory test-secure

# The TLS and HTTPS test classes, once per crypto backend (tarweb.py --crypto, section 6.3). The
# browser classes too (some 15 s a backend): key exchange and session tickets go through the backend.
CRYPTO_BACKENDS ?= python libcrypto
TLS_TESTS ?= TestRFC8448KeySchedule TestMiniHandshake TestTLSServerErrors TestHelloRetryRequest \
	TestTLSServerReceive TestRecordLayerErrors TestRecordLayerInPlace TestSharedRecordLoop \
	TestPythonSSLClient TestOpenSSLClient TestHTTPSPythonSSL TestHTTPSOpenSSL TestHTTPSCertTypes \
	TestCertificatesBySNI TestSessionTickets TestResumption \
	TestHTTPSSelfSignedOption TestHTTPS TestUserspaceSendAreas TestUserspaceRecordBuffer \
	TestHTTPSFewSlots TestHostileTLS TestHandshakeDeadline TestPlainAndTLS TestProxyProtocolTLS \
	TestHAProxy TestTLSStartupErrors \
	TestKTLS TestReloadTLS TestBrowserChromium TestBrowserFirefox
test-tls:
	set -e; for crypto in $(CRYPTO_BACKENDS); do \
	    echo "== TLS tests with TARWEB_TEST_CRYPTO=$$crypto"; \
	    TARWEB_TEST_CRYPTO=$$crypto $(PYTHON) test_tarweb.py -v $(TLS_TESTS); \
	done

# The classes whose servers serve, again with every server sandboxed (--secure, tarweb.py section 8;
# TARWEB_TEST_SECURE=1): a system call missing from the seccomp allow-list, or an operation missing
# from the ring's restrictions, fails them. About 2.5 minutes. (Start-up error classes are left
# out: their servers stop before the sandbox.)
SECURE_TESTS ?= TestArchive TestArchiveNo404AndPrefix TestFormatUstar TestFormatGnu TestFormatPax \
	TestHostileRequests TestConnections TestPrecompressed TestHeaders TestExtraHeaders TestFallback \
	TestHugeNumbers TestAccessLogSafety TestCacheControlAndAccessLog TestMaxConnections \
	TestTimeouts TestLoad TestFloods TestFdLimit TestRelaunch TestSignals TestLogFailures \
	TestSocketActivation TestSdNotify TestUser TestHTTPSPythonSSL TestHTTPSOpenSSL TestResumption \
	TestCertificatesBySNI TestHTTPSCertTypes TestHTTPSSelfSignedOption TestHTTPS \
	TestUserspaceSendAreas TestUserspaceRecordBuffer TestHTTPSFewSlots TestHostileTLS \
	TestHandshakeDeadline TestPlainAndTLS TestTarRewrittenInPlace TestProxyProtocol \
	TestProxyProtocolLimits TestProxyProtocolTLS TestHAProxy TestBrowserChromium TestBrowserFirefox TestKTLS
test-secure:
	TARWEB_TEST_SECURE=1 $(PYTHON) test_tarweb.py -v $(SECURE_TESTS)

# Mutation fuzzing of the HTTP responder and the TLS handshake (test_tarweb.py section 6): a million
# HTTP inputs and 100,000 TLS inputs over FUZZ_JOBS processes; a failure prints its input and how to
# replay it. `make test` runs a short slice of it (TestFuzzSlice).
FUZZ_HTTP ?= 1000000
FUZZ_TLS ?= 100000
FUZZ_SEED ?= 1
FUZZ_JOBS ?= 2
fuzz:
	$(PYTHON) test_tarweb.py fuzz --http $(FUZZ_HTTP) --tls $(FUZZ_TLS) --seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS)

# The kTLS subset (test classes), for a kernel that has kTLS: CI runs it inside ../shared/ktls-vm,
# whose emulated CPU needs ten times the timeouts. It fails unless /proc/net/tls_stat shows the
# kernel carried the traffic. Once per crypto backend: the handshake is theirs, the records the kernel's.
# TARWEB_EXPECT_KTLS_REKEY=1 or 0 from the environment: the kernel must (must not) rekey kTLS on a
# client's KeyUpdate; unset, the kernel's version decides (6.14+ rekeys).
KTLS_TESTS ?= TestKTLS
test-ktls:
	set -e; for crypto in $(CRYPTO_BACKENDS); do \
	    echo "== kTLS tests with TARWEB_TEST_CRYPTO=$$crypto"; \
	    TARWEB_EXPECT_KTLS=1 TARWEB_TEST_TIMEOUT_SCALE=10 TARWEB_TEST_CRYPTO=$$crypto \
	        $(PYTHON) test_tarweb.py -v $(KTLS_TESTS); \
	done

.demo/site.tar: test_tarweb.py
	$(PYTHON) test_tarweb.py demo-site $@

# Serves the demo site until Ctrl-C: HTTPS with a certificate made on the fly, and plain HTTP.
demo: .demo/site.tar
	@echo "try: curl -k https://$(DEMO_HTTPS)/   (self-signed certificate)   or   curl http://$(DEMO_HTTP)/"
	$(PYTHON) tarweb.py .demo/site.tar --listen $(DEMO_HTTP) --tls-listen $(DEMO_HTTPS) --tls-self-signed --crypto $(CRYPTO)

# wrk and ab are installed on demand (Debian, as root); the harness explains what to do otherwise.
bench bench-quick:
	@if ! command -v wrk >/dev/null || ! command -v ab >/dev/null; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk apache2-utils; \
	    fi; \
	fi
	$(PYTHON) test_tarweb.py bench $(if $(filter bench-quick,$@),--quick)

# Where the server's CPU goes under W1 (WORKLOAD=W1b or W2 for the others): a sampling profile.
WORKLOAD ?= W1
profile:
	$(PYTHON) test_tarweb.py profile $(WORKLOAD)

peerbench:
	@test -f $(PEERBENCH)/peerbench.sh || { echo "peerbench: $(PEERBENCH)/peerbench.sh not found (set PEERBENCH=DIR)"; exit 1; }
	PEERS="$(PEERS)" WORKLOADS="$(WORKLOADS)" RUNS="$(RUNS)" PYTHON="$(PYTHON)" \
	EXTRA_SERVER_NAME=tarweb.py \
	EXTRA_SERVER_CMD='$(PYTHON) $(CURDIR)/tarweb.py {tar} --listen {host}:{port} --tls-listen {host}:{tls_port} --tls-cert {cert} --tls-key {key} --crypto $(CRYPTO) -q' \
	bash $(PEERBENCH)/peerbench.sh

clean:
	rm -rf .demo __pycache__ *.pyc
