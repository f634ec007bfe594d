#!/usr/bin/env python3
"""tarweb.py: serve a static website straight out of a tar file, over io_uring.

    python3 tarweb.py site.tar            # http://[::]:8080/

One file, Python standard library only. All socket I/O goes through io_uring (driven with ctypes);
response bodies are sent straight from an mmap of the tar; every connection lives in a slot that
was allocated at start-up.

Contents, in layers (a lower layer never calls a higher one). `grep -n "^# === " tarweb.py`
prints this outline with line numbers; inside a class, `# -- name` lines group its methods.
  1. Kernel ABI (include/uapi/linux/io_uring.h) - syscalls, structs, opcodes, flags
  2. The ring - IoUring: setup with the best flags, mmap'd rings, probe, prep_* helpers
  3. The archive - Archive: the index of the mmap'd tar
  4. HTTP/1.1 - Site: request parsing, conditional and range logic, response heads; the PROXY
     protocol header that a load balancer puts before HTTP or TLS
  5. Crypto primitives (pure Python; see README "Security notes")
     5.1 Curve25519 and X25519 (RFC 7748)
     5.2 Edwards25519 arithmetic (RFC 8032 §5.1)
     5.3 Ed25519 signatures (RFC 8032 §5.1.5-7)
     5.4 P-256 and P-384: point arithmetic (FIPS 186-4)
     5.5 P-256 and P-384: point encodings and checks (SEC 1)
     5.6 P-256 and P-384: keys and ECDH (SEC 1 §3.3.1)
     5.7 ECDSA (FIPS 186-4, RFC 6979)
     5.8 AEAD ciphers; the AES block cipher (FIPS 197)
     5.9 AES-GCM (SP 800-38D)
     5.10 ChaCha20 (RFC 8439)
     5.11 Poly1305 and ChaCha20-Poly1305 (RFC 8439)
     5.12 ML-KEM-768 encapsulation (FIPS 203)
     5.13 PEM (RFC 7468)
     5.14 DER reader (X.690)
     5.15 DER writer
     5.16 RSA-PSS signatures (RFC 8017)
     5.17 Private keys (PKCS#1, SEC 1, PKCS#8, RFC 8410)
     5.18 Certificates (RFC 5280)
     5.19 libcrypto through ctypes (OpenSSL 1.1.1, 3.x)
  6. TLS 1.3: server handshake state machine, record layer, kTLS hand-off
     6.1 HKDF and the key schedule (RFC 5869, RFC 8446 §7)
     6.2 Messages and records (RFC 8446 §4, §5.1, §6)
     6.3 Crypto backends: the primitives behind suites and groups (pure Python, libcrypto)
     6.4 Record protection and the record loop (§5.2-5.4)
     6.5 Userspace record layer for application data
     6.6 ClientHello parsing (§4.1.2, §4.2)
     6.7 Session tickets (§4.6.1, §4.2.11)
     6.8 Server configuration and handshake state machine (§4, Appendix A.2)
     6.9 kTLS hand-off (Linux Documentation/networking/tls.rst)
  7. Connection loop - Server: fixed slots driven by io_uring completions
  8. CLI - argparse, one-line start-up errors, systemd's sockets and notify socket, --user,
     --secure's sandbox (no_new_privs, capabilities, landlock, seccomp), main()
"""

import argparse
import base64
import binascii
import bisect
import collections
import ctypes
import email.utils
import errno
import functools
import gc
import grp
import hashlib
import heapq
import hmac
import ipaddress
import mimetypes
import mmap
import operator
import os
import pwd
import re
import secrets
import signal
import socket
import stat
import struct
import sys
import tarfile
import threading
import time
import traceback
from urllib.parse import quote_from_bytes, unquote_to_bytes

__version__ = "0.1.0"
SERVER = "tarweb.py/" + __version__


class StartupError(Exception):
    """A problem that stops start-up; its text is printed as one line."""


# Bytes that may go into a log line as they are: printable ASCII except the quote and backslash.
_LOG_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def log_escape(data):
    """Bytes (or text) from the wire or the archive -> text that is safe in a log line: every
    control byte, non-ASCII byte, quote and backslash becomes \\xHH, as nginx escapes its
    access log, so no terminal escape, forged line or bidi trick gets through."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return _LOG_UNSAFE.sub(lambda m: b"\\x%02X" % m.group()[0], data).decode("ascii")


# === 1. Kernel ABI (include/uapi/linux/io_uring.h) ================================================

# The io_uring syscalls use the asm-generic numbers on both x86_64 and aarch64.
SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427

c_u32, c_u64 = ctypes.c_uint32, ctypes.c_uint64


class io_sqring_offsets(ctypes.Structure):
    _fields_ = [("head", c_u32), ("tail", c_u32), ("ring_mask", c_u32), ("ring_entries", c_u32),
                ("flags", c_u32), ("dropped", c_u32), ("array", c_u32), ("resv1", c_u32),
                ("user_addr", c_u64)]


class io_cqring_offsets(ctypes.Structure):
    _fields_ = [("head", c_u32), ("tail", c_u32), ("ring_mask", c_u32), ("ring_entries", c_u32),
                ("overflow", c_u32), ("cqes", c_u32), ("flags", c_u32), ("resv1", c_u32),
                ("user_addr", c_u64)]


class io_uring_params(ctypes.Structure):
    _fields_ = [("sq_entries", c_u32), ("cq_entries", c_u32), ("flags", c_u32),
                ("sq_thread_cpu", c_u32), ("sq_thread_idle", c_u32), ("features", c_u32),
                ("wq_fd", c_u32), ("resv", c_u32 * 3),
                ("sq_off", io_sqring_offsets), ("cq_off", io_cqring_offsets)]


# struct io_uring_sqe (64 bytes): opcode u8, flags u8, ioprio u16, fd s32, off u64, addr u64,
# len u32, op_flags u32 (msg_flags, timeout_flags, ...), user_data u64, buf_index u16,
# personality u16, splice_fd_in s32, addr3 u64, pad u64.
io_uring_sqe = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe (16 bytes): user_data u64, res s32, flags u32.
io_uring_cqe = struct.Struct("<QiI")
io_uring_sqe_pair = struct.Struct("<" + "BBHiQQIIQHHiQQ" * 2)  # two adjacent SQEs
assert io_uring_sqe.size == 64 and io_uring_cqe.size == 16

IORING_MAX_ENTRIES = 32768  # the kernel's limit on SQ entries (io_uring/io_uring.c, not uapi)

# mmap offsets of the three ring regions
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# io_uring_setup flags
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_R_DISABLED = 1 << 6  # the ring does nothing until IORING_REGISTER_ENABLE_RINGS
IORING_SETUP_SUBMIT_ALL = 1 << 7
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13

# features reported back in io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_CQE_SKIP = 1 << 11

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0

# io_uring_register opcodes
IORING_REGISTER_PROBE = 8
IORING_REGISTER_RESTRICTIONS = 11
IORING_REGISTER_ENABLE_RINGS = 12
# struct io_uring_restriction {u16 opcode; u8 sqe_op (or register_op, sqe_flags); u8 resv;
# u32 resv2[3]}: what a restricted ring may do; anything else fails with EACCES.
io_uring_restriction = struct.Struct("<HBx12x")
IORING_RESTRICTION_SQE_OP = 1
IORING_RESTRICTION_SQE_FLAGS_ALLOWED = 2
# struct io_uring_probe {u8 last_op, ops_len; u16 resv; u32 resv2[3]} followed by one
# struct io_uring_probe_op {u8 op, resv; u16 flags; u32 resv2} per opcode.
io_uring_probe = struct.Struct("<BBH12x")
io_uring_probe_op = struct.Struct("<BBHI")
IO_URING_OP_SUPPORTED = 1

# opcodes this server uses
IORING_OP_SENDMSG = 9
IORING_OP_RECVMSG = 10
IORING_OP_TIMEOUT = 11
IORING_OP_ACCEPT = 13
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_CLOSE = 19
IORING_OP_STATX = 21
IORING_OP_SEND = 26
IORING_OP_RECV = 27
IORING_OP_SHUTDOWN = 34
REQUIRED_OPS = {"SENDMSG": IORING_OP_SENDMSG, "RECVMSG": IORING_OP_RECVMSG,
                "SEND": IORING_OP_SEND, "TIMEOUT": IORING_OP_TIMEOUT,
                "ACCEPT": IORING_OP_ACCEPT, "ASYNC_CANCEL": IORING_OP_ASYNC_CANCEL,
                "CLOSE": IORING_OP_CLOSE, "RECV": IORING_OP_RECV, "SHUTDOWN": IORING_OP_SHUTDOWN,
                "STATX": IORING_OP_STATX}

# sqe.flags
IOSQE_IO_LINK = 1 << 2
IOSQE_CQE_SKIP_SUCCESS = 1 << 6
USED_SQE_FLAGS = IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS  # all this server sets

# sqe.op_flags (cancel_flags) for IORING_OP_ASYNC_CANCEL (5.19+): every request that matches
IORING_ASYNC_CANCEL_ALL = 1 << 0

# socket constants the kernel ABI fixes on Linux
MSG_WAITALL = 0x100
MSG_NOSIGNAL = 0x4000
SOCK_CLOEXEC = 0o2000000
SHUT_RD, SHUT_WR = 0, 1
SIOCOUTQ = 0x5411           # ioctl: bytes in a TCP socket's send queue, not yet acknowledged
SOCKADDR_STORAGE = 128      # sizeof(struct sockaddr_storage)

# struct __kernel_timespec {s64 tv_sec; s64 tv_nsec}; struct iovec {void *base; size_t len};
# struct msghdr {name, namelen(+pad), iov, iovlen, control, controllen, flags(+pad)} = 56 bytes.
kernel_timespec = struct.Struct("<qq")
iovec2 = struct.Struct("<QQQQ")
msghdr = struct.Struct("<QQQQQQQ")
# statx(2) of an open descriptor: AT_EMPTY_PATH with an empty path. struct statx (256 bytes):
# stx_size u64 at byte 40, stx_mtime {s64 tv_sec, u32 tv_nsec, s32} at byte 112.
AT_EMPTY_PATH = 0x1000
STATX_MTIME, STATX_SIZE = 0x40, 0x200
STATX_BUF_SIZE = 256
statx_size_mtime = struct.Struct("<40xQ64xqI")
# struct cmsghdr {size_t cmsg_len; int cmsg_level; int cmsg_type;} followed by the data.
cmsghdr = struct.Struct("<Qii")
CMSG_SPACE_1 = 24           # CMSG_SPACE(1): header plus one byte, padded to 8
# A kTLS receive: msghdr, then its single iovec, then room for one control message.
recv_area = struct.Struct("<QQQQQQQQQ")
RECV_CMSG_OFF = recv_area.size
RECV_AREA = RECV_CMSG_OFF + CMSG_SPACE_1

# Kernel TLS (include/uapi/linux/tls.h)
TCP_ULP = 31
SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2
TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE = 1, 2
TLS_1_3_VERSION = 0x0304
# struct tls12_crypto_info_aes_gcm_128 {u16 version, cipher_type; u8 iv[8], key[16], salt[4],
# rec_seq[8]}; _aes_gcm_256 the same with key[32]; _chacha20_poly1305 {iv[12], key[32],
# rec_seq[8]}. For GCM the 12-byte TLS IV is split: salt = iv[0:4], iv = iv[4:12].
TLS_CIPHER_AES_GCM_128, TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305 = 51, 52, 54
tls_crypto_info_aes_gcm_128 = struct.Struct("=HH8s16s4s8s")
tls_crypto_info_aes_gcm_256 = struct.Struct("=HH8s32s4s8s")
tls_crypto_info_chacha20_poly1305 = struct.Struct("=HH12s32s8s")

# The sandbox (--secure): include/uapi/linux/{prctl,capability,landlock,seccomp,filter,audit}.h
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
# capset(2): struct __user_cap_header_struct {u32 version; s32 pid}, then version 3's two
# struct __user_cap_data_struct {u32 effective, permitted, inheritable} (64 capabilities).
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
cap_user_header = struct.Struct("<Ii")
CAP_USER_DATA_SIZE = 2 * 12
# Landlock's system calls have the asm-generic numbers on x86_64 and aarch64 alike.
SYS_landlock_create_ruleset = 444
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
# struct landlock_ruleset_attr {u64 handled_access_fs, handled_access_net, scoped}: a kernel
# takes the fields it knows, and zeros in the ones it does not.
landlock_ruleset_attr = struct.Struct("<QQQ")
# Every file-system right of ABI version N: rights 0-12 (LANDLOCK_ACCESS_FS_EXECUTE ... MAKE_SYM)
# since 1, REFER (13) since 2, TRUNCATE (14) since 3, IOCTL_DEV (15) since 5.
LANDLOCK_ACCESS_FS_COUNT = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0      # ABI 4
LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1   # ABI 4
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LANDLOCK_SCOPE_SIGNAL = 1 << 1                # ABI 6
# seccomp(2) and the classic BPF program it takes.
SYS_seccomp = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_LOG = 1 << 1     # denials go to the audit log (dmesg, the journal)
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000       # | errno
SECCOMP_RET_ALLOW = 0x7FFF0000
# struct seccomp_data {s32 nr; u32 arch; u64 instruction_pointer; u64 args[6]}: byte offsets
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARGS = 0, 4, 16
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000         # x86_64's x32 ABI: same arch, other numbers
# struct sock_filter {u16 code; u8 jt, jf; u32 k}; struct sock_fprog {u16 len; sock_filter *}
sock_filter = struct.Struct("<HBBI")
sock_fprog = struct.Struct("<H6xQ")
BPF_LD_W_ABS = 0x20    # BPF_LD | BPF_W | BPF_ABS: A = the u32 at offset k of seccomp_data
BPF_JEQ_K = 0x15       # BPF_JMP | BPF_JEQ | BPF_K: A == k ? jump jt : jump jf
BPF_JGE_K = 0x35       # BPF_JMP | BPF_JGE | BPF_K
BPF_RET_K = 0x06       # BPF_RET | BPF_K: the action k

# Memory ordering. The kernel publishes a CQE with smp_store_release() on the CQ tail and reads
# our SQ tail with smp_load_acquire(). On x86_64 (TSO) plain stores are never reordered with
# other stores nor loads with loads, and CPython executes each pack_into/unpack_from to completion
# in program order, so plain accesses give exactly the release/acquire pairs needed. aarch64 is
# weakly ordered and would need STLR/LDAR, which Python cannot emit. We get the ordering from the
# syscall instead: without SQPOLL the kernel only reads the SQ tail inside io_uring_enter (entry
# is a full barrier), and with DEFER_TASKRUN (Linux 6.1+) every CQE is written inside our own
# io_uring_enter call, before it returns. So on aarch64 use a 6.1+ kernel: with an older one a CQE
# posted concurrently from another CPU could in theory be read before its contents are visible.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint32]
_libc.getpeername.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


ONE = struct.pack("i", 1)  # an int option's value


def setsockopt_fd(fd, level, option, value):
    """setsockopt(2) on a bare descriptor (the ring accepted it; Python has no socket object)."""
    if _libc.setsockopt(fd, level, option, value, len(value)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ktls_crypto_info(suite, key, iv, seq):
    """The TLS_TX/TLS_RX setsockopt value for a TLS 1.3 cipher suite's key, IV and sequence."""
    seq = seq.to_bytes(8, "big")
    if suite == 0x1301:  # TLS_AES_128_GCM_SHA256
        return tls_crypto_info_aes_gcm_128.pack(TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128, iv[4:],
                                                key, iv[:4], seq)
    if suite == 0x1302:  # TLS_AES_256_GCM_SHA384
        return tls_crypto_info_aes_gcm_256.pack(TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_256, iv[4:],
                                                key, iv[:4], seq)
    return tls_crypto_info_chacha20_poly1305.pack(TLS_1_3_VERSION, TLS_CIPHER_CHACHA20_POLY1305,
                                                  iv, key, seq)


def ktls_record_msg(content_type, content):
    """A constant sendmsg for a kTLS socket: one record of content_type (an alert, a handshake
    message) holding content, up to 32 bytes. The record type travels in a TLS_SET_RECORD_TYPE
    control message. Returns (buffer, msghdr address)."""
    buf = mmap.mmap(-1, 128)
    base = buffer_address(buf)
    msghdr.pack_into(buf, 0, 0, 0, base + 56, 1, base + 72, CMSG_SPACE_1, 0)
    struct.pack_into("<QQ", buf, 56, base + 96, len(content))
    cmsghdr.pack_into(buf, 72, cmsghdr.size + 1, SOL_TLS, TLS_SET_RECORD_TYPE)
    buf[88] = content_type
    buf[96:96 + len(content)] = content
    return buf, base


def sys_io_uring_enter(fd, to_submit, min_complete, flags):
    return _libc.syscall(SYS_io_uring_enter, fd, to_submit, min_complete, flags, None, 0)


def buffer_address(buf):
    """Address of a writable buffer (bytearray, mmap) for the kernel to read or write."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


# === 2. The ring ==================================================================================

# Tried in order; each step drops the newest flag the kernel may not know (EINVAL).
SETUP_FLAG_STEPS = (
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER
    | IORING_SETUP_DEFER_TASKRUN,
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER,
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN,
    IORING_SETUP_SUBMIT_ALL,
    0,
)


def io_uring_unavailable(err):
    """The one-line reason why io_uring_setup failed with errno err, and what to do."""
    if err == errno.ENOSYS:
        return ("io_uring is not available: this kernel has no io_uring_setup (ENOSYS); "
                "use Linux 5.19 or newer built with CONFIG_IO_URING")
    if err == errno.EPERM:
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
        except OSError:
            disabled = "0"
        if disabled == "2":
            return ("io_uring is disabled by sysctl kernel.io_uring_disabled=2; "
                    "run 'sysctl kernel.io_uring_disabled=0'")
        if disabled == "1":
            return ("io_uring is restricted by sysctl kernel.io_uring_disabled=1 to the group "
                    "in kernel.io_uring_group; add this user to it or set the sysctl to 0")
        return ("io_uring is blocked by a seccomp profile (EPERM), as container runtimes do by "
                "default; allow io_uring_setup/enter/register (e.g. docker --security-opt "
                "seccomp=unconfined)")
    return "io_uring_setup failed: " + os.strerror(err)


# SQE i starts at byte i << SQE_SHIFT of the SQE array: io_uring_sqe.size == 1 << SQE_SHIFT.
SQE_SHIFT = 6
CQE_SIZE = io_uring_cqe.size
# The rings' head, tail and mask words, and the SQ ring's index array entries, are u32.
ring_u32 = struct.Struct("<I")


class IoUring:
    """One io_uring instance. SQEs are queued with the prep_* methods, named and argued as
    liburing's io_uring_prep_* (plus the user_data and IOSQE_* flags liburing sets apart), then
    submitted and reaped with enter() and completions()."""

    def __init__(self, entries, disabled=False):
        """disabled: the ring runs nothing until restrict() has limited what it may run."""
        self.fd, p = self._setup(entries, IORING_SETUP_R_DISABLED if disabled else 0)
        self.flags, self.features = p.flags, p.features
        if not self.features & IORING_FEAT_NODROP:
            raise StartupError("io_uring without IORING_FEAT_NODROP: use Linux 5.19 or newer")
        self._map_rings(p)
        self.enters = 0
        self.allowed_ops = None  # how many opcodes restrict() left it; None: all

    @staticmethod
    def _setup(entries, extra_flags):
        for flags in SETUP_FLAG_STEPS:
            p = io_uring_params()
            p.flags = flags | extra_flags | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP
            p.cq_entries = entries * 4
            fd = _libc.syscall(SYS_io_uring_setup, entries, ctypes.byref(p))
            if fd >= 0:
                return fd, p
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise StartupError(io_uring_unavailable(err))
        raise StartupError("io_uring_setup rejected every flag set (EINVAL): kernel too old")

    def _map_rings(self, p):
        sq, cq = p.sq_off, p.cq_off
        sq_size = sq.array + p.sq_entries * ring_u32.size
        cq_size = cq.cqes + p.cq_entries * CQE_SIZE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if self.features & IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        self.sq_ring = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
        if self.features & IORING_FEAT_SINGLE_MMAP:
            self.cq_ring = self.sq_ring
        else:
            self.cq_ring = mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot,
                                     offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(self.fd, p.sq_entries << SQE_SHIFT, mmap.MAP_SHARED, prot,
                              offset=IORING_OFF_SQES)
        self.sq_entries, self.cq_entries = p.sq_entries, p.cq_entries
        self.sq_mask = ring_u32.unpack_from(self.sq_ring, sq.ring_mask)[0]
        self.cq_mask = ring_u32.unpack_from(self.cq_ring, cq.ring_mask)[0]
        self.sq_tail_off, self.cq_head_off, self.cq_tail_off = sq.tail, cq.head, cq.tail
        self.cqes_off = cq.cqes
        # SQE i always sits in array slot i: the indirection array is written once, here.
        for i in range(p.sq_entries):
            ring_u32.pack_into(self.sq_ring, sq.array + ring_u32.size * i, i)
        self.sq_tail = ring_u32.unpack_from(self.sq_ring, sq.tail)[0]
        self.to_submit = 0
        self.cq_view = memoryview(self.cq_ring)

    def setup_description(self):
        """The optional setup flags this ring got, by name, for the start-up log."""
        names = [name for name, flag in (("SUBMIT_ALL", IORING_SETUP_SUBMIT_ALL),
                                         ("COOP_TASKRUN", IORING_SETUP_COOP_TASKRUN),
                                         ("SINGLE_ISSUER", IORING_SETUP_SINGLE_ISSUER),
                                         ("DEFER_TASKRUN", IORING_SETUP_DEFER_TASKRUN))
                 if self.flags & flag]
        return f"{self.sq_entries} SQEs, {self.cq_entries} CQEs, " + (
            "|".join(names) or "no optional setup flags")

    def supported_ops(self):
        """Opcodes this kernel supports (IORING_REGISTER_PROBE, Linux 5.6+)."""
        nops = 256  # an opcode is a u8: room for all of them
        probe = bytearray(io_uring_probe.size + io_uring_probe_op.size * nops)
        addr = buffer_address(probe)
        if _libc.syscall(SYS_io_uring_register, self.fd, IORING_REGISTER_PROBE,
                         ctypes.c_void_p(addr), nops) < 0:
            raise StartupError("IORING_REGISTER_PROBE failed: " + os.strerror(ctypes.get_errno())
                               + "; use Linux 5.19 or newer")
        last_op = io_uring_probe.unpack_from(probe)[0]
        ops = io_uring_probe_op.iter_unpack(probe[io_uring_probe.size:])
        return {op for op, (_, _, flags, _) in enumerate(ops)
                if op <= last_op and flags & IO_URING_OP_SUPPORTED}

    def restrict(self, ops, sqe_flags):
        """Enable a ring set up disabled, limited for good (IORING_REGISTER_RESTRICTIONS, Linux
        5.10+) to the opcodes ops with no sqe.flags but sqe_flags, and to no io_uring_register
        at all: any other operation completes with -EACCES. Seccomp cannot see what a ring does,
        so this is what keeps it from opening files or connecting (see README "Sandbox")."""
        rules = [(IORING_RESTRICTION_SQE_OP, op) for op in sorted(ops)]
        rules.append((IORING_RESTRICTION_SQE_FLAGS_ALLOWED, sqe_flags))
        buf = b"".join(io_uring_restriction.pack(*rule) for rule in rules)
        for opcode, arg, count in ((IORING_REGISTER_RESTRICTIONS, buf, len(rules)),
                                   (IORING_REGISTER_ENABLE_RINGS, None, 0)):
            if _libc.syscall(SYS_io_uring_register, self.fd, opcode, arg, count) < 0:
                raise StartupError("--secure: cannot restrict the io_uring: "
                                   + os.strerror(ctypes.get_errno()) + "; use Linux 5.19 or newer")
        self.allowed_ops = len(ops)

    def _prep(self, opcode, sqe_flags, fd, off, addr, length, op_flags, user_data):
        """Write one SQE at the local tail; it reaches the kernel with the next enter(). The
        arguments go in struct io_uring_sqe's order; ioprio and the fields after user_data
        (buf_index, personality, splice_fd_in, addr3) are 0. op_flags is the union that holds
        msg_flags, accept_flags, timeout_flags, cancel_flags, statx_flags."""
        if self.to_submit == self.sq_entries:
            self.enter(0)
        io_uring_sqe.pack_into(self.sqes, (self.sq_tail & self.sq_mask) << SQE_SHIFT, opcode,
                               sqe_flags, 0, fd, off, addr, length, op_flags, user_data,
                               0, 0, 0, 0, 0)
        self.sq_tail += 1  # wrapped to 32 bits only when published
        self.to_submit += 1

    # One prep_* per operation, as liburing's io_uring_prep_* (liburing.h) fills the SQE.
    # Addresses (buf, msg, ts, path, statxbuf) are ints: the caller keeps the memory alive.

    def prep_recv(self, fd, buf, length, flags, user_data, sqe_flags=0):
        """recv(2): flags (MSG_*) ride in msg_flags."""
        self._prep(IORING_OP_RECV, sqe_flags, fd, 0, buf, length, flags, user_data)

    def prep_send(self, fd, buf, length, flags, user_data, sqe_flags=0):
        """send(2): flags (MSG_*) ride in msg_flags."""
        self._prep(IORING_OP_SEND, sqe_flags, fd, 0, buf, length, flags, user_data)

    def prep_sendmsg(self, fd, msg, flags, user_data, sqe_flags=0):
        """sendmsg(2) of the struct msghdr at msg; flags ride in msg_flags. len is 0, as in
        sendmsg_recv_pair (liburing writes 1): the iovec count comes from the msghdr."""
        self._prep(IORING_OP_SENDMSG, sqe_flags, fd, 0, msg, 0, flags, user_data)

    def prep_recvmsg(self, fd, msg, flags, user_data, sqe_flags=0):
        """recvmsg(2) into the struct msghdr at msg; flags ride in msg_flags; len is 1, as
        liburing writes it."""
        self._prep(IORING_OP_RECVMSG, sqe_flags, fd, 0, msg, 1, flags, user_data)

    def prep_accept(self, fd, addr, addrlen, flags, user_data, sqe_flags=0):
        """accept4(2), single-shot: the peer's sockaddr at addr, its socklen_t at addrlen (in
        off, "addr2"; both 0 for none); flags (SOCK_CLOEXEC, ...) ride in accept_flags."""
        self._prep(IORING_OP_ACCEPT, sqe_flags, fd, addrlen, addr, 0, flags, user_data)

    def prep_timeout(self, ts, count, flags, user_data, sqe_flags=0):
        """A timer: the struct __kernel_timespec at ts (len 1: one timespec); count (in off)
        completions end it early, 0 for a pure timer; flags ride in timeout_flags."""
        self._prep(IORING_OP_TIMEOUT, sqe_flags, -1, count, ts, 1, flags, user_data)

    def prep_cancel64(self, target, flags, user_data, sqe_flags=0):
        """Cancel the request whose user_data is target (liburing's user_data argument; it
        rides in addr), or with IORING_ASYNC_CANCEL_ALL every such request; flags ride in
        cancel_flags. user_data is the cancel's own, as in every prep_* here."""
        self._prep(IORING_OP_ASYNC_CANCEL, sqe_flags, -1, 0, target, 0, flags, user_data)

    def prep_shutdown(self, fd, how, user_data, sqe_flags=0):
        """shutdown(2): how (SHUT_RD, SHUT_WR) rides in len."""
        self._prep(IORING_OP_SHUTDOWN, sqe_flags, fd, 0, 0, how, 0, user_data)

    def prep_close(self, fd, user_data, sqe_flags=0):
        """close(2)."""
        self._prep(IORING_OP_CLOSE, sqe_flags, fd, 0, 0, 0, 0, user_data)

    def prep_statx(self, dfd, path, flags, mask, statxbuf, user_data, sqe_flags=0):
        """statx(2): path (a NUL-terminated string) in addr, mask (STATX_*) in len, statxbuf in
        off ("addr2"), flags (AT_*) in statx_flags."""
        self._prep(IORING_OP_STATX, sqe_flags, dfd, statxbuf, path, mask, flags, user_data)

    @staticmethod
    def sendmsg_recv_pair(fd, msg_addr, msg_flags, send_ud, recv_addr, recv_len, recv_ud):
        """The two SQEs, as bytes, of a SENDMSG linked to a RECV on the same socket, the send
        completing silently when it succeeds: the pair that answers a keep-alive request and
        waits for the next. Every field stays the same for a connection's life (its msghdr
        and read buffer do not move), so the caller makes it once and queues it with
        prep_pair: a copy of 128 bytes instead of packing 28 fields per request."""
        return io_uring_sqe_pair.pack(
            IORING_OP_SENDMSG, IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS, 0, fd, 0, msg_addr, 0,
            msg_flags, send_ud, 0, 0, 0, 0, 0,
            IORING_OP_RECV, 0, 0, fd, 0, recv_addr, recv_len, 0, recv_ud, 0, 0, 0, 0, 0)

    def prep_pair(self, pair):
        """Queue two SQEs made by sendmsg_recv_pair (the hot path: no prep_* call)."""
        if self.to_submit + 2 > self.sq_entries:
            self.enter(0)
        offset = (self.sq_tail & self.sq_mask) << SQE_SHIFT
        if offset + io_uring_sqe_pair.size <= len(self.sqes):
            self.sqes[offset:offset + io_uring_sqe_pair.size] = pair
        else:   # they straddle the end of the ring
            self.sqes[offset:] = pair[:io_uring_sqe.size]
            self.sqes[:io_uring_sqe.size] = pair[io_uring_sqe.size:]
        self.sq_tail += 2
        self.to_submit += 2

    def enter(self, wait):
        """Publish queued SQEs and, when wait is true, block until at least one CQE is ready."""
        ring_u32.pack_into(self.sq_ring, self.sq_tail_off, self.sq_tail & 0xFFFFFFFF)
        flags = IORING_ENTER_GETEVENTS if wait else 0
        self.enters += 1
        ret = sys_io_uring_enter(self.fd, self.to_submit, 1 if wait else 0, flags)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                # A signal, or CQ pressure: the SQEs stay queued and go with the next enter.
                return
            raise OSError(err, "io_uring_enter: " + os.strerror(err))
        self.to_submit -= ret

    def completions(self):
        """All CQEs ready now, as (user_data, res, flags) tuples; frees their ring slots."""
        head = ring_u32.unpack_from(self.cq_ring, self.cq_head_off)[0]
        tail = ring_u32.unpack_from(self.cq_ring, self.cq_tail_off)[0]
        if head == tail:
            return ()
        start, end = head & self.cq_mask, tail & self.cq_mask
        base, view = self.cqes_off, self.cq_view
        if start < end:
            cqes = list(io_uring_cqe.iter_unpack(
                view[base + CQE_SIZE * start:base + CQE_SIZE * end]))
        else:  # the batch wraps around the end of the ring
            cqes = list(io_uring_cqe.iter_unpack(
                view[base + CQE_SIZE * start:base + CQE_SIZE * self.cq_entries]))
            cqes += io_uring_cqe.iter_unpack(view[base:base + CQE_SIZE * end])
        ring_u32.pack_into(self.cq_ring, self.cq_head_off, tail)
        return cqes


# === 3. The archive ===============================================================================

COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                    (b"\x28\xb5\x2f\xfd", "zstd"))
VARIANT_SUFFIXES = ((".br", "br"), (".zst", "zstd"), (".gz", "gzip"))
# The mtimes a Last-Modified can carry: an HTTP-date's year has four digits, and Python's
# datetime (email.utils.formatdate) stops at year 1.
FIRST_MTIME, LAST_MTIME = -62135596800, 253402300799  # 0001-01-01, 9999-12-31T23:59:59 UTC
MAX_URL_PATH = 8192  # no request line (layer 4's MAX_REQUEST_LINE) can name a longer path


class Entry:
    """A servable file: where its bytes are in the tar, and (filled by layer 4) its head."""
    __slots__ = ("name", "offset", "size", "mtime", "encoding", "variants", "ctype", "head")

    def __init__(self, name, offset, size, mtime, encoding=None):
        self.name, self.offset, self.size, self.mtime = name, offset, size, mtime
        self.encoding = encoding  # Content-Encoding when this is a precompressed variant
        self.variants = ()        # (encoding, Entry) pairs, smallest first
        self.ctype, self.head = "", b""


class Archive:
    """Index of a tar file mmap'd read-only: URL path (bytes) -> Entry, plus directories.

    What a tar may hold, for hosts that pack user-supplied content: damage to the archive's
    structure (an unreadable or cut-off header, a negative size, data past the end of the file)
    stops start-up with one line, because nothing after it can be located with confidence; an
    intact member that cannot be served (sparse, an mtime no HTTP-date can carry, a name longer
    than a request line) is skipped, with one warning line per kind of problem. Memory and time
    are linear in the tar's size."""

    def __init__(self, path, prefix, log):
        self.path = path
        self.files = {}          # '/a/b.html' (UTF-8 bytes) -> Entry
        self.dirs = set()        # directory members: '/a', '/a/b' (UTF-8 bytes, no trailing slash)
        self.skipped = {}        # why -> [how many, first member name]
        self.fd = self._open(path)
        try:
            self._read_members(path, _path_parts(prefix))
            self.names = sorted_in_pieces(self.files)  # files' parents are dirs: see is_dir
            self._attach_variants()
            for why, (count, first) in self.skipped.items():
                more = f" and {count - 1} more" if count > 1 else ""
                log.warn(f"{path}: skipped '{_shown(first)}'{more}: {why}")
            self.address = self._map()
        except BaseException:
            os.close(self.fd)  # a reload that fails must not leak it
            raise

    def _open(self, path):
        """Open the tar once: indexing, the mapping and the change check (Server.on_statx) all
        use this descriptor, so a new tar renamed over the path meanwhile cannot mix in. The
        size and mtime are its identity: a change in place shows in them."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StartupError(f"{path}: cannot open the tar file: {e.strerror}")
        try:
            self._identify(path, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _identify(self, path, fd):
        """Is the file at fd a tar we can serve? Its size and mtime, if so."""
        try:
            st = os.fstat(fd)
            magic = b"" if stat.S_ISDIR(st.st_mode) else os.pread(fd, 8, 0)
        except OSError as e:
            raise StartupError(f"{path}: cannot open the tar file: {e.strerror}")
        if stat.S_ISDIR(st.st_mode):
            raise StartupError(f"{path}: is a directory; give a tar file "
                               f"(tar -cf site.tar -C dir .)")
        for sig, kind in COMPRESSED_MAGIC:
            if magic.startswith(sig):
                raise StartupError(f"{path}: is {kind}-compressed; serve an uncompressed tar "
                                   f"(decompress it first)")
        if st.st_size < 512:
            raise StartupError(f"{path}: not a tar file (only {st.st_size} bytes)")
        self.size, self.identity = st.st_size, (st.st_size, st.st_mtime_ns)

    def _read_members(self, path, prefix):
        """Index member by member. tarfile reads from an mmap, so a header that claims a
        terabyte of data yields at most the rest of the file instead of a MemoryError."""
        links = []
        try:
            with mmap.mmap(self.fd, 0, prot=mmap.PROT_READ) as mm:
                with tarfile.open(fileobj=mm, mode="r:") as tf:
                    for m in iter(tf.next, None):
                        tf.members.clear()  # tarfile would keep every TarInfo: 100k are 50 MiB
                        self._check_member(path, m, tf.offset)
                        self._add(m, prefix, links)
                    end = tf.offset  # where the header after the last member starts
                self._check_end(path, end, mm[end:end + 512])
        except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError, MemoryError) as e:
            raise StartupError(f"{path}: not a readable tar file ({e or type(e).__name__})")
        for name, target in links:  # a hard link serves its target's bytes
            t = self.files.get(target)
            if t is not None:
                self.files[name] = Entry(name, t.offset, t.size, t.mtime)

    def _check_member(self, path, m, next_header):
        """Before tarfile moves on to next_header: a negative size would move it backwards,
        and a member's data (with its padding) must end inside the file."""
        if m.size < 0:
            raise StartupError(f"{path}: '{_shown(m.name)}' has a negative size "
                               f"({m.size}); re-create the tar")
        if next_header > self.size:
            raise StartupError(f"{path}: truncated: '{_shown(m.name)}' ends at byte "
                               f"{next_header} but the file has {self.size}")

    @staticmethod
    def _check_end(path, end, tail):
        """tarfile stops quietly at a cut-off header: after the last member there must be
        nothing, or the end-of-archive zero blocks."""
        if tail and (len(tail) < 512 or tail.count(0) != 512):
            raise StartupError(f"{path}: truncated or corrupt after byte {end} (a damaged "
                               f"header); re-create the tar")

    def _add(self, m, prefix, links):
        name = _member_name(m.name, prefix)
        if name is None:
            return
        if len(name) > MAX_URL_PATH:
            self._skip(name, m, f"names longer than {MAX_URL_PATH} bytes cannot be requested")
        elif m.isreg() and m.issparse():
            self._skip(name, m, "sparse members (holes are not stored in the tar) are not served")
        elif m.isreg() and not FIRST_MTIME <= m.mtime <= LAST_MTIME:
            self._skip(name, m, "an mtime outside the years 1-9999 cannot be a Last-Modified")
        elif m.isreg():
            self.files[name] = Entry(name, m.offset_data, m.size, int(m.mtime))
        elif m.islnk():
            links.append((name, _member_name(m.linkname, prefix)))
        elif m.isdir() and name != b"/":
            self.dirs.add(name)

    def _skip(self, name, m, why):
        self.files.pop(name, None)  # a later member replaces an earlier one, even when skipped
        self.skipped.setdefault(why, [0, m.name])[0] += 1

    def _attach_variants(self):
        for name, entry in self.files.items():
            found = []
            for suffix, encoding in VARIANT_SUFFIXES:
                v = self.files.get(name + suffix.encode())
                if v is not None:
                    found.append((encoding, Entry(v.name, v.offset, v.size, v.mtime, encoding)))
            entry.variants = tuple(sorted(found, key=lambda ev: ev[1].size))

    def _map(self):
        """mmap the tar read-only and return its address, for the kernel to send from. The
        descriptor stays open: userspace reads use pread on it, since reading the mapping past
        the end of a file that shrank is SIGBUS."""
        addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise StartupError(f"{self.path}: mmap failed: {os.strerror(ctypes.get_errno())}")
        return addr

    def close(self):
        """Unmap the tar and close it, once nothing sends from it any more (after a reload)."""
        _libc.munmap(self.address, self.size)
        os.close(self.fd)

    def dispose(self):
        """Drop the index an entry at a time, in a thread (Server.release): freeing 100,000
        entries at once is one C loop that holds the GIL, and the event loop, for 20 ms."""
        self.names = []
        files = self.files
        while files:
            files.popitem()

    def lookup(self, path):
        """Entry for a normalised URL path; index.html for directories."""
        if path.endswith(b"/"):
            return self.files.get(path + b"index.html")
        return self.files.get(path)

    def is_dir(self, path):
        """Is path (no trailing slash) a directory member, or a parent of some file? Bisecting
        the sorted names keeps memory linear: a set of every parent of a deep name is not."""
        if path in self.dirs:
            return True
        under = path + b"/"
        i = bisect.bisect_left(self.names, under)
        return i < len(self.names) and self.names[i].startswith(under)


def sorted_in_pieces(items, piece=4096):
    """sorted(items), in pieces merged in Python: one sort of 100,000 names holds the GIL for
    20 ms, which a reload's loading thread must not take from the event loop."""
    items = list(items)
    pieces = [sorted(items[i:i + piece]) for i in range(0, len(items), piece)]
    return list(heapq.merge(*pieces))


def _shown(name):
    """A member name for a log line: escaped, and cut short (names can be megabytes long)."""
    return log_escape(name[:200]) + ("..." if len(name) > 200 else "")


def _path_parts(name):
    """'./site//a/./b' -> ['site', 'a', 'b']: the components a tar reader extracts."""
    return [p for p in name.split("/") if p not in ("", ".")]


def _member_name(name, prefix):
    """'./site/a b.html' -> b'/a b.html' for the prefix ['site']; None outside the prefix, which
    matches whole components (not 'site-private/' nor 'sitemap.xml'), or for a '..' component."""
    parts = _path_parts(name)
    if parts[:len(prefix)] != prefix or ".." in parts:
        return None
    return ("/" + "/".join(parts[len(prefix):])).encode("utf-8", "surrogateescape")


# === 4. HTTP/1.1 ==================================================================================

MAX_REQUEST_LINE = 8192
RECENT_HEADS = 1024  # request heads whose keep-alive answers are remembered (Site.respond),
RECENT_HEAD_BYTES = 2048  # if no longer than this (a browser's are 400-900): at most ~2.5 MiB
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])\r?\n"
VERSION_LINE = re.compile(TOKEN + rb" [\x21-\x7e]+ HTTP/\d\.\d\r?")
# Field values: visible characters, spaces and tabs, obs-text; no CR, LF, NUL or other controls.
FIELD_BLOCK = rb"(?:" + TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r?\n)*"
# A whole request head checked in one call; group 4 is the field block.
REQUEST_HEAD = re.compile(REQUEST_LINE + rb"(" + FIELD_BLOCK + rb")")
FIELD_PAIRS = re.compile(rb"(" + TOKEN + rb"):[ \t]*([^\r\n]*)\r?\n")  # on a checked block
PERCENT_OK = re.compile(rb"(?:[^%]|%[0-9A-Fa-f]{2})*")
WIRE_NUMBER_MAX = 10 ** 18  # larger than any file; a bigger number from the wire counts as this
HEADER_VALUE = re.compile(r"[\x20-\x7e]*")  # what this server writes into a header line
PATH_SAFE = "/:@!$&'()*+,;="  # RFC 3986 pchar beyond the unreserved ones, and '/'
STRAY_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
BYTE_RANGE = re.compile(rb"bytes=[ \t]*(\d*)-(\d*)[ \t]*")
TEXT_TYPES = ("application/json", "application/xml", "image/svg+xml", "application/manifest+json",
              "application/ld+json", "application/xhtml+xml", "application/rss+xml",
              "application/atom+xml")
REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
           400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           414: "URI Too Long", 416: "Range Not Satisfiable",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           505: "HTTP Version Not Supported"}
# Fields whose values the responder looks at; all others are checked for syntax and skipped.
INTERESTING = frozenset((b"host", b"connection", b"content-length", b"transfer-encoding",
                         b"range", b"if-range", b"if-none-match", b"if-modified-since",
                         b"accept-encoding", b"accept"))
SINGLETONS = frozenset((b"host", b"content-length", b"transfer-encoding"))
# Lines every response carries after its Date line, unless --header removes or changes them
# (response_headers). nosniff: a browser must not run a file served as text/plain as a script.
DEFAULT_HEADERS = (("Server", SERVER), ("X-Content-Type-Options", "nosniff"))
# Lines the server writes for each response on its own: a fixed one would contradict them.
PER_RESPONSE_HEADERS = frozenset((
    "date", "content-type", "content-length", "content-encoding", "content-range",
    "transfer-encoding", "connection", "keep-alive", "etag", "last-modified", "accept-ranges",
    "vary", "location", "allow", "trailer", "upgrade"))

# The web's types by lower-case extension (IANA registrations; WHATWG's where browsers differ,
# as image/x-icon and text/javascript): the same answer on every host and Python version.
WEB_TYPES = {
    b"html": "text/html", b"htm": "text/html", b"css": "text/css", b"js": "text/javascript",
    b"mjs": "text/javascript", b"cjs": "text/javascript", b"json": "application/json",
    b"map": "application/json", b"jsonld": "application/ld+json",
    b"webmanifest": "application/manifest+json", b"manifest": "application/manifest+json",
    b"xml": "application/xml", b"xsl": "application/xml", b"xhtml": "application/xhtml+xml",
    b"rss": "application/rss+xml", b"atom": "application/atom+xml", b"txt": "text/plain",
    b"md": "text/markdown", b"markdown": "text/markdown", b"csv": "text/csv",
    b"tsv": "text/tab-separated-values", b"vtt": "text/vtt", b"ics": "text/calendar",
    b"wgsl": "text/wgsl", b"svg": "image/svg+xml", b"png": "image/png", b"jpg": "image/jpeg",
    b"jpeg": "image/jpeg", b"gif": "image/gif", b"webp": "image/webp", b"avif": "image/avif",
    b"apng": "image/apng", b"jxl": "image/jxl", b"ico": "image/x-icon", b"bmp": "image/bmp",
    b"tif": "image/tiff", b"tiff": "image/tiff", b"heic": "image/heic", b"woff": "font/woff",
    b"woff2": "font/woff2", b"ttf": "font/ttf", b"otf": "font/otf",
    b"eot": "application/vnd.ms-fontobject", b"mp4": "video/mp4", b"m4v": "video/mp4",
    b"webm": "video/webm", b"ogv": "video/ogg", b"mov": "video/quicktime", b"ogg": "audio/ogg",
    b"oga": "audio/ogg", b"opus": "audio/ogg", b"mp3": "audio/mpeg", b"wav": "audio/wav",
    b"flac": "audio/flac", b"m4a": "audio/mp4", b"aac": "audio/aac", b"weba": "audio/webm",
    b"mid": "audio/midi", b"midi": "audio/midi", b"m3u8": "application/vnd.apple.mpegurl",
    b"mpd": "application/dash+xml", b"wasm": "application/wasm", b"pdf": "application/pdf",
    b"epub": "application/epub+zip", b"zip": "application/zip", b"gz": "application/gzip",
    b"tgz": "application/gzip", b"zst": "application/zstd", b"tar": "application/x-tar",
    b"bz2": "application/x-bzip2", b"xz": "application/x-xz",
    b"7z": "application/x-7z-compressed",
}
_mime = mimetypes.MimeTypes()  # built-in table only (never the host's files), for the rest


def _with_charset(ctype):
    return ctype + "; charset=utf-8" if ctype.startswith("text/") or ctype in TEXT_TYPES else ctype


_WEB_CTYPES = {ext: _with_charset(t) for ext, t in WEB_TYPES.items()}  # shared by every Entry


def content_type(name):
    """The Content-Type of a member name (bytes): WEB_TYPES by its extension, else Python's
    built-in table; a compressed file with no type of its own is application/octet-stream."""
    _, dot, ext = name.rpartition(b"/")[2].rpartition(b".")
    return (_WEB_CTYPES.get(ext.lower()) if dot else None) or _builtin_type(name)


def _builtin_type(name):
    ctype, encoding = _mime.guess_type(name.decode("utf-8", "replace"))
    if encoding == "gzip":
        return "application/gzip"  # .svgz
    if ctype is None or encoding is not None:
        return "application/octet-stream"
    return _with_charset(ctype)


def http_date(t):
    return email.utils.formatdate(t, usegmt=True)


def etag_of(entry):
    # Strong and cheap: the member's place in the tar, its size and mtime change whenever it does.
    return f'"{entry.mtime:x}-{entry.size:x}-{entry.offset:x}"'


def parse_http_date(value):
    try:
        return email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def normalise_path(target):
    """Request target -> URL path key (bytes) with escapes decoded and dot segments resolved.
    Returns None for a target that must be answered with 400."""
    query = target.find(b"?")
    path = target if query < 0 else target[:query]
    if b"%" not in path and b"/." not in path and b"//" not in path:
        return path  # the common case: already canonical
    if b"%" in path:
        if not PERCENT_OK.fullmatch(path):
            return None
        path = unquote_to_bytes(path)
        if b"\x00" in path:
            return None
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            return None
    out = []
    for seg in path.split(b"/")[1:]:
        if seg == b"..":
            if out:
                out.pop()
        elif seg not in (b".", b""):
            out.append(seg)
    trailing = path.endswith((b"/", b"/.", b"/..")) and out
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def redirect_location(path, query):
    """Location for a decoded path (archive bytes) and the request's query: percent-encoded to
    RFC 3986 path and query characters, so neither CR, LF nor a backslash (which browsers
    read as '/', making '/\\host' an open redirect) ever reaches the header."""
    location = quote_from_bytes(path, safe=PATH_SAFE)
    if query:
        query = STRAY_PERCENT.sub(b"%25", query)  # keep the client's escapes, fix stray '%'
        location += "?" + quote_from_bytes(query, safe=PATH_SAFE + "?%")
    return location


def weak_match(header, etag):
    """If-None-Match: weak comparison against a comma-separated list or '*'."""
    tag = etag.encode()
    for item in header.split(b","):
        item = item.strip()
        if item == b"*" or item == tag or (item.startswith(b"W/") and item[2:] == tag):
            return True
    return False


def wire_number(digits):
    """A decimal number from the wire, capped at WIRE_NUMBER_MAX: more digits than any file
    size needs never reach int(), which refuses over 4300 and slows down well before."""
    digits = digits.lstrip(b"0")
    return int(digits or b"0") if len(digits) <= 18 else WIRE_NUMBER_MAX


def parse_range(value, size):
    """A single 'bytes=a-b' range -> (start, end_exclusive); 'unsatisfiable'; or None to ignore."""
    m = BYTE_RANGE.fullmatch(value)
    if m is None:
        return None  # invalid or several ranges: serve the whole body
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = wire_number(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = wire_number(first)
    end = wire_number(last) + 1 if last else size
    if last and end <= start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def accept_encoding_choice(entry, header):
    """The smallest representation the client accepts: a variant Entry, or entry itself."""
    q = {}
    for item in header.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        weight = 1.0
        params = params.strip().lower()
        if params.startswith(b"q="):
            try:
                weight = float(params[2:])
            except ValueError:
                weight = 0.0
        if coding:
            q[coding] = weight
    star = q.get(b"*")
    best = entry
    identity_q = q.get(b"identity", star if star is not None else 1.0)
    for encoding, variant in entry.variants:
        weight = q.get(encoding.encode(), star if star is not None else 0.0)
        if weight > 0 and (variant.size < best.size or identity_q <= 0 and best is entry):
            best = variant
    return best


def response_headers(options):
    """--header 'Name: value' options over DEFAULT_HEADERS -> [(name, value)], the lines added
    to every response. A name given again (in any case) replaces the earlier line in its place;
    an empty value removes it. ValueError, naming the option, for a line we may not send."""
    headers = {name.lower(): (name, value) for name, value in DEFAULT_HEADERS}
    for option in options:
        try:
            name, value = header_option(option)
        except ValueError as e:
            raise ValueError(f"'{log_escape(option)}': {e}")
        if value:
            headers[name.lower()] = (name, value)
        else:
            headers.pop(name.lower(), None)
    return list(headers.values())


def header_option(option):
    """'Name: value' -> (name, value): a field line (RFC 9110 §5) this server may add to every
    response; ValueError saying why not."""
    name, colon, value = option.partition(":")
    value = value.strip(" ")
    if not colon:
        raise ValueError("give Name: value (or Name: to remove a default header)")
    if not name.isascii() or not re.fullmatch(TOKEN, name.encode()):
        raise ValueError("the name must be a token (letters, digits, !#$%&'*+-.^_`|~)")
    if not HEADER_VALUE.fullmatch(value):
        raise ValueError("the value may hold visible ASCII characters and spaces only, no "
                         "control characters")
    if name.lower() == "cache-control":
        raise ValueError("files get it from --cache-control")
    if name.lower() in PER_RESPONSE_HEADERS:
        raise ValueError("the server writes this header per response")
    return name, value


def is_navigation(path, accept):
    """Does a request for a missing path look like a browser opening a page of a single-page
    app (--fallback)? Its last segment has no file extension, and it accepts text/html (fetch()
    and curl send */*, which is not enough: a missing script or API call stays a 404)."""
    if b"." in path.rpartition(b"/")[2] or accept is None:
        return False
    for item in accept.split(b","):
        media_type, _, params = item.partition(b";")
        if media_type.strip().lower() == b"text/html":
            return not re.search(rb"(?:^|;)[ \t]*q=0(?:\.0*)?[ \t]*(?:;|$)", params.lower())
    return False


def request_head_error(head):
    """Status for a head that REQUEST_HEAD rejected: 414, 505 or 400."""
    line = head.split(b"\n", 1)[0]
    if len(line) > MAX_REQUEST_LINE:
        return 414
    if VERSION_LINE.fullmatch(line) and not line.rstrip(b"\r").endswith((b"/1.0", b"/1.1")):
        return 505  # well-formed, but a version other than 1.0 and 1.1
    return 400  # a malformed request line, or a malformed field line after a good one


def framing(version, fields):
    """keep_alive for a parsed request; raise HttpError for a Host or Content-Length problem.
    A request with a body is answered and the connection closed: the body is never read, so
    nothing can be smuggled behind it."""
    if version == 11 and b"host" not in fields:
        raise HttpError(400)
    length = fields.get(b"content-length")
    if length is not None and (not length.isdigit() or wire_number(length) == WIRE_NUMBER_MAX):
        raise HttpError(400)  # not a number, or a body larger than anyone could send
    if b"transfer-encoding" in fields or length is not None and length.strip(b"0"):
        return False
    conn = fields.get(b"connection")
    if conn is None:
        return version == 11
    conn = conn.lower()
    if version == 11:
        return b"close" not in conn
    return b"keep-alive" in conn and b"close" not in conn


class HttpError(Exception):
    """A request that gets an error status; close says whether the connection must end."""

    def __init__(self, status, close=True):
        self.status, self.close = status, close


class Site:
    """HTTP/1.1 semantics over an Archive: request head in, response head and body span out."""

    def __init__(self, archive, cache_control=None, headers=DEFAULT_HEADERS, fallback=None):
        self.archive = archive
        self.cache_control = cache_control
        self.fallback = fallback  # Entry answering navigations to missing paths (is_navigation)
        # Fixed lines (Server, --header) go into the status prefixes, built once a second.
        self.fixed_lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.not_found = archive.files.get(b"/404.html")
        self.recent = {}  # request head -> its answer after the Date line (see respond)
        self.draining = False  # set on shutdown: every response says Connection: close
        self.stale = False     # set when the tar changed on disk: every file answer is a 500
        for entry in archive.files.values():
            self._prepare(entry)
            for _, variant in entry.variants:
                self._prepare(variant, content_type(entry.name))
        self.tick(time.time())

    def _prepare(self, entry, ctype=None):
        """Precompute the 200 head lines of an entry (everything but status, Date, Connection)."""
        entry.ctype = ctype or content_type(entry.name)
        entry.head = ("\r\n".join(self._entity_lines(entry, entry.size)) + "\r\n").encode("latin-1")

    def _entity_lines(self, entry, length):
        """The header lines describing an entry's representation, for a body of `length`."""
        lines = [f"Content-Type: {entry.ctype}", f"Content-Length: {length}"]
        lines += self._validators(entry)
        if entry.encoding:
            lines.append(f"Content-Encoding: {entry.encoding}")
        return lines + ["Accept-Ranges: bytes"]

    def _validators(self, entry):
        lines = [f"Last-Modified: {http_date(entry.mtime)}", f"ETag: {etag_of(entry)}"]
        if self.cache_control:
            lines.append(f"Cache-Control: {self.cache_control}")
        if entry.variants or entry.encoding:
            lines.append("Vary: Accept-Encoding")
        return lines

    def mark_stale(self):
        """The tar changed under the index: stop serving from it (remembered answers too)."""
        self.stale = True
        self.recent.clear()

    def tick(self, now):
        """Refresh the cached Date line, and the status, Date and fixed lines (Server,
        --header) that begin every response head (prefixes, by status); called once a second,
        not per request."""
        self.date = http_date(now)
        self.prefixes = {status: (f"HTTP/1.1 {status} {reason}\r\nDate: {self.date}\r\n"
                                  f"{self.fixed_lines}").encode()
                         for status, reason in REASONS.items()}

    def status_head(self, status, lines=(), close=False, keep_alive_10=False):
        lines = list(lines)
        if close:
            lines.append("Connection: close")
        elif keep_alive_10:
            lines.append("Connection: keep-alive")
        return self.prefixes[status] + "".join(line + "\r\n" for line in lines).encode(
            "latin-1") + b"\r\n"

    def error(self, status, close, extra=(), method=b"GET", keep_alive_10=False):
        """A short text/plain error response: (status, head+body, 0, 0, keep_alive).
        A HEAD request gets the same head without the body."""
        body = f"{status} {REASONS[status]}\n".encode()
        lines = ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
        head = self.status_head(status, lines + list(extra), close, keep_alive_10)
        return status, head if method == b"HEAD" else head + body, 0, 0, not close

    # -- request parsing ---------------------------------------------------------------------------

    @staticmethod
    def parse(head):
        """Parse a request head (every line with its newline, without the blank line) into
        (method, target, version 10|11, interesting fields, keep_alive); raise HttpError."""
        m = REQUEST_HEAD.fullmatch(head)
        if m is None:
            raise HttpError(request_head_error(head))
        pos = m.start(4)
        if pos > MAX_REQUEST_LINE + 2:
            raise HttpError(414)
        method, target, version = m.group(1, 2, 3)
        version = 11 if version == b"1.1" else 10
        fields = {}
        for name, value in FIELD_PAIRS.findall(head, pos):
            name = name.lower()
            if name in INTERESTING:
                value = value.rstrip(b" \t")
                if name in fields:
                    if name in SINGLETONS:
                        if name != b"content-length" or fields[name] != value:
                            raise HttpError(400)
                    else:
                        value = fields[name] + b", " + value  # RFC 9110 §5.3 list combining
                fields[name] = value
        return method, target, version, fields, framing(version, fields)

    # -- responses ---------------------------------------------------------------------------------

    def respond(self, head):
        """Request head -> (status, response head bytes, body offset, body length, keep_alive).

        The answer to a keep-alive request depends on nothing but the head's bytes while the
        archive stands, the Date line aside: it is remembered, and the same head next time skips
        the parser. Clients repeat their heads (a browser sends the same one for a resource on
        every visit, cookies and all). Bounded: emptied when full, and when the tar changes."""
        hit = self.recent.get(head)
        if hit is not None and not self.draining:
            status, rest, offset, length = hit
            return status, self.prefixes[status] + rest, offset, length, True
        answer = self._answer(head)
        status, response_head, offset, length, keep_alive = answer
        if keep_alive and len(head) <= RECENT_HEAD_BYTES:
            if len(self.recent) >= RECENT_HEADS:
                self.recent.clear()
            # Every head begins with prefixes[status] (status_head, _full).
            self.recent[head] = (status, response_head[len(self.prefixes[status]):], offset,
                                 length)
        return answer

    def _answer(self, head):
        try:
            method, target, version, fields, keep_alive = self.parse(head)
        except HttpError as e:
            return self.error(e.status, e.close, method=head.partition(b" ")[0])
        close = not keep_alive or self.draining
        ka10 = version == 10 and not close  # HTTP/1.0 keep-alive: every answer must say so
        if method != b"GET" and method != b"HEAD":
            return self.error(405, close, ("Allow: GET, HEAD",), keep_alive_10=ka10)
        if target[0] != 47:  # not '/'
            target = _origin_form(target)
            if target is None:
                return self.error(400, True, method=method)
        path = normalise_path(target)
        if path is None:
            return self.error(400, close, method=method, keep_alive_10=ka10)
        if self.stale:
            return self.error(500, True, method=method)
        entry = self.archive.lookup(path)
        if entry is None:
            return self._missing(method, target, version, fields, path, close)
        return self._full(method, version, fields, entry, close)

    def _missing(self, method, target, version, fields, path, close):
        if not path.endswith(b"/") and self.archive.is_dir(path):
            location = redirect_location(path + b"/", target.partition(b"?")[2])
            return self.error(301, close, ("Location: " + location,), method,
                              version == 10 and not close)
        if self.fallback is not None and is_navigation(path, fields.get(b"accept")):
            return self._full(method, version, fields, self.fallback, close)
        nf = self.not_found
        if nf is None:
            return self.error(404, close, method=method, keep_alive_10=version == 10 and not close)
        lines = [f"Content-Type: {content_type(nf.name)}", f"Content-Length: {nf.size}"]
        head = self.status_head(404, lines, close, version == 10 and not close)
        return 404, head, nf.offset, (0 if method == b"HEAD" else nf.size), not close

    def _full(self, method, version, fields, entry, close):
        """A file's answer: content negotiation, If-None-Match or If-Modified-Since, Range with
        If-Range, HTTP/1.0 keep-alive and Connection: close."""
        accept = fields.get(b"accept-encoding")
        if accept is not None and entry.variants:
            entry = accept_encoding_choice(entry, accept)
        ka10 = version == 10 and not close
        if self._not_modified(fields, entry):
            return 304, self.status_head(304, self._validators(entry), close, ka10), 0, 0, not close
        is_head = method == b"HEAD"
        rng = fields.get(b"range")
        if rng is not None and not is_head and self._if_range_holds(fields, entry):
            span = parse_range(rng, entry.size)
            if span == "unsatisfiable":
                return self.error(416, close, (f"Content-Range: bytes */{entry.size}",),
                                  keep_alive_10=ka10)
            if span is not None:
                return self._partial(entry, span, close, ka10)
        head = self.prefixes[200] + entry.head + (
            b"Connection: close\r\n\r\n" if close else
            b"Connection: keep-alive\r\n\r\n" if ka10 else b"\r\n")
        return 200, head, entry.offset, (0 if is_head else entry.size), not close

    @staticmethod
    def _not_modified(fields, entry):
        """If-None-Match decides when present; otherwise If-Modified-Since (RFC 9110 §13.2.2)."""
        inm = fields.get(b"if-none-match")
        if inm is not None:
            return weak_match(inm, etag_of(entry))
        ims = fields.get(b"if-modified-since")
        since = parse_http_date(ims) if ims is not None else None
        return since is not None and entry.mtime <= since

    @staticmethod
    def _if_range_holds(fields, entry):
        cond = fields.get(b"if-range")
        if cond is None:
            return True
        if cond.startswith(b'"'):
            return cond == etag_of(entry).encode()  # strong comparison
        return parse_http_date(cond) == entry.mtime

    def _partial(self, entry, span, close, ka10):
        start, end = span
        lines = self._entity_lines(entry, end - start)
        lines.append(f"Content-Range: bytes {start}-{end - 1}/{entry.size}")
        head = self.status_head(206, lines, close, ka10)
        return 206, head, entry.offset + start, end - start, not close


def _origin_form(target):
    """absolute-form 'http://host/p?q' -> '/p?q' (RFC 9112 §3.2.2); None if not http(s)."""
    lower = target[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lower.startswith(scheme):
            rest = target[len(scheme):]
            slash = rest.find(b"/")
            return rest[slash:] if slash >= 0 else b"/"
    return None


def oversize_status(buf, start, end):
    """A request head in buf[start:end] is over the limit: 414 if its request line is, else 431."""
    line_end = buf.find(b"\n", start, end)
    return 414 if (line_end if line_end >= 0 else end) - start >= MAX_REQUEST_LINE else 431


def find_head_end(buf, start, end):
    """For a complete request head in buf[start:end]: (end of its last line, start of whatever
    follows the blank line); else None. Lines may end in CRLF or a bare LF (RFC 9112 §2.2)."""
    # A blank line follows a line's LF: it is "\n\r\n" or "\n\n", whichever comes first (LF and
    # CRLF lines may mix). Two searches, as the CRLF case must stay cheap.
    i = buf.find(b"\n\r\n", start, end)
    j = buf.find(b"\n\n", start, end if i < 0 else i + 1)
    if j >= 0:
        return j + 1, j + 2
    return (i + 1, i + 3) if i >= 0 else None


# --- The PROXY protocol header (haproxy.org/download/2.6/doc/proxy-protocol.txt) ------------------
# A load balancer that passes TCP through (HAProxy's send-proxy, IPVS, a cloud's network load
# balancer) starts each connection with the client's address: v1 as a line of text, v2 in binary.
# It comes before HTTP or TLS, on listeners told to expect it (--proxy-protocol).

PROXY_V1_MAX = 107   # the longest v1 line, CRLF included (the specification's limit)
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_MAX = 4096  # 16 bytes, then the addresses and TLVs: cloud balancers' TLVs fit easily
# v1: TCP4 or TCP6 with both addresses and ports, single spaces, CRLF; or UNKNOWN, whose rest the
# receiver ignores. Addresses are checked by inet_pton, ports here and in _proxy_v1.
PROXY_V1_LINE = re.compile(rb"PROXY (?:(TCP[46]) ([0-9A-Fa-f.:]+) ([0-9A-Fa-f.:]+) "
                           rb"(0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})|UNKNOWN(?: [^\r\n]*)?)\r\n")
# v2 address families with a stream transport that carry a client address, and the length of
# their address block: TCP over IPv4 and IPv6 (addresses, ports), UNIX stream (two paths).
PROXY_V2_FAMILIES = {0x11: (socket.AF_INET, 12), 0x21: (socket.AF_INET6, 36),
                     0x31: (socket.AF_UNIX, 216)}


def parse_proxy_header(data):
    """The PROXY protocol header (v1 or v2) at the start of data: (its length, the client's
    address as text, or None when the header carries none: v1 UNKNOWN, v2 LOCAL (the balancer's
    own health check) or AF_UNSPEC, for which the socket's own addresses stand). None when data
    is a correct beginning that needs more bytes; ValueError, saying why, for anything else.
    Nothing from the wire goes into the address unchecked: it is formatted from parsed bytes."""
    if data[:1] == PROXY_V2_SIGNATURE[:1]:
        return _proxy_v2(data)
    return _proxy_v1(data)


def _proxy_v1(data):
    end = data.find(b"\n", 0, PROXY_V1_MAX)
    if end < 0:
        if not b"PROXY ".startswith(data[:6]):
            raise ValueError("no PROXY protocol header")
        if len(data) >= PROXY_V1_MAX:
            raise ValueError(f"PROXY v1 line without CRLF in its first {PROXY_V1_MAX} bytes")
        return None
    m = PROXY_V1_LINE.fullmatch(data, 0, end + 1)
    if m is None:
        raise ValueError("malformed PROXY v1 line" if data.startswith(b"PROXY ") else
                         "no PROXY protocol header")
    proto, source, destination, source_port, destination_port = m.groups()
    if proto is None:
        return end + 1, None   # UNKNOWN
    if int(source_port) > 65535 or int(destination_port) > 65535:
        raise ValueError("PROXY v1 port out of range")
    family = socket.AF_INET if proto == b"TCP4" else socket.AF_INET6
    _proxy_v1_address(family, destination)
    return end + 1, _proxy_v1_address(family, source)


def _proxy_v1_address(family, text):
    """An address of the v1 line, in its canonical form (inet_pton is strict: dotted quads
    without leading zeros, IPv6 as RFC 4291 writes it)."""
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except OSError:
        raise ValueError(f"PROXY v1 address is not IPv{4 if family == socket.AF_INET else 6}")


def _proxy_v2(data):
    if not PROXY_V2_SIGNATURE.startswith(data[:12]):
        raise ValueError("no PROXY protocol header")
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or version_command & 0xF > 1:
        raise ValueError(f"PROXY v2 header of unknown version or command {version_command:#04x}")
    if 16 + length > PROXY_V2_MAX:
        raise ValueError(f"PROXY v2 header over {PROXY_V2_MAX} bytes")
    if len(data) < 16 + length:
        return None
    if version_command == 0x20 or family == 0:
        return 16 + length, None   # LOCAL, or AF_UNSPEC: no address, whatever the block holds
    if family not in PROXY_V2_FAMILIES:
        raise ValueError(f"PROXY v2 family and transport {family:#04x}: not TCP or UNIX stream")
    af, size = PROXY_V2_FAMILIES[family]
    if length < size:
        raise ValueError(f"PROXY v2 address block of {length} bytes, under {size}")
    # The TLVs after the addresses (authority, TLS details, a cloud's endpoint id) are skipped.
    if af == socket.AF_UNIX:
        return 16 + length, _proxy_unix_name(data[16:124])
    return 16 + length, socket.inet_ntop(af, data[16:16 + (4 if af == socket.AF_INET else 16)])


def _proxy_unix_name(path):
    """unix:PATH for a UNIX stream client, its path (sun_path, cut at its NUL; an abstract
    name shows as unix:) escaped as every log byte is, and spaces too: the access log's
    client field must stay one word."""
    return "unix:" + log_escape(path.split(b"\0", 1)[0]).replace(" ", "\\x20")


# === 5. Crypto primitives (pure Python; see README "Security notes") ==============================

# === 5.1 Curve25519 and X25519 (RFC 7748) =========================================================
# Curve25519 primitives: X25519 key agreement (RFC 7748) and Ed25519 signatures (RFC 8032).
#
# Field arithmetic is on plain Python integers modulo p = 2^255 - 19.  Two speed measures:
#
# * Lazy reduction in the hot loops.  Because 2^255 = 19 (mod p), v = (v & M255) + 19 * (v >> 255)
#   keeps v's residue while cutting a 510-bit product to about 260 bits; in CPython two such folds
#   cost less than one `% p`.  Values in the loops are therefore only bounded (and may be negative),
#   not fully reduced; each loop's comment gives the bound it keeps.
# * Fixed-base multiplication [s]B uses a table, built once per process on first use, of every
#   j * 256^i * B (0 <= j < 256, 0 <= i < 32) on the Edwards curve, so [s]B is 32 table additions.
#   X25519 key generation uses the same table through the birational map u = (1 + y) / (1 - y)
#   from edwards25519 to curve25519 (RFC 7748 §4.1), which sends B to the X25519 base point u = 9.
#
# Python integers are not constant-time; the ladder keeps the RFC's constant structure (masked
# conditional swaps, no branches on secret bits), which is the most pure Python can offer.

_C25519_P = 2 ** 255 - 19
_C25519_M255 = 2 ** 255 - 1
_ED25519_L = 2 ** 252 + 27742317777372353535851937790883648493  # order of the base point B
_ED25519_D = -121665 * pow(121666, -1, _C25519_P) % _C25519_P
_ED25519_D2 = 2 * _ED25519_D % _C25519_P
_ED25519_SQRT_M1 = pow(2, (_C25519_P - 1) // 4, _C25519_P)
_ED25519_IDENTITY = (0, 1, 1, 0)
_X25519_A24 = 121665  # (486662 - 2) / 4, RFC 7748 §5


def _c25519_inverse(z):
    """z^-1 mod p for any integer z (lazily reduced values included); 0 when z = 0 mod p,
    as RFC 7748's z^(p-2) gives.  pow(z, -1, p) is several times faster than z^(p-2) in CPython.
    """
    z %= _C25519_P
    return pow(z, -1, _C25519_P) if z else 0


def _x25519_clamp(k):
    """decodeScalar25519: clear the 3 low bits and bit 255, set bit 254."""
    n = int.from_bytes(k, "little")
    return (n & (_C25519_M255 - 7)) | (1 << 254)


def _x25519_ladder(k, u):
    """The Montgomery ladder of RFC 7748 §5: the u-coordinate of [k]u as a projective pair
    (x, z) with u = x/z, not reduced (|x|, |z| < 2^256); z = 0 mod p means u = 0."""
    m = _C25519_M255
    x1 = u
    x2, z2, x3, z3 = 1, 0, u, 1
    # The RFC swaps when bit t differs from bit t+1, i.e. on bit t of k ^ (k >> 1).  Reading those
    # bits as ASCII digits, 48 - ch is 0 for '0' and -1 (all ones) for '1': the swap mask.
    # Invariant: |x2|, |z2|, |x3|, |z3| < 2^256 (so sums < 2^257, products < 2^514; the
    # single folds give < 2^264, the double folds bring results back under 2^256).
    for ch in format(k ^ (k >> 1), "0255b").encode():
        mask = 48 - ch
        d = mask & (x2 ^ x3)
        x2 ^= d
        x3 ^= d
        d = mask & (z2 ^ z3)
        z2 ^= d
        z3 ^= d
        a = x2 + z2
        aa = a * a
        aa = (aa & m) + 19 * (aa >> 255)
        b = x2 - z2
        bb = b * b
        bb = (bb & m) + 19 * (bb >> 255)
        e = aa - bb
        c = x3 + z3
        da = (x3 - z3) * a
        da = (da & m) + 19 * (da >> 255)
        cb = c * b
        cb = (cb & m) + 19 * (cb >> 255)
        s = da + cb
        x3 = s * s
        x3 = (x3 & m) + 19 * (x3 >> 255)
        x3 = (x3 & m) + 19 * (x3 >> 255)
        s = da - cb
        z3 = s * s
        z3 = (z3 & m) + 19 * (z3 >> 255)
        z3 *= x1
        z3 = (z3 & m) + 19 * (z3 >> 255)
        z3 = (z3 & m) + 19 * (z3 >> 255)
        x2 = aa * bb
        x2 = (x2 & m) + 19 * (x2 >> 255)
        x2 = (x2 & m) + 19 * (x2 >> 255)
        z2 = e * (aa + _X25519_A24 * e)
        z2 = (z2 & m) + 19 * (z2 >> 255)
        z2 = (z2 & m) + 19 * (z2 >> 255)
    # The RFC ends with a conditional swap on bit 0 of k, which clamping has cleared: no swap.
    return x2, z2


def x25519(k, u):
    """RFC 7748 X25519(k, u): 32-byte scalar (clamped here) times 32-byte u-coordinate.

    The top bit of u is ignored, as §5 requires; a non-canonical u (p <= u < 2^255) needs no
    reducing here since the ladder computes modulo p anyway.
    """
    if len(k) != 32 or len(u) != 32:
        raise ValueError("X25519 scalar and u-coordinate must be 32 bytes each")
    x, z = _x25519_ladder(_x25519_clamp(k), int.from_bytes(u, "little") & _C25519_M255)
    return (x * _c25519_inverse(z) % _C25519_P).to_bytes(32, "little")


def _x25519_base_public(priv):
    """X25519(priv, 9) through the fixed-base Edwards table instead of the ladder."""
    scalar = _x25519_clamp(priv).to_bytes(32, "little")
    _x, y, z, _t = _ed25519_base_mult(scalar)
    u = (z + y) * _c25519_inverse(z - y) % _C25519_P  # u = (1 + y) / (1 - y) with y = Y/Z
    return u.to_bytes(32, "little")


def x25519_keypair():
    """A fresh X25519 key pair (priv, pub), 32 bytes each."""
    priv = secrets.token_bytes(32)
    return priv, _x25519_base_public(priv)


def x25519_shared(priv, peer_pub):
    """The X25519 shared secret; ValueError for a malformed or low-order peer key
    (RFC 7748 §6.1)."""
    _x25519_check_peer(peer_pub)
    return _x25519_check_shared(x25519(priv, peer_pub))


def x25519_ephemeral_shared(peer_pub):
    """(public key, shared secret) for a fresh ephemeral key and peer_pub: x25519_keypair() and
    x25519_shared() in one, sharing a single modular inversion (Montgomery's trick: invert
    a * b, then 1/a = b/(ab) and 1/b = a/(ab)).  ValueError as x25519_shared."""
    _x25519_check_peer(peer_pub)
    p = _C25519_P
    scalar = _x25519_clamp(secrets.token_bytes(32))
    _x, y, z, _t = _ed25519_base_mult(scalar.to_bytes(32, "little"))
    x2, z2 = _x25519_ladder(scalar, int.from_bytes(peer_pub, "little") & _C25519_M255)
    # Our public u = (z + y) / (z - y) (see _x25519_base_public); z - y is never 0 mod p, as the
    # clamped scalar is no multiple of the base point's order.  z2 = 0 (a low-order peer key)
    # zeroes the product, whose "inverse" is then 0: the shared secret comes out all zero.
    denominator = z - y
    inverse = _c25519_inverse(denominator * z2)
    public = (z + y) * z2 % p * inverse % p
    shared = x2 * denominator % p * inverse % p
    return public.to_bytes(32, "little"), _x25519_check_shared(shared.to_bytes(32, "little"))


def _x25519_check_peer(peer_pub):
    if len(peer_pub) != 32:
        raise ValueError(f"X25519 public key must be 32 bytes, got {len(peer_pub)}")


def _x25519_check_shared(shared):
    if hmac.compare_digest(shared, bytes(32)):
        raise ValueError("X25519 shared secret is all zero (low-order peer public key)")
    return shared


# === 5.2 Edwards25519 arithmetic (RFC 8032 §5.1) =================================================
# Points are extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.

def _ed25519_point_add(p1, p2):
    """P1 + P2 by the unified addition formulas of RFC 8032 §5.1.4."""
    p = _C25519_P
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % p
    b = (y1 + x1) * (y2 + x2) % p
    c = t1 * _ED25519_D2 * t2 % p
    d = 2 * z1 * z2 % p
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _ed25519_point_double(p1):
    """2 * P1 by the doubling formulas of RFC 8032 §5.1.4."""
    p = _C25519_P
    x1, y1, z1, _t1 = p1
    a = x1 * x1 % p
    b = y1 * y1 % p
    c = 2 * z1 * z1 % p
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % p
    g = a - b
    f = c + g
    return e * f % p, g * h % p, f * g % p, e * h % p


def _ed25519_point_neg(p1):
    x1, y1, z1, t1 = p1
    return -x1, y1, z1, -t1


def _ed25519_scalar_mult(s, p1):
    """[s]P1 by double-and-add.  Variable time: for public values only (verification)."""
    q = _ED25519_IDENTITY
    for bit in bin(s)[2:]:
        q = _ed25519_point_double(q)
        if bit == "1":
            q = _ed25519_point_add(q, p1)
    return q


def _ed25519_is_identity(p1):
    x1, y1, z1, _t1 = p1
    return x1 % _C25519_P == 0 and (y1 - z1) % _C25519_P == 0


def _ed25519_encode(p1):
    """RFC 8032 §5.1.2: y little-endian, with the low bit of x in bit 255."""
    x1, y1, z1, _t1 = p1
    zi = _c25519_inverse(z1)
    x = x1 * zi % _C25519_P
    y = y1 * zi % _C25519_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed25519_decode(data):
    """RFC 8032 §5.1.3: the point encoded in 32 bytes, or None if it is not a valid encoding."""
    p = _C25519_P
    if len(data) != 32:
        return None
    n = int.from_bytes(data, "little")
    x_0, y = n >> 255, n & _C25519_M255
    if y >= p:
        return None
    u = (y * y - 1) % p
    v = (_ED25519_D * y * y + 1) % p
    x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p  # candidate sqrt(u/v)
    vxx = v * x * x % p
    if vxx != u:
        if vxx != (-u) % p:
            return None  # u/v is not a square: no such point
        x = x * _ED25519_SQRT_M1 % p
    if x == 0 and x_0 == 1:
        return None
    if x & 1 != x_0:
        x = p - x
    return x, y, 1, x * y % p


# The base point: y = 4/5 and x even (RFC 8032 §5.1).
_ED25519_B = _ed25519_decode((4 * pow(5, -1, _C25519_P) % _C25519_P).to_bytes(32, "little"))

# rows[i][j] = j * 256^i * B as affine (y + x, y - x, 2*d*x*y); built by _ed25519_base_table().
_ed25519_base_rows = None


def _ed25519_base_table():
    global _ed25519_base_rows
    if _ed25519_base_rows is None:
        _ed25519_base_rows = _ed25519_build_base_table()
    return _ed25519_base_rows


def _ed25519_build_base_table():
    p = _C25519_P
    points = []
    step = _ED25519_B
    for _ in range(32):
        acc = _ED25519_IDENTITY
        for _ in range(256):
            points.append(acc)
            acc = _ed25519_point_add(acc, step)
        step = acc  # 256 * step, the next row's unit
    # Montgomery's batch inversion: one modular inverse and 3 products per point.
    prefix = []
    run = 1
    for pt in points:
        prefix.append(run)
        run = run * pt[2] % p
    inv = pow(run, -1, p)
    entries = [None] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x1, y1, z1, _t1 = points[i]
        zi = inv * prefix[i] % p  # 1 / z1
        inv = inv * z1 % p
        x, y = x1 * zi % p, y1 * zi % p
        entries[i] = ((y + x) % p, (y - x) % p, _ED25519_D2 * x % p * y % p)
    return [entries[i:i + 256] for i in range(0, len(entries), 256)]


def _ed25519_base_mult(scalar):
    """[s]B for the little-endian 32-byte scalar s: one table addition per byte.

    Returns extended coordinates whose values are bounded by 2^256 but not reduced mod p.
    """
    m = _C25519_M255
    x, y, z, t = _ED25519_IDENTITY
    # Mixed addition (RFC 8032 §5.1.4 formulas with Z2 = 1 and the table's y2+x2, y2-x2, 2*d*T2).
    # Invariant |x|, |y|, |z|, |t| < 2^256: the single-folded a, b, c stay under 2^262, so
    # e, f, g, h < 2^263, and their double-folded products are back under 2^256.
    for row, digit in zip(_ed25519_base_table(), scalar):
        ypx, ymx, t2d = row[digit]
        a = (y - x) * ymx
        a = (a & m) + 19 * (a >> 255)
        b = (y + x) * ypx
        b = (b & m) + 19 * (b >> 255)
        c = t * t2d
        c = (c & m) + 19 * (c >> 255)
        d = z + z
        e, f, g, h = b - a, d - c, d + c, b + a
        x = e * f
        x = (x & m) + 19 * (x >> 255)
        x = (x & m) + 19 * (x >> 255)
        y = g * h
        y = (y & m) + 19 * (y >> 255)
        y = (y & m) + 19 * (y >> 255)
        z = f * g
        z = (z & m) + 19 * (z >> 255)
        z = (z & m) + 19 * (z >> 255)
        t = e * h
        t = (t & m) + 19 * (t >> 255)
        t = (t & m) + 19 * (t >> 255)
    return x, y, z, t


# === 5.3 Ed25519 signatures (RFC 8032 §5.1.5-7) ==================================================

class Ed25519Key:
    """An Ed25519 private key from its 32-byte seed (RFC 8032 §5.1.5)."""

    def __init__(self, seed):
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        self._seed = bytes(seed)  # for PKCS#8 (PrivateKey.pkcs8_der)
        h = hashlib.sha512(seed).digest()
        self._scalar = _x25519_clamp(h[:32])  # Ed25519 prunes the first half just as X25519 clamps
        self._prefix = h[32:]
        self.public = _ed25519_encode(_ed25519_base_mult(self._scalar.to_bytes(32, "little")))

    def sign(self, msg):
        """The 64-byte signature R || S of msg (RFC 8032 §5.1.6)."""
        r = int.from_bytes(hashlib.sha512(self._prefix + msg).digest(), "little") % _ED25519_L
        r_enc = _ed25519_encode(_ed25519_base_mult(r.to_bytes(32, "little")))
        k = int.from_bytes(hashlib.sha512(r_enc + self.public + msg).digest(), "little")
        s = (r + k * self._scalar) % _ED25519_L
        return r_enc + s.to_bytes(32, "little")


# For tests and tools: the server never verifies signatures.
def ed25519_verify(pub, msg, sig):
    """True iff sig is a valid Ed25519 signature of msg under pub (RFC 8032 §5.1.7).

    Checks [S]B = R + [k]A without the cofactor 8, which §5.1.7 allows and OpenSSL also does.
    """
    if len(sig) != 64:
        return False
    a_pt = _ed25519_decode(pub)
    r_pt = _ed25519_decode(sig[:32])
    s = int.from_bytes(sig[32:], "little")
    if a_pt is None or r_pt is None or s >= _ED25519_L:
        return False
    k = int.from_bytes(hashlib.sha512(sig[:32] + pub + msg).digest(), "little") % _ED25519_L
    diff = _ed25519_point_add(_ed25519_base_mult(sig[32:]), _ed25519_point_neg(r_pt))
    diff = _ed25519_point_add(diff, _ed25519_point_neg(_ed25519_scalar_mult(k, a_pt)))
    return _ed25519_is_identity(diff)  # [S]B - R - [k]A


# === 5.4 P-256 and P-384: point arithmetic (FIPS 186-4) ===========================================
# NIST P-256 and P-384: ECDH and deterministic ECDSA, in pure Python.
#
# Written from FIPS 186-4 (curves, ECDSA), SEC 1 v2 (point encoding, ECDH) and
# RFC 6979 (deterministic k).  Not constant time: Python integers leak timing
# whatever the algorithm, so the code goes for speed and simplicity instead.
#
# Points inside the module are Jacobian triples (X, Y, Z) standing for the
# affine point (X/Z^2, Y/Z^3); Z == 0 is the point at infinity.  Table points
# are affine pairs (x, y).  Both curves have a = -3, which the doubling uses.

# Fixed-base window: the generator table holds, for every w-bit digit position
# i, the multiples j * 2^(w*i) * G for j = 1 .. 2^(w-1).  A scalar then costs
# one mixed addition per position and no doubling at all.  With w = 10 the
# table is 26 x 512 points for P-256 (2.5 MB, ~0.1 s to build) and 39 x 512
# for P-384 (4.3 MB, ~0.2 s), built on first use of each curve.
_ECP_BASE_WINDOW = 10
# wNAF width for an arbitrary point: 8 precomputed odd multiples (P .. 15P).
_ECP_POINT_WINDOW = 5


class _EcpCurve:
    """Short Weierstrass curve y^2 = x^3 - 3x + b over GF(p) with prime order n."""

    def __init__(self, name, p, b, gx, gy, n, hash_name):
        self.name = name
        self.p = p
        self.b = b
        self.gx = gx
        self.gy = gy
        self.n = n
        self.byte_len = (p.bit_length() + 7) // 8
        self.hash_name = hash_name
        self.base_table = None  # built on first use by _ecp_base_table()


SECP256R1 = _EcpCurve(
    "secp256r1",
    p=0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF,
    b=0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
    gx=0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    gy=0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
    n=0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    hash_name="sha256")

SECP384R1 = _EcpCurve(
    "secp384r1",
    p=int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFE"
          "FFFFFFFF0000000000000000FFFFFFFF", 16),
    b=int("B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
          "C656398D8A2ED19D2A85C8EDD3EC2AEF", 16),
    gx=int("AA87CA22BE8B05378EB1C71EF320AD746E1D3B628BA79B9859F741E082542A38"
           "5502F25DBF55296C3A545E3872760AB7", 16),
    gy=int("3617DE4A96262C6F5D9E98BF9292DC29F8F41DBD289A147CE9DA3113B5F0B8C0"
           "0A60B1CE1D7E819D7A431D7C90EA0E5F", 16),
    n=int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
          "581A0DB248B0A77AECEC196ACCC52973", 16),
    hash_name="sha384")


#
# Field elements are reduced with one '%' per expression rather than per
# product: in CPython the division behind '%' costs more than a multiplication.

def _ecp_double(x1, y1, z1, p):
    """2 * (X1, Y1, Z1) in Jacobian coordinates, using a = -3.

    With a = -3 the tangent slope numerator 3X^2 + aZ^4 factors as
    3(X - Z^2)(X + Z^2), saving two multiplications.  Infinity (Z = 0)
    doubles to infinity because Z3 = 2*Y1*Z1.
    """
    delta = z1 * z1 % p
    gamma = y1 * y1 % p
    beta = x1 * gamma % p
    alpha = 3 * (x1 - delta) * (x1 + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    z3 = 2 * y1 * z1 % p
    return x3, y3, z3


def _ecp_add_affine(x1, y1, z1, x2, y2, p):
    """(X1, Y1, Z1) + (x2, y2) with the second point affine ("mixed" addition).

    Complete for our use: handles infinity on the left and the two
    exceptional cases P == Q (doubling) and P == -Q (infinity).
    """
    if not z1:
        return x2, y2, 1
    zz = z1 * z1 % p
    h = (x2 * zz - x1) % p          # x2*Z1^2 - X1
    r = (y2 * zz * z1 - y1) % p     # y2*Z1^3 - Y1
    if not h:
        if not r:
            return _ecp_double(x2, y2, 1, p)
        return 0, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = x1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - y1 * hhh) % p
    return x3, y3, z1 * h % p


def _ecp_to_affine(x, y, z, p):
    """Affine (x, y) of a finite Jacobian point."""
    zinv = pow(z, -1, p)
    zinv2 = zinv * zinv % p
    return x * zinv2 % p, y * zinv2 * zinv % p


def _ecp_batch_to_affine(points, p):
    """Affine forms of many finite Jacobian points with a single inversion.

    Montgomery's trick: invert the product of all Z, then peel off each
    1/Z_i from the back using the prefix products.
    """
    prefix = []
    acc = 1
    for _, _, z in points:
        prefix.append(acc)
        acc = acc * z % p
    inv = pow(acc, -1, p)
    out = [None] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x, y, z = points[i]
        zinv = inv * prefix[i] % p
        inv = inv * z % p
        zinv2 = zinv * zinv % p
        out[i] = (x * zinv2 % p, y * zinv2 * zinv % p)
    return out


def _ecp_base_table(curve):
    """(offset, rows): the generator table of _ECP_BASE_WINDOW, built once per curve.

    rows[i][j] = j * 2^(w*i) * G (affine) for j = 1 .. 2^(w-1).  There are
    (bits + 2) // w + 1 rows, so that k + offset < 2^(w * rows) for every
    k < 2^(bits + 1) (see _ecp_mul_base for the offset).
    """
    if curve.base_table is None:
        p, w = curve.p, _ECP_BASE_WINDOW
        half = 1 << (w - 1)
        rows = []
        bx, by = curve.gx, curve.gy          # 2^(w*i) * G for the current row
        for _ in range((curve.n.bit_length() + 2) // w + 1):
            multiples = [(bx, by, 1)]
            for _ in range(half - 1):
                multiples.append(_ecp_add_affine(*multiples[-1], bx, by, p))
            row = [None] + _ecp_batch_to_affine(multiples, p)
            rows.append(row)
            bx, by = _ecp_to_affine(*_ecp_double(*row[half], 1, p), p)
        offset = sum(half << (w * i) for i in range(len(rows)))
        curve.base_table = (offset, rows)
    return curve.base_table


def _ecp_mul_base(curve, k):
    """k * G as a Jacobian triple, for 0 <= k < 2^(bits of n + 1).

    Signed digits halve the table: with offset = sum of 2^(w-1) * 2^(w*i),
    the base-2^w digits u_i of k + offset give k = sum (u_i - 2^(w-1)) 2^(w*i),
    each digit d_i = u_i - 2^(w-1) in [-2^(w-1), 2^(w-1)), and -d_i uses the
    negated table point (x, p - y).

    The mixed addition of _ecp_add_affine is written out in the loop because
    the call costs about a sixth of the time; its exceptional cases
    (infinity, equal x) fall back to the function.
    """
    p, w = curve.p, _ECP_BASE_WINDOW
    offset, rows = _ecp_base_table(curve)
    half = 1 << (w - 1)
    mask = (1 << w) - 1
    k += offset
    x, y, z = 0, 1, 0
    shift = 0
    for row in rows:
        d = (k >> shift & mask) - half
        shift += w
        if d > 0:
            tx, ty = row[d]
        elif d < 0:
            tx, ty = row[-d]
            ty = p - ty
        else:
            continue
        if z:
            zz = z * z % p
            h = (tx * zz - x) % p
            r = (ty * zz * z - y) % p
            if h:
                hh = h * h % p
                hhh = h * hh % p
                v = x * hh % p
                x = (r * r - hhh - 2 * v) % p
                y = (r * (v - x) - y * hhh) % p
                z = z * h % p
                continue
        x, y, z = _ecp_add_affine(x, y, z, tx, ty, p)
    return x, y, z


def _ecp_wnaf(k, w):
    """Width-w NAF of k, least significant first.

    Every digit is 0 or odd with |d| < 2^(w-1), and a nonzero digit is
    followed by at least w-1 zeros, so a 256-bit k needs about 256/(w+1)
    additions.
    """
    full = 1 << w
    half = full >> 1
    digits = []
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
        else:
            d = 0
        digits.append(d)
        k >>= 1
    return digits


def _ecp_mul_point(curve, k, px, py):
    """k * (px, py) as a Jacobian triple, for an affine point of order n.

    Left-to-right wNAF.  The doubling of _ecp_double is written out in the
    loop (it runs once per bit, and the call would cost about a sixth).
    """
    p = curve.p
    twice = _ecp_to_affine(*_ecp_double(px, py, 1, p), p)
    odd = [(px, py, 1)]                  # P, 3P, 5P, ...
    for _ in range((1 << (_ECP_POINT_WINDOW - 2)) - 1):
        odd.append(_ecp_add_affine(*odd[-1], *twice, p))
    odd = _ecp_batch_to_affine(odd, p)
    x, y, z = 0, 1, 0
    for d in reversed(_ecp_wnaf(k, _ECP_POINT_WINDOW)):
        delta = z * z % p
        gamma = y * y % p
        beta = x * gamma % p
        alpha = 3 * (x - delta) * (x + delta) % p
        z = 2 * y * z % p
        x = (alpha * alpha - 8 * beta) % p
        y = (alpha * (4 * beta - x) - 8 * gamma * gamma) % p
        if d > 0:
            tx, ty = odd[d >> 1]
            x, y, z = _ecp_add_affine(x, y, z, tx, ty, p)
        elif d < 0:
            tx, ty = odd[-d >> 1]
            x, y, z = _ecp_add_affine(x, y, z, tx, p - ty, p)
    return x, y, z


# === 5.5 P-256 and P-384: point encodings and checks (SEC 1) ======================================

def _ecp_check_scalar(curve, d):
    if not 1 <= d < curve.n:
        raise ValueError(f"{curve.name} private key out of range [1, n-1]")


def _ecp_encode_point(curve, x, y):
    """SEC 1 uncompressed encoding 0x04 || X || Y."""
    size = curve.byte_len
    return b"\x04" + x.to_bytes(size, "big") + y.to_bytes(size, "big")


def _ecp_decode_point(curve, data):
    """Affine (x, y) from an uncompressed point; ValueError unless valid and on the curve."""
    size = curve.byte_len
    if len(data) == 1 and data[0] == 0:
        raise ValueError(f"{curve.name} point is the point at infinity")
    if len(data) != 1 + 2 * size:
        raise ValueError(f"{curve.name} point must be {1 + 2 * size} bytes, got {len(data)}")
    if data[0] != 4:
        raise ValueError(f"{curve.name} point is not in uncompressed form (0x04)")
    p = curve.p
    x = int.from_bytes(data[1:1 + size], "big")
    y = int.from_bytes(data[1 + size:], "big")
    if x >= p or y >= p:
        raise ValueError(f"{curve.name} point coordinate is not below p")
    if (y * y - x * x * x + 3 * x - curve.b) % p:
        raise ValueError(f"{curve.name} point is not on the curve")
    return x, y


# === 5.6 P-256 and P-384: keys and ECDH (SEC 1 §3.3.1) ===========================================

def ec_public_key(curve, d):
    """Uncompressed public point d * G."""
    _ecp_check_scalar(curve, d)
    x, y = _ecp_to_affine(*_ecp_mul_base(curve, d), curve.p)
    return _ecp_encode_point(curve, x, y)


def ec_keypair(curve):
    """Fresh (d, uncompressed public point), d uniform in [1, n-1]."""
    d = 1 + secrets.randbelow(curve.n - 1)
    return d, ec_public_key(curve, d)


def ecdh_shared(curve, d, peer_pub):
    """SEC 1 ECDH: the x coordinate of d * peer_pub, byte_len bytes.

    The result cannot be infinity: the peer point is checked to be on a
    curve of prime order n (so it has order n) and 1 <= d < n.
    """
    _ecp_check_scalar(curve, d)
    px, py = _ecp_decode_point(curve, peer_pub)
    p = curve.p
    x, _, z = _ecp_mul_point(curve, d, px, py)
    zinv = pow(z, -1, p)
    return (x * zinv * zinv % p).to_bytes(curve.byte_len, "big")


# === 5.7 ECDSA (FIPS 186-4, RFC 6979) =============================================================

def _ecdsa_bits2int(data, qlen):
    """RFC 6979 bits2int (= FIPS 186-4 leftmost-bits rule): the first qlen bits as an integer."""
    value = int.from_bytes(data, "big")
    extra = len(data) * 8 - qlen
    return value >> extra if extra > 0 else value


def _ecdsa_rfc6979_nonces(curve, d, h1):
    """RFC 6979 section 3.2: endless stream of candidate k in [1, n-1] for key d and hash h1."""
    n = curve.n
    qlen = n.bit_length()
    rlen = (qlen + 7) // 8
    name = curve.hash_name
    seed = d.to_bytes(rlen, "big") + (_ecdsa_bits2int(h1, qlen) % n).to_bytes(rlen, "big")
    v = b"\x01" * len(h1)
    key = b"\x00" * len(h1)
    key = hmac.digest(key, v + b"\x00" + seed, name)
    v = hmac.digest(key, v, name)
    key = hmac.digest(key, v + b"\x01" + seed, name)
    v = hmac.digest(key, v, name)
    while True:
        t = b""
        while len(t) < rlen:
            v = hmac.digest(key, v, name)
            t += v
        k = _ecdsa_bits2int(t, qlen)
        if 1 <= k < n:
            yield k
        key = hmac.digest(key, v + b"\x00", name)
        v = hmac.digest(key, v, name)


def _ecdsa_der_integer(value):
    """DER INTEGER for value > 0: minimal big-endian bytes, plus a 0 byte if the top bit is set."""
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + bytes((len(raw),)) + raw


def _ecdsa_der_encode(r, s):
    """DER SEQUENCE { INTEGER r, INTEGER s }; at most 2 * (2 + 49) bytes, so short lengths
    suffice."""
    body = _ecdsa_der_integer(r) + _ecdsa_der_integer(s)
    return b"\x30" + bytes((len(body),)) + body


def _ecdsa_der_decode(sig):
    """(r, s) from a strictly DER-encoded signature, or None if it is not one."""
    if len(sig) < 2 or sig[0] != 0x30 or sig[1] >= 0x80 or sig[1] != len(sig) - 2:
        return None
    values = []
    pos = 2
    for _ in range(2):
        if pos + 2 > len(sig) or sig[pos] != 0x02:
            return None
        length = sig[pos + 1]
        body = sig[pos + 2:pos + 2 + length]
        if length == 0 or length >= 0x80 or len(body) != length:
            return None
        if body[0] & 0x80 or (length > 1 and body[0] == 0 and not body[1] & 0x80):
            return None  # negative, or not minimal
        values.append(int.from_bytes(body, "big"))
        pos += 2 + length
    if pos != len(sig):
        return None
    return values


def _ecdsa_fixed_length(k, n):
    """k + n or k + 2n, whichever has exactly one bit more than n (same point: nG = 0).

    Every nonce then has the same length, so the table loop's top digit is
    never zero and the signing time does not reveal that k is short: leaked
    leading zero bits of ECDSA nonces are what lattice attacks feed on.
    """
    k += n
    if k.bit_length() <= n.bit_length():
        k += n
    return k


class ECDSAKey:
    """ECDSA signing key; signatures use the curve's hash and RFC 6979 nonces."""

    def __init__(self, curve, d):
        _ecp_check_scalar(curve, d)
        self.curve = curve
        self._d = d
        # d * G by the variable-base multiplication, not ec_public_key: that builds the base
        # table (~100 ms and ~2.5 MiB for P-256), which only pure-Python signing needs.
        x, y = _ecp_to_affine(*_ecp_mul_point(curve, d, curve.gx, curve.gy), curve.p)
        self.public = _ecp_encode_point(curve, x, y)

    def sign(self, msg):
        """DER-encoded ECDSA signature of hash(msg) (FIPS 186-4 section 6.4)."""
        curve = self.curve
        n, p = curve.n, curve.p
        h1 = hashlib.new(curve.hash_name, msg).digest()
        e = _ecdsa_bits2int(h1, n.bit_length())
        for k in _ecdsa_rfc6979_nonces(curve, self._d, h1):
            x, _, z = _ecp_mul_base(curve, _ecdsa_fixed_length(k, n))
            zinv = pow(z, -1, p)
            r = x * zinv * zinv % p % n
            if r:
                s = pow(k, -1, n) * (e + r * self._d) % n
                if s:
                    return _ecdsa_der_encode(r, s)


# For tests and tools: the server never verifies signatures.
def ecdsa_verify(curve, pub, msg, der_sig):
    """True iff der_sig is a valid DER ECDSA signature of msg under the uncompressed point pub."""
    try:
        qx, qy = _ecp_decode_point(curve, pub)
    except ValueError:
        return False
    rs = _ecdsa_der_decode(der_sig)
    if rs is None:
        return False
    r, s = rs
    n, p = curve.n, curve.p
    if not (0 < r < n and 0 < s < n):
        return False
    e = _ecdsa_bits2int(hashlib.new(curve.hash_name, msg).digest(), n.bit_length())
    w = pow(s, -1, n)
    x1, y1, z1 = _ecp_mul_base(curve, e * w % n)
    # u2 = r/s is nonzero and Q has order n, so u2*Q is finite.
    x2, y2 = _ecp_to_affine(*_ecp_mul_point(curve, r * w % n, qx, qy), p)
    x, _, z = _ecp_add_affine(x1, y1, z1, x2, y2, p)
    if not z:
        return False
    zinv = pow(z, -1, p)
    return x * zinv * zinv % p % n == r


# === 5.8 AEAD ciphers; the AES block cipher (FIPS 197) ============================================
# AEAD ciphers for TLS 1.3 records: AES-GCM (FIPS 197, NIST SP 800-38D) and
# ChaCha20-Poly1305 (RFC 8439), in pure Python.
#
# Pure Python pays per interpreter operation, not per bit, so both ciphers work on
# many blocks at once inside big integers or bytes objects, and both have a second
# path for the short records that dominate a TLS handshake and small responses:
#
# - ChaCha20 keeps 32-bit words in 64-bit lanes of big ints (the high half spare so
#   carries never reach the next lane).  For a few blocks the four rows of the
#   state are four ints, so one quarter round does a whole column or diagonal
#   round; for many blocks each of the 16 state words gets its own int, one lane
#   per block.  Either way the 20 rounds run once for all N blocks.
# - AES-CTR stores N counter blocks "byte-sliced": one bytes object per state byte
#   position, holding that byte of every block.  SubBytes (with the round key
#   folded into the table) is then one bytes.translate per position, ShiftRows is
#   only a choice of which position to read, and MixColumns is a handful of XORs
#   and shifts on one big int holding all 16 positions.  Up to a few blocks,
#   T-tables encrypt one block at a time instead.
# - GHASH uses per-key tables that start small (cheap to build) and grow once a
#   key has hashed enough data to repay the bigger ones.
#
# Tags are compared with hmac.compare_digest, and `open` never returns or
# computes any plaintext before the tag has been checked.

class AEADError(ValueError):
    """Authentication failed, or the sealed data / nonce has a bad length."""


class _AEADInPlace:
    """seal_in_place and open_in_place, through seal and open: the record layer seals and opens
    records where they lie in a connection's buffers (section 6.5).  The pure ciphers copy
    anyway; libcrypto's (section 5.19) work on the buffer itself, through its address."""

    def seal_in_place(self, nonce, aad, view, address, n):
        """Encrypt view[:n] in place and write the 16-byte tag behind it.  address is that of
        view[0], for the backends that take pointers."""
        view[:n + 16] = self.seal(nonce, view[:n], aad)

    def open_in_place(self, nonce, aad, view, address, n):
        """Decrypt view[:n] in place if the tag in view[n:n + 16] is right, else AEADError
        (view may then hold unauthenticated bytes: the caller drops them)."""
        view[:n] = self.open(nonce, view[:n + 16], aad)


def _aead_xor(data, keystream):
    """XOR two equal-length byte strings, as big integers so the loop runs in C."""
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")


def _aes_make_sbox():
    """S-box from its definition: inverse in GF(2^8) mod x^8+x^4+x^3+x+1, then the affine map."""
    exp = [0] * 255
    log = [0] * 256
    v = 1
    for i in range(255):                       # 3 = x + 1 generates the multiplicative group
        exp[i] = v
        log[v] = i
        v ^= ((v << 1) ^ (0x11b if v & 0x80 else 0))
    sbox = bytearray(256)
    for a in range(256):
        b = exp[(255 - log[a]) % 255] if a else 0
        s = b
        for shift in range(1, 5):              # b ^ rotl(b,1) ^ ... ^ rotl(b,4) == FIPS 197 eq. 5.1
            s ^= ((b << shift) | (b >> (8 - shift))) & 0xff
        sbox[a] = s ^ 0x63
    return bytes(sbox)


_AES_SBOX = _aes_make_sbox()
_AES_BYTES_ONES = int.from_bytes(b"\x01" * 256, "big")


def _aes_xor_table(table, k):
    """The 256-byte table with every byte XORed with k."""
    return (int.from_bytes(table, "big") ^ (k * _AES_BYTES_ONES)).to_bytes(256, "big")


# _AES_SUB_XOR[k] is the translate table x -> S(x ^ k): AddRoundKey folded into SubBytes.
_AES_SUB_XOR = [_aes_xor_table(bytes(range(256)), k).translate(_AES_SBOX) for k in range(256)]

# The byte-sliced state keeps its 16 planes in row-major order: position
# p = 4*row + col holds AES state byte row + 4*col (FIPS 197 numbers the bytes
# column by column).  Rows are then contiguous, so MixColumns' "next row" is a
# rotation of the whole big int by four planes.
_AES_PLANE_INDEX = tuple(r + 4 * c for r in range(4) for c in range(4))
# ShiftRows: s'[r][c] = s[r][(c + r) % 4], so position 4r+c reads position
# 4r + (c+r)%4, which holds AES byte r + 4*((c+r)%4).
_AES_SHIFT_SRC = tuple(4 * r + (c + r) % 4 for r in range(4) for c in range(4))
_AES_SHIFT_INDEX = tuple(r + 4 * ((c + r) % 4) for r in range(4) for c in range(4))
_AES_RCON = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1b, 0x36)


def _aes_sub_word(word):
    """SubWord: the S-box on each byte of a 32-bit word."""
    return int.from_bytes(word.to_bytes(4, "big").translate(_AES_SBOX), "big")


def _aes_expand_key(key):
    """FIPS 197 KeyExpansion -> list of Nr+1 round keys of 16 bytes."""
    nk = len(key) // 4
    nr = nk + 6
    words = list(struct.unpack(f">{nk}I", key))
    for i in range(nk, 4 * (nr + 1)):
        t = words[i - 1]
        if i % nk == 0:
            t = _aes_sub_word(((t << 8) | (t >> 24)) & 0xffffffff) ^ (_AES_RCON[i // nk - 1] << 24)
        elif nk > 6 and i % nk == 4:
            t = _aes_sub_word(t)
        words.append(words[i - nk] ^ t)
    return [struct.pack(">4I", *words[4 * r:4 * r + 4]) for r in range(nr + 1)]


class _AESSchedule:
    """Per-key translate tables for the byte-sliced cipher (built once per key).

    rounds[r][p]: SubBytes with round key r folded in, for the plane that
    ShiftRows moves to position p, in the rounds that end with MixColumns.
    final[p]: the same for the last round, which also folds in the last round
    key (S(x ^ k_Nr-1) ^ k_Nr), so its output needs no further XOR."""

    def __init__(self, key):
        if len(key) not in (16, 32):
            raise ValueError(f"AES key must be 16 or 32 bytes, got {len(key)}")
        round_keys = _aes_expand_key(bytes(key))
        self.rounds = [[_AES_SUB_XOR[rk[i]] for i in _AES_SHIFT_INDEX] for rk in round_keys[:-2]]
        last_in, last_out = round_keys[-2], round_keys[-1]
        self.final = [_aes_xor_table(_AES_SUB_XOR[last_in[i]], last_out[j])
                      for i, j in zip(_AES_SHIFT_INDEX, _AES_PLANE_INDEX)]

    def encrypt_planes(self, state, n):
        """Encrypt n blocks given as 16 row-major planes of n bytes (joined into
        `state`); return the ciphertext blocks in ordinary order (16*n bytes)."""
        low3 = (1 << (96 * n)) - 1          # rows 1..3, which move up one row
        low2 = (1 << (64 * n)) - 1          # rows 2..3, which move up two rows
        top_bits = int.from_bytes(b"\x80" * (16 * n), "big")
        for tables in self.rounds:
            s = int.from_bytes(b"".join([state[q * n:q * n + n].translate(t)
                                         for q, t in zip(_AES_SHIFT_SRC, tables)]), "big")
            # MixColumns on every column of every block at once, with rows
            # a0..a3 of the big int: out_r = 2*(a_r ^ a_r+1) ^ (a0^a1^a2^a3) ^ a_r,
            # which equals the FIPS 197 2*a_r ^ 3*a_r+1 ^ a_r+2 ^ a_r+3.
            u = s ^ (((s & low3) << (32 * n)) | (s >> (96 * n)))        # u_r = a_r ^ a_r+1
            total = u ^ (((u & low2) << (64 * n)) | (u >> (64 * n)))    # u_r ^ u_r+2
            # xtime on every byte at once: shift each byte left without its top
            # bit, and XOR 0x1b into the bytes whose top bit was set.
            top = u & top_bits
            s ^= total ^ ((u ^ top) << 1) ^ ((top >> 7) * 0x1b)
            state = s.to_bytes(16 * n, "big")
        out = bytearray(16 * n)
        for q, t, j in zip(_AES_SHIFT_SRC, self.final, _AES_PLANE_INDEX):
            out[j::16] = state[q * n:q * n + n].translate(t)
        return bytes(out)


# One block at a time, for the hash key H, the tag mask and the keystream of short records, where
# the byte-sliced cipher's fixed cost per call (some 50 us) would dominate: "T-tables" fold
# SubBytes, ShiftRows and MixColumns of each state byte into one table look-up of its 128-bit
# contribution to the round output, so a round is 16 look-ups, 16 XORs and the round key.

# Column r of the MixColumns matrix (FIPS 197 eq. 5.6): the multiples of a row-r input byte
# that land in rows 0..3 of its output column.
_AES_MIX_COLUMNS = ((2, 1, 1, 3), (3, 2, 1, 1), (1, 3, 2, 1), (1, 1, 3, 2))
# ShiftRows for state bytes in FIPS 197 order (byte r + 4c is row r, column c): output byte
# r + 4c is input byte r + 4((c + r) mod 4).
_AES_SHIFT_ROWS = tuple(r + 4 * ((c + r) % 4) for c in range(4) for r in range(4))
_aes_t_tables = None


def _aes_gf_mul(a, k):
    """a * k in GF(2^8) for the MixColumns factors k = 1, 2, 3."""
    doubled = ((a << 1) ^ 0x11b) if a & 0x80 else a << 1
    return (a, doubled, doubled ^ a)[k - 1]


def _aes_build_t_tables():
    """tables[q][x]: the round output, as a big-endian 128-bit int, of state byte q = x alone."""
    tables = []
    for q in range(16):
        row, column = q % 4, q // 4
        out_column = (column - row) % 4           # where ShiftRows moves it
        shift = 32 * (3 - out_column)
        factors = _AES_MIX_COLUMNS[row]
        tables.append([int.from_bytes(bytes(_aes_gf_mul(_AES_SBOX[x], k) for k in factors), "big")
                       << shift for x in range(256)])
    return tables


def _aes_round_key_ints(key):
    """The FIPS 197 round keys of key as 128-bit big-endian ints (ValueError on a bad key size)."""
    if len(key) not in (16, 32):
        raise ValueError(f"AES key must be 16 or 32 bytes, got {len(key)}")
    return [int.from_bytes(rk, "big") for rk in _aes_expand_key(bytes(key))]


def _aes_encrypt_int(round_keys, block):
    """Encrypt one block given as a 128-bit big-endian int; returns an int."""
    global _aes_t_tables
    if _aes_t_tables is None:
        _aes_t_tables = _aes_build_t_tables()
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = _aes_t_tables
    s = block ^ round_keys[0]
    for i in range(1, len(round_keys) - 1):
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = s.to_bytes(16, "big")
        s = (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7] ^ t8[b8]
             ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15]
             ^ round_keys[i])
    # Last round: no MixColumns, so ShiftRows is a byte permutation and SubBytes a translate.
    state = s.to_bytes(16, "big")
    shifted = bytes([state[i] for i in _AES_SHIFT_ROWS]).translate(_AES_SBOX)
    return int.from_bytes(shifted, "big") ^ round_keys[-1]


# For tests and tools: the server encrypts through AESGCM only.
def aes_encrypt_block(key, block16):
    """Encrypt one 16-byte block with AES-128 or AES-256 (FIPS 197 Cipher)."""
    round_keys = _aes_round_key_ints(key)
    if len(block16) != 16:
        raise ValueError(f"AES block must be 16 bytes, got {len(block16)}")
    return _aes_encrypt_int(round_keys, int.from_bytes(block16, "big")).to_bytes(16, "big")


# === 5.9 AES-GCM (SP 800-38D) =====================================================================
#
# GHASH multiplies by H through per-key tables of H times every value of one block position.
# Tables per nibble position (32 of 16 entries) take ~45 us to build and hash a block in
# ~1.3 us; tables per byte position (16 of 256) hash in ~0.8 us but take another ~140 us to
# build from the nibble ones.  A key starts with nibble tables and builds the byte tables once
# it has hashed _GCM_BYTE_TABLES_AFTER blocks, about where they would have paid for themselves:
# handshake keys and short connections never pay for them, a bulk transfer soon does.

_GCM_R = 0xe1 << 120        # x^128 = x^7 + x^2 + x + 1, in GCM's reflected bit order
_GCM_BYTE_TABLES_AFTER = 256
_GCM_HIGH_NIBBLES = bytes(b >> 4 for b in range(256))
_GCM_LOW_NIBBLES = bytes(b & 15 for b in range(256))
# First bit (power of x) of nibble positions 0..31: high nibbles of bytes 0..15, then low nibbles.
_GCM_NIBBLE_STARTS = tuple(range(0, 128, 8)) + tuple(range(4, 128, 8))
# Below this many blocks (J0 included) the T-table cipher beats the byte-sliced one.
_AES_SLICED_MIN_BLOCKS = 8


def _gcm_nibble_tables(h):
    """32 tables of 16 entries: tables[i][v] = (nibble v at nibble position i) * H, where
    positions 0..15 are the high nibbles of bytes 0..15 and 16..31 their low nibbles.

    A GCM block is a big-endian 128-bit int whose most significant bit is the
    coefficient of x^0, so multiplying by x is a right shift with reduction."""
    powers = []                             # x^k * H for k = 0 .. 127
    v = h
    for _ in range(128):
        powers.append(v)
        v = (v >> 1) ^ (_GCM_R if v & 1 else 0)
    # The nibble starting at bit k has bit values 8, 4, 2, 1 for x^k .. x^(k+3); its table is
    # every XOR of one of (0, 4, 8, 12) times H with one of (0, 1, 2, 3) times H.  One flat
    # comprehension for all 512 entries: 32 small ones cost twice as much.
    halves = [((0, p4, p8, p8 ^ p4), (0, p1, p2, p2 ^ p1))
              for p8, p4, p2, p1 in [powers[k:k + 4] for k in _GCM_NIBBLE_STARTS]]
    flat = [hi ^ lo for his, los in halves for hi in his for lo in los]
    return [flat[i:i + 16] for i in range(0, 512, 16)]


def _gcm_byte_tables(nibble_tables):
    """16 tables of 256 entries for byte positions, each the XOR of its two nibble tables."""
    return [[hi ^ lo for hi in nibble_tables[i] for lo in nibble_tables[16 + i]] for i in range(16)]


def _gcm_ghash_nibbles(tables, data):
    """GHASH over data (a multiple of 16 bytes) with nibble tables: Y = (Y ^ X_i) * H per block."""
    (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15,
     u0, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13, u14, u15) = tables
    y = 0
    for i in range(0, len(data), 16):
        block = (y ^ int.from_bytes(data[i:i + 16], "big")).to_bytes(16, "big")
        h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15 = \
            block.translate(_GCM_HIGH_NIBBLES)
        l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15 = \
            block.translate(_GCM_LOW_NIBBLES)
        y = (t0[h0] ^ t1[h1] ^ t2[h2] ^ t3[h3] ^ t4[h4] ^ t5[h5] ^ t6[h6] ^ t7[h7]
             ^ t8[h8] ^ t9[h9] ^ t10[h10] ^ t11[h11] ^ t12[h12] ^ t13[h13] ^ t14[h14] ^ t15[h15]
             ^ u0[l0] ^ u1[l1] ^ u2[l2] ^ u3[l3] ^ u4[l4] ^ u5[l5] ^ u6[l6] ^ u7[l7]
             ^ u8[l8] ^ u9[l9] ^ u10[l10] ^ u11[l11] ^ u12[l12] ^ u13[l13] ^ u14[l14] ^ u15[l15])
    return y


def _gcm_ghash(tables, data):
    """GHASH over data (a multiple of 16 bytes) with byte tables: Y = (Y ^ X_i) * H per block."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = tables
    y = 0
    for i in range(0, len(data), 16):
        (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14,
         b15) = (y ^ int.from_bytes(data[i:i + 16], "big")).to_bytes(16, "big")
        y = (t0[b0] ^ t1[b1] ^ t2[b2] ^ t3[b3] ^ t4[b4] ^ t5[b5] ^ t6[b6] ^ t7[b7]
             ^ t8[b8] ^ t9[b9] ^ t10[b10] ^ t11[b11] ^ t12[b12] ^ t13[b13] ^ t14[b14] ^ t15[b15])
    return y


def _aead_pad16(data):
    return b"\x00" * (-len(data) % 16)


class AESGCM(_AEADInPlace):
    """AES-128-GCM / AES-256-GCM with 12-byte nonces and 16-byte tags."""

    def __init__(self, key):
        self._round_keys = _aes_round_key_ints(key)
        self._key = bytes(key)
        self._sliced = None                 # the byte-sliced _AESSchedule, built for a long record
        self._nibble_tables = _gcm_nibble_tables(_aes_encrypt_int(self._round_keys, 0))
        self._byte_tables = None
        self._hashed_blocks = 0

    def _keystream(self, nonce, nblocks):
        """E(K, J0) followed by nblocks of CTR keystream (counters 2, 3, ...)."""
        if nblocks > (1 << 32) - 2:        # SP 800-38D: at most 2^39 - 256 bits of plaintext
            raise ValueError("AES-GCM message too long")
        n = nblocks + 1
        if n < _AES_SLICED_MIN_BLOCKS:
            j0 = int.from_bytes(nonce, "big") << 32 | 1
            return b"".join([_aes_encrypt_int(self._round_keys, j0 + i).to_bytes(16, "big")
                             for i in range(n)])
        if self._sliced is None:
            self._sliced = _AESSchedule(self._key)
        counters = struct.pack(f">{n}I", *range(1, n + 1))    # J0 = nonce || 1
        planes = [nonce[i:i + 1] * n if i < 12 else counters[i - 12::4] for i in _AES_PLANE_INDEX]
        return self._sliced.encrypt_planes(b"".join(planes), n)

    def _ghash(self, data):
        if self._byte_tables is None:
            self._hashed_blocks += len(data) // 16
            if self._hashed_blocks < _GCM_BYTE_TABLES_AFTER:
                return _gcm_ghash_nibbles(self._nibble_tables, data)
            self._byte_tables = _gcm_byte_tables(self._nibble_tables)
        return _gcm_ghash(self._byte_tables, data)

    def _tag(self, aad, ciphertext, mask):
        lengths = struct.pack(">QQ", 8 * len(aad), 8 * len(ciphertext))
        s = self._ghash(b"".join((aad, _aead_pad16(aad), ciphertext, _aead_pad16(ciphertext),
                                  lengths)))
        return (s ^ int.from_bytes(mask, "big")).to_bytes(16, "big")

    def seal(self, nonce, plaintext, aad):
        if len(nonce) != 12:
            raise ValueError(f"AES-GCM nonce must be 12 bytes, got {len(nonce)}")
        nonce, plaintext, aad = bytes(nonce), bytes(plaintext), bytes(aad)
        n = len(plaintext)
        ks = self._keystream(nonce, (n + 15) // 16)
        ciphertext = _aead_xor(plaintext, ks[16:16 + n])
        return ciphertext + self._tag(aad, ciphertext, ks[:16])

    def open(self, nonce, data, aad):
        if len(nonce) != 12:
            raise AEADError(f"AES-GCM nonce must be 12 bytes, got {len(nonce)}")
        if len(data) < 16:
            raise AEADError("AES-GCM input shorter than the tag")
        nonce, data, aad = bytes(nonce), bytes(data), bytes(aad)
        ciphertext, tag = data[:-16], data[-16:]
        n = len(ciphertext)
        ks = self._keystream(nonce, (n + 15) // 16)
        if not hmac.compare_digest(self._tag(aad, ciphertext, ks[:16]), tag):
            raise AEADError("AES-GCM authentication failed")
        return _aead_xor(ciphertext, ks[16:16 + n])


# === 5.10 ChaCha20 (RFC 8439) =====================================================================
#
# Two layouts, both with one 64-bit lane per 32-bit word (the value in the low half, the high
# half spare so that carries never reach the next lane):
#
# - Row layout, for a few blocks: four big ints, one per row of the 4x4 state, lane c*n + j
#   holding column c of block j.  A column round is then ONE quarter round on the four rows,
#   and a diagonal round is the same after rotating rows b, c, d by 1, 2, 3 columns.  About
#   800 big-int operations whatever n is, so a short TLS record costs little more than its
#   Poly1305 key block.
# - Word layout, for many blocks: sixteen big ints, one per state word, lane j for block j.
#   Eight quarter rounds per double round, but each operation covers all n blocks and there
#   are no column rotations, so it does less work per block once n is large.

_CHACHA_CONSTANTS = (0x61707865, 0x3320646e, 0x79622d32, 0x6b206574)
# Column rounds then diagonal rounds (RFC 8439 section 2.3), by state word index.
_CHACHA_QUARTERS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                    (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))
# Measured crossover of the two layouts (CPython 3.11): the row layout wins up to here.
_CHACHA_ROW_LAYOUT_MAX_BLOCKS = 36


def _chacha_quarter(a, b, c, d, m):
    """RFC 8439 quarter round on every 64-bit lane at once (word layout).  Lanes hold clean
    32-bit values; (x << n | x >> 32-n) & m is a 32-bit rotation because the
    bits pushed out either way land in a spare upper half and are masked off."""
    a = (a + b) & m
    d ^= a
    d = ((d << 16) | (d >> 16)) & m
    c = (c + d) & m
    b ^= c
    b = ((b << 12) | (b >> 20)) & m
    a = (a + b) & m
    d ^= a
    d = ((d << 8) | (d >> 24)) & m
    c = (c + d) & m
    b ^= c
    b = ((b << 7) | (b >> 25)) & m
    return a, b, c, d


def _chacha20_state(key, nonce, counter, nblocks):
    """The 64-byte initial state (RFC 8439 2.3) of nblocks blocks from counter on."""
    if counter + nblocks > 1 << 32:
        raise ValueError("ChaCha20 block counter would overflow")
    return struct.pack("<4I32sI12s", *_CHACHA_CONSTANTS, bytes(key), counter, bytes(nonce))


def _chacha20_blocks(key, nonce, counter, nblocks):
    """Keystream blocks counter .. counter+nblocks-1 (64 bytes each)."""
    state = _chacha20_state(key, nonce, counter, nblocks)
    if nblocks <= _CHACHA_ROW_LAYOUT_MAX_BLOCKS:
        return _chacha20_row_layout([(state, nblocks)])
    return _chacha20_word_layout(state, nblocks)


def _chacha20_keystreams(jobs):
    """The keystreams of several (key, nonce, block count) jobs, each from counter 0.

    A row-layout pass costs about the same for 2 blocks as for 20, so jobs that fit in one
    pass share it: the records a TLS flight seals, or a response and its close_notify.
    """
    total = sum(nblocks for _, _, nblocks in jobs)
    if total > _CHACHA_ROW_LAYOUT_MAX_BLOCKS:
        return [_chacha20_blocks(key, nonce, 0, nblocks) for key, nonce, nblocks in jobs]
    blocks = _chacha20_row_layout([(_chacha20_state(key, nonce, 0, nblocks), nblocks)
                                   for key, nonce, nblocks in jobs])
    streams, pos = [], 0
    for _, _, nblocks in jobs:
        streams.append(blocks[pos:pos + 64 * nblocks])
        pos += 64 * nblocks
    return streams


_chacha_row_geometry_cache = {}


def _chacha_row_geometry(n):
    """Per block count n (built once): the lane mask, the column shift s = 64n, masks of the
    low 1, 2, 3 columns, and the counter offsets 0 .. n-1 in the lanes of column 0."""
    geometry = _chacha_row_geometry_cache.get(n)
    if geometry is None:
        s = 64 * n
        geometry = _chacha_row_geometry_cache[n] = (
            int.from_bytes(b"\xff\xff\xff\xff\x00\x00\x00\x00" * (4 * n), "little"), s,
            (1 << s) - 1, (1 << 2 * s) - 1, (1 << 3 * s) - 1,
            int.from_bytes(struct.pack(f"<{n}Q", *range(n)), "little"))
    return geometry


def _chacha20_row_layout(jobs):
    """The keystream blocks of jobs [(64-byte initial state, block count), ...], n blocks in
    all, one big int per state row; lane j of a column is the j-th block of the jobs in order.

    Rows b and d are kept clean (32-bit lanes), as a rotation needs.  Rows a and c are only
    ever added to and XORed into a value that is masked before its rotation, so they are left
    unmasked: after the 40 additions of 20 rounds they stay below 2^38, inside their lanes.
    """
    n = sum(count for _, count in jobs)
    m, s, low1, low2, low3, counter_steps = _chacha_row_geometry(n)
    s2, s3 = 2 * s, 3 * s
    # Each state word as an 8-byte lane, repeated for its job's blocks: its column of the row.
    words = [(struct.pack("<16Q", *struct.unpack("<16I", state)), count) for state, count in jobs]
    lanes = b"".join([word[i:i + 8] * count for i in range(0, 128, 8) for word, count in words])
    size = 32 * n
    a0, b0, c0, d0 = [int.from_bytes(lanes[i:i + size], "little") for i in range(0, 4 * size, size)]
    if len(jobs) > 1:   # each job counts its blocks from its own counter
        counter_steps = int.from_bytes(struct.pack(f"<{n}Q", *[
            j for _, count in jobs for j in range(count)]), "little")
    d0 += counter_steps
    a, b, c, d = a0, b0, c0, d0
    # The quarter round is written out for both half-rounds instead of called: at these sizes
    # the call itself costs more than the arithmetic.
    for _ in range(10):
        # Column round: the quarter round on (a_i, b_i, c_i, d_i) for the four columns i.
        a += b
        d = (d ^ a) & m
        d = ((d << 16) | (d >> 16)) & m
        c += d
        b = (b ^ c) & m
        b = ((b << 12) | (b >> 20)) & m
        a += b
        d = (d ^ a) & m
        d = ((d << 8) | (d >> 24)) & m
        c += d
        b = (b ^ c) & m
        b = ((b << 7) | (b >> 25)) & m
        # Diagonalise: lane i of b, c, d takes column i+1, i+2, i+3 (mod 4).
        b = (b >> s) | ((b & low1) << s3)
        c = (c >> s2) | ((c & low2) << s2)
        d = (d >> s3) | ((d & low3) << s)
        # Diagonal round: the quarter round on (a_i, b_i+1, c_i+2, d_i+3).
        a += b
        d = (d ^ a) & m
        d = ((d << 16) | (d >> 16)) & m
        c += d
        b = (b ^ c) & m
        b = ((b << 12) | (b >> 20)) & m
        a += b
        d = (d ^ a) & m
        d = ((d << 8) | (d >> 24)) & m
        c += d
        b = (b ^ c) & m
        b = ((b << 7) | (b >> 25)) & m
        # Back to columns.
        b = (b >> s3) | ((b & low3) << s)
        c = (c >> s2) | ((c & low2) << s2)
        d = (d >> s) | ((d & low1) << s3)
    return _chacha_gather_rows(((a + a0) & m, (b + b0) & m, (c + c0) & m, (d + d0) & m), n)


def _chacha_gather_rows(rows, n):
    """Serialize the row layout into n blocks of 64 bytes.

    x | x >> (s - 32) puts column c+1 into the high half of column c's lane, so columns 0 and 2
    then hold the 8-byte word pairs (0, 1) and (2, 3) of each block, copied into place through
    8-byte memoryviews (a plain copy, so the native byte order does not matter).
    """
    out = bytearray(64 * n)
    slots = memoryview(out).cast("Q")
    shift = 64 * n - 32
    for r, x in enumerate(rows):
        pairs = memoryview((x | (x >> shift)).to_bytes(32 * n, "little")).cast("Q")
        slots[2 * r::8] = pairs[:n]
        slots[2 * r + 1::8] = pairs[2 * n:3 * n]
    return bytes(out)


def _chacha20_word_layout(state, n):
    """n keystream blocks from the 64-byte initial state, one big int per state word."""
    ones = int.from_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00" * n, "little")    # 1 in every lane
    m = ones * 0xffffffff
    init = [w * ones for w in struct.unpack("<16I", state)]
    init[12] += int.from_bytes(struct.pack(f"<{n}Q", *range(n)), "little")
    x = list(init)
    for _ in range(10):
        for a, b, c, d in _CHACHA_QUARTERS:
            x[a], x[b], x[c], x[d] = _chacha_quarter(x[a], x[b], x[c], x[d], m)
    # Serialize: pair words 2k, 2k+1 into one 64-bit lane per block, then copy
    # those 8-byte lanes into their slots of each 64-byte block via 8-byte
    # memoryviews (a plain copy, so the native byte order does not matter).
    out = bytearray(64 * n)
    slots = memoryview(out).cast("Q")
    for k in range(8):
        lo = (x[2 * k] + init[2 * k]) & m
        hi = (x[2 * k + 1] + init[2 * k + 1]) & m
        slots[k::8] = memoryview((lo | (hi << 32)).to_bytes(8 * n, "little")).cast("Q")
    return bytes(out)


# === 5.11 Poly1305 and ChaCha20-Poly1305 (RFC 8439) ===============================================

_POLY1305_P = (1 << 130) - 5


def _poly1305_mac(key32, msg):
    """Poly1305 tag of msg under the one-time key (r || s)."""
    p = _POLY1305_P
    r = int.from_bytes(key32[:16], "little") & 0x0ffffffc0ffffffc0ffffffc0fffffff
    s = int.from_bytes(key32[16:32], "little")
    full = len(msg) - len(msg) % 16
    quad = full - full % 64
    acc = _poly1305_quads(msg, quad, r) if quad else 0
    for i in range(quad, full, 16):
        acc = (acc + int.from_bytes(msg[i:i + 16], "little") + (1 << 128)) * r % p
    if full < len(msg):                     # final partial block gets a 0x01 byte appended
        acc = (acc + int.from_bytes(msg[full:] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def _poly1305_quads(msg, end, r):
    """The Poly1305 accumulator after msg[:end] (a multiple of 64 bytes), four blocks per step:
    acc = (acc + c1)*r^4 + c2*r^3 + c3*r^2 + c4*r, one reduction instead of four.  Each
    c_i = m_i + 2^128; the 2^128 parts are the constant `pads`."""
    p = _POLY1305_P
    r2 = r * r % p
    r3 = r2 * r % p
    r4 = r3 * r % p
    pads = (r4 + r3 + r2 + r) << 128
    acc = 0
    for i in range(0, end, 64):
        acc = ((acc + int.from_bytes(msg[i:i + 16], "little")) * r4
               + int.from_bytes(msg[i + 16:i + 32], "little") * r3
               + int.from_bytes(msg[i + 32:i + 48], "little") * r2
               + int.from_bytes(msg[i + 48:i + 64], "little") * r + pads) % p
    return acc


class ChaCha20Poly1305(_AEADInPlace):
    """RFC 8439 AEAD_CHACHA20_POLY1305 with 12-byte nonces."""

    def __init__(self, key):
        if len(key) != 32:
            raise ValueError(f"ChaCha20-Poly1305 key must be 32 bytes, got {len(key)}")
        self._key = bytes(key)
        self._ready = {}   # nonce -> keystream made ahead by chacha20_poly1305_prefetch

    def _keystream(self, nonce, n):
        """Poly1305 key block and keystream for n bytes under nonce: the one made ahead if it
        is long enough (taken, so it serves one call), else a fresh one."""
        ks = self._ready.pop(nonce, None)
        if ks is None or len(ks) < 64 + n:
            ks = _chacha20_blocks(self._key, nonce, 0, 1 + (n + 63) // 64)
        return ks

    def _tag(self, otk, aad, ciphertext):
        lengths = struct.pack("<QQ", len(aad), len(ciphertext))
        return _poly1305_mac(otk, b"".join(
            (aad, _aead_pad16(aad), ciphertext, _aead_pad16(ciphertext), lengths)))

    def seal(self, nonce, plaintext, aad):
        if len(nonce) != 12:
            raise ValueError(f"ChaCha20-Poly1305 nonce must be 12 bytes, got {len(nonce)}")
        nonce, plaintext, aad = bytes(nonce), bytes(plaintext), bytes(aad)
        n = len(plaintext)
        ks = self._keystream(nonce, n)    # block 0 -> Poly1305 key
        ciphertext = _aead_xor(plaintext, ks[64:64 + n])
        return ciphertext + self._tag(ks[:32], aad, ciphertext)

    def open(self, nonce, data, aad):
        if len(nonce) != 12:
            raise AEADError(f"ChaCha20-Poly1305 nonce must be 12 bytes, got {len(nonce)}")
        if len(data) < 16:
            raise AEADError("ChaCha20-Poly1305 input shorter than the tag")
        nonce, data, aad = bytes(nonce), bytes(data), bytes(aad)
        ciphertext, tag = data[:-16], data[-16:]
        n = len(ciphertext)
        ks = self._keystream(nonce, n)
        if not hmac.compare_digest(self._tag(ks[:32], aad, ciphertext), tag):
            raise AEADError("ChaCha20-Poly1305 authentication failed")
        return _aead_xor(ciphertext, ks[64:64 + n])


def chacha20_poly1305_prefetch(requests):
    """Make the keystreams of coming seal/open calls in one ChaCha20 pass: requests are
    (ChaCha20Poly1305, 12-byte bytes nonce, plaintext length), distinct nonces per key.  Each
    keystream is kept by its AEAD until the call with that nonce takes it; one already made is
    kept.  A call that turns out longer than its request simply makes its own keystream."""
    requests = [(aead, nonce, n) for aead, nonce, n in requests if nonce not in aead._ready]
    if not requests:
        return
    jobs = [(aead._key, nonce, 1 + (n + 63) // 64) for aead, nonce, n in requests]
    for (aead, nonce, _), ks in zip(requests, _chacha20_keystreams(jobs)):
        aead._ready[nonce] = ks


# === 5.12 ML-KEM-768 encapsulation (FIPS 203) =====================================================
# ML-KEM.Encaps (FIPS 203 Algorithm 20) for the parameter set ML-KEM-768: k = 3, eta1 = eta2 = 2,
# du = 10, dv = 4.  Only encapsulation is needed: the server answers a client's key share.
#
# Straight from the spec, an encapsulation costs about 3.8 ms in CPython; this one about 0.5 ms.
# Its measures:
#
# * The NTT as a convolution, and a convolution as one big-integer multiply.  The NTT (Algorithm
#   9) maps f = F0(X^2) + X*F1(X^2) to the residues f mod (X^2 - g_k), that is to F0(g_k) and
#   F1(g_k) at the 128 points g_k = zeta^(2*BitRev7(k) + 1) (FIPS 203's gamma), zeta = 17.  In
#   "point order" r = BitRev7(k) the points are p_r = zeta^(2r + 1), and since
#   (2r + 1)m = r^2 + (m^2 + m) - (r - m)^2, for F = F0 or F1
#       F(p_r) = zeta^(r^2) * sum_m [F_m zeta^(m^2 + m)] zeta^(-(r - m)^2)
#   (Bluestein's chirp transform).  zeta has order 256, so zeta^(n^2) only depends on n mod 128:
#   the sum is a cyclic convolution of length 128.  Packing 128 values into one integer, 32 bits
#   apart (Kronecker substitution), makes that convolution one multiply done by CPython's C code.
#   The inverse NTT is the same with the opposite chirps:
#       F_m = 128^-1 zeta^(-m^2 - m) * sum_r [F(p_r) zeta^(-r^2)] zeta^((m - r)^2).
#   Its first step multiplies by zeta^(-r^2), which cancels the forward transform's last one, and
#   everything in between is linear slot by slot; so neither is done: the "scaled NTT" of y used
#   here holds F(p_r) * zeta^(-r^2), and so do its products with A and t (which come unscaled).
# * Lane arithmetic: one Python integer holds several values in fixed-width lanes, so that one
#   integer operation works on all of them, as long as no lane overflows (each such place states
#   its bound).  The matrix-vector products need one multiply per slot and matrix entry.
# * No Python loop over bytes or bits: sampling, unpacking and packing go through bytes slicing,
#   bytes.translate and struct, and Compress through lookup tables.
#
# Python integers are not constant-time, and neither is this code; ML-KEM encapsulation secrets
# are ephemeral (see README "Security notes").

_MLKEM_Q = 3329
_MLKEM_ZETA = 17
_MLKEM_K = 3
_MLKEM_ETA = 2                      # eta1 = eta2 for ML-KEM-768
_MLKEM_DU = 10
_MLKEM_DV = 4
_MLKEM_EK_LEN = 384 * _MLKEM_K + 32  # 1184
_MLKEM_SAMPLE_NTT_BYTES = 3 * 168   # 3 SHAKE128 blocks, 336 candidates: enough for 99.2% of seeds


def _mlkem_bitrev7(k):
    return int(f"{k:07b}"[::-1], 2)


@functools.lru_cache(maxsize=None)
def _mlkem_lanes(value, width, count):
    """value in each of count lanes of width bits: the constants of lane arithmetic."""
    return int.from_bytes(value.to_bytes(width // 8, "little") * count, "little")


# Slot k of an NTT holds the point p_r with r = BitRev7(k); the permutation is its own inverse, so
# it turns point order into slot order and back.
_mlkem_slot_order = operator.itemgetter(*[_mlkem_bitrev7(k) for k in range(128)])
# g_k of BaseCaseMultiply (Algorithms 11 and 12), in slot order.
_MLKEM_GAMMA = [pow(_MLKEM_ZETA, 2 * _mlkem_bitrev7(k) + 1, _MLKEM_Q) for k in range(128)]
# The forward transform's first step, F_m * zeta^(m^2 + m), for each CBD output byte v = F_m + eta.
_MLKEM_NTT_PRE = [tuple((v - _MLKEM_ETA) * pow(_MLKEM_ZETA, m * m + m, _MLKEM_Q) % _MLKEM_Q
                        for v in range(2 * _MLKEM_ETA + 1)) for m in range(128)]
# The chirps zeta^(-n^2) and zeta^(n^2), n = 0..127, in 32-bit lanes.
_MLKEM_NTT_CHIRP = int.from_bytes(struct.pack(
    "<128I", *[pow(_MLKEM_ZETA, -n * n % 256, _MLKEM_Q) for n in range(128)]), "little")
_MLKEM_INTT_CHIRP = int.from_bytes(struct.pack(
    "<128I", *[pow(_MLKEM_ZETA, n * n % 256, _MLKEM_Q) for n in range(128)]), "little")
# The inverse transform's last step, 128^-1 zeta^(-m^2 - m), done in _mlkem_compress.
_MLKEM_INTT_POST = [pow(128, -1, _MLKEM_Q) * pow(_MLKEM_ZETA, -(m * m + m) % 256, _MLKEM_Q)
                    % _MLKEM_Q for m in range(128)]


# --- Sampling (FIPS 203 §4.2.2) ------------------------------------------------------------------

def _mlkem_unpack12(data):
    """The 12-bit values of data (ByteDecode_12, Algorithm 6, before its mod q) as 16-bit lanes.

    Every 3 bytes hold two values; each such group is copied into a 4-byte slot, where the second
    value is then moved up from bit 12 to bit 16.
    """
    n = len(data) // 3
    slots = bytearray(4 * n)
    slots[0::4] = data[0::3]
    slots[1::4] = data[1::3]
    slots[2::4] = data[2::3]
    x = int.from_bytes(slots, "little")
    return (x & _mlkem_lanes(0xfff, 32, n)) | ((x & _mlkem_lanes(0xfff000, 32, n)) << 4)


def _mlkem_at_least_q(lanes, count):
    """Bit 15 of each 16-bit lane is set where the lane (< 2^12) is >= q, clear elsewhere."""
    return (lanes + _mlkem_lanes(2 ** 15 - _MLKEM_Q, 16, count)) & _mlkem_lanes(2 ** 15, 16, count)


def _mlkem_pairs(lanes16):
    """The 16-bit little-endian lanes a_0, a_1, ... of the bytes lanes16 as the slot pairs
    a_2k + a_2k+1 * 2^32 that _mlkem_multiply_ntts takes."""
    slots = bytearray(2 * len(lanes16))
    slots[0::4] = lanes16[0::2]
    slots[1::4] = lanes16[1::2]
    return struct.unpack(f"<{len(lanes16) // 4}Q", slots)


def _mlkem_sample_ntt(seed):
    """SampleNTT (Algorithm 7): the 34-byte seed's uniform polynomial in the NTT domain, as slot
    pairs (see _mlkem_pairs).

    SampleNTT reads the SHAKE128 stream as 12-bit values and keeps those below q until it has
    256.  Here _MLKEM_SAMPLE_NTT_BYTES of stream are squeezed at once (one call into C), and when
    that falls short, one block more, and so on (SHAKE's output for a longer length extends the
    shorter one).  The rejection needs no Python loop: each candidate is rewritten as two
    bytes (its low 7 bits, its high 5 bits), the rejected ones as 0xff 0xff, and bytes.translate
    deletes all 0xff bytes, leaving the accepted values in order.
    """
    length = _MLKEM_SAMPLE_NTT_BYTES
    while True:
        n = 2 * length // 3
        x = _mlkem_unpack12(hashlib.shake_128(seed).digest(length))
        rejected = _mlkem_at_least_q(x, n) >> 15
        x = (x & _mlkem_lanes(0x7f, 16, n)) | ((x & _mlkem_lanes(0xf80, 16, n)) << 1)
        kept = (x | rejected * 0xffff).to_bytes(2 * n, "little").translate(None, b"\xff")
        if len(kept) >= 512:
            x = int.from_bytes(kept[:512], "little")
            x = (x & _mlkem_lanes(0x7f, 16, 256)) | ((x >> 1) & _mlkem_lanes(0xf80, 16, 256))
            return _mlkem_pairs(x.to_bytes(512, "little"))
        length += 168


# For each byte b of PRF output, its two coefficients (Algorithm 8 with eta = 2: bits 0-1 minus
# bits 2-3, and bits 4-5 minus bits 6-7), each plus eta to make it a byte.
_MLKEM_CBD_EVEN = bytes(bin(b & 3).count("1") - bin(b & 12).count("1") + _MLKEM_ETA
                        for b in range(256))
_MLKEM_CBD_ODD = bytes(bin(b & 48).count("1") - bin(b & 192).count("1") + _MLKEM_ETA
                       for b in range(256))


def _mlkem_sample_poly_cbd(r, n):
    """SamplePolyCBD_2(PRF_2(r, n)) (Algorithm 8, PRF per §4.1) as two 128-byte strings: the
    even-indexed and the odd-indexed coefficients, each plus eta (so in 0..4)."""
    data = hashlib.shake_256(r + bytes((n,))).digest(64 * _MLKEM_ETA)
    return data.translate(_MLKEM_CBD_EVEN), data.translate(_MLKEM_CBD_ODD)


# --- NTT and products (FIPS 203 §4.3) ------------------------------------------------------------

_MLKEM_LANES_128 = 2 ** 4096 - 1                        # 128 lanes of 32 bits
_MLKEM_LOW_21 = _mlkem_lanes(2 ** 21 - 1, 32, 128)
_MLKEM_LOW_15 = _mlkem_lanes(2 ** 15 - 1, 32, 128)


def _mlkem_convolve(x, chirp):
    """The cyclic convolution of the 128 values in the 32-bit lanes of x with the chirp's, as a
    tuple in point order.  The caller keeps every sum below 2^32: then no lane carries into the
    next, the product's 255 lanes are the linear convolution, and adding its top 127 lanes onto
    the bottom ones makes it cyclic."""
    p = x * chirp
    return struct.unpack("<128I", ((p & _MLKEM_LANES_128) + (p >> 4096)).to_bytes(512, "little"))


def _mlkem_ntt(f_even, f_odd):
    """NTT (Algorithm 9), scaled (see the section comment), of a _mlkem_sample_poly_cbd result:
    slot k as the three lanes (g_k F1 mod q) + (F0 << 32) + (F1 << 64), all reduced mod q, where
    F0, F1 are the scaled residues at g_k."""
    q = _MLKEM_Q
    halves = []
    for f in (f_even, f_odd):
        # Pre-chirped values < q: the convolution's sums stay below 128 * q^2 < 2^31.
        pre = [t[v] for t, v in zip(_MLKEM_NTT_PRE, f)]
        x = int.from_bytes(struct.pack("<128I", *pre), "little")
        halves.append(_mlkem_slot_order(_mlkem_convolve(x, _MLKEM_NTT_CHIRP)))
    return [g * b % q | (a % q) << 32 | (b % q) << 64 for g, a, b in zip(_MLKEM_GAMMA, *halves)]


def _mlkem_multiply_ntts(a_hat, y_hat):
    """sum_j a_hat[j] * y_hat[j] in the NTT domain (MultiplyNTTs, Algorithm 11, summed), with
    a_hat[j] as slot pairs a0 + a1 * 2^32 and y_hat[j] from _mlkem_ntt, as c0 + c1 * 2^32 per
    slot (not reduced).

    With 32-bit lanes, (a0 + a1 X)(g b1 + b0 X + b1 X^2) = a0 g b1 + (a0 b0 + a1 g b1) X
    + (a0 b1 + a1 b0) X^2 + a1 b1 X^3, whose middle lanes are BaseCaseMultiply's c0 and c1
    (Algorithm 12).  All factors are below q, so each lane's sum over j stays below 6 q^2 < 2^26.
    """
    m = 2 ** 64 - 1
    return [(a0 * y0 + a1 * y1 + a2 * y2) >> 32 & m
            for a0, a1, a2, y0, y1, y2 in zip(*a_hat, *y_hat)]


def _mlkem_reduce_lanes(x):
    """Each 32-bit lane v < 2^26 of x replaced by a value below 2q that is equal mod q.

    Lane-wise Barrett reduction: a = v >> 11 < 2^15 and a * floor(2^28 / q) < 2^32 fit a lane, and
    t = (a * floor(2^28 / q)) >> 17 never exceeds v / q (so v - q t borrows nothing from the next
    lane) and falls short of it by less than 2.  Rounding 2^28 / q up instead would break the
    first property (v = 421 * 2^11 gives -3).
    """
    t = (((x >> 11) & _MLKEM_LOW_21) * (2 ** 28 // _MLKEM_Q)) >> 17
    return x - (t & _MLKEM_LOW_15) * _MLKEM_Q


def _mlkem_ntt_inverse(c_hat):
    """NTT^-1 (Algorithm 10) of a scaled NTT given as c0 + c1 * 2^32 per slot, but without its
    final factors _MLKEM_INTT_POST[m], left to the caller: returns (G0, G1) where coefficients
    2m and 2m + 1 are G0[m] * _MLKEM_INTT_POST[m] and G1[m] * _MLKEM_INTT_POST[m] mod q.

    Reduced inputs < 2q keep the convolution's sums below 128 * 2q * q < 2^32.
    """
    lanes = memoryview(struct.pack("<128Q", *_mlkem_slot_order(c_hat))).cast("I")
    g = []
    # Taking every other 32-bit lane copies bytes, so the native byte order does not matter.
    for half in (lanes[0::2], lanes[1::2]):
        x = _mlkem_reduce_lanes(int.from_bytes(half.tobytes(), "little"))
        g.append(_mlkem_convolve(x, _MLKEM_INTT_CHIRP))
    return g


# --- Compression and encoding (FIPS 203 §4.2.1) --------------------------------------------------

def _mlkem_compress_table(d, offset):
    """x -> Compress_d(x - offset mod q) for x in 0..q-1, as a list."""
    return [(((x - offset) % _MLKEM_Q << d) + _MLKEM_Q // 2) // _MLKEM_Q % (1 << d)
            for x in range(_MLKEM_Q)]


# Compress_d tables indexed by (the coefficient + eta) mod q, as the CBD error bytes arrive plus
# eta; v's tables are one per message bit, as v also gets Decompress_1(bit) = 1665 * bit.
_MLKEM_COMPRESS_U = _mlkem_compress_table(_MLKEM_DU, _MLKEM_ETA)
_MLKEM_COMPRESS_U_HI = [c << _MLKEM_DU for c in _MLKEM_COMPRESS_U]
_MLKEM_COMPRESS_V = [_mlkem_compress_table(_MLKEM_DV, _MLKEM_ETA - 1665 * bit) for bit in (0, 1)]
_MLKEM_COMPRESS_V_HI = [[c << _MLKEM_DV for c in table] for table in _MLKEM_COMPRESS_V]
_MLKEM_EVEN_LANES = _mlkem_lanes(2 ** 32 - 1, 64, 64)    # the even ones of 128 32-bit lanes
# Byte i of m.translate(_MLKEM_BIT[j]) is bit j of m[i].
_MLKEM_BIT = [bytes(b >> j & 1 for b in range(256)) for j in range(8)]


def _mlkem_byte_decode1(m):
    """ByteDecode_1 (Algorithm 6) of the 32-byte message: its 256 bits, one per byte."""
    bits = bytearray(256)
    for j in range(8):
        bits[j::8] = m.translate(_MLKEM_BIT[j])
    return bits


def _mlkem_compress(g, e, mu=None):
    """Compress_du(u) for u = NTT^-1(...) + e1, or with mu (the message bits) Compress_dv(v) for
    v = NTT^-1(...) + e2 + Decompress_1(mu), as the pairs _mlkem_byte_encode takes.

    g = (G0, G1) from _mlkem_ntt_inverse, e = (even, odd) from _mlkem_sample_poly_cbd: the final
    NTT^-1 factor, the error and mu all come in here, in the one pass over the coefficients.
    """
    q = _MLKEM_Q
    post = _MLKEM_INTT_POST
    if mu is None:
        lo, hi = _MLKEM_COMPRESS_U, _MLKEM_COMPRESS_U_HI
        return [lo[(a * s + x) % q] | hi[(b * s + z) % q]
                for a, b, s, x, z in zip(*g, post, *e)]
    lo, hi = _MLKEM_COMPRESS_V, _MLKEM_COMPRESS_V_HI
    return [lo[m0][(a * s + x) % q] | hi[m1][(b * s + z) % q]
            for a, b, s, x, z, m0, m1 in zip(*g, post, *e, mu[0::2], mu[1::2])]


def _mlkem_byte_encode(pairs, d):
    """ByteEncode_d (Algorithm 5) of 256 d-bit values (d even) given as the 128 pairs
    F_2m + F_2m+1 * 2^d: merge neighbouring 32-bit lanes into 4d-bit groups in 64-bit lanes,
    then keep the d/2 bytes of each that hold them."""
    x = int.from_bytes(struct.pack("<128I", *pairs), "little")
    even = _MLKEM_EVEN_LANES
    x = (x & even) | ((x >> (32 - 2 * d)) & (even << 2 * d))
    groups = x.to_bytes(512, "little")
    out = bytearray(32 * d)
    for i in range(d // 2):
        out[i::d // 2] = groups[i::8]
    return bytes(out)


# --- K-PKE and ML-KEM (FIPS 203 §5.2, §6.2, §7.2) ----------------------------------------------

def _mlkem_k_pke_encrypt(t_hat, rho, m, r):
    """K-PKE.Encrypt (Algorithm 14) with t_hat = ByteDecode_12 of ek as slot pairs."""
    y_hat = [_mlkem_ntt(*_mlkem_sample_poly_cbd(r, n)) for n in range(_MLKEM_K)]
    c = []
    for i in range(_MLKEM_K):
        # Column i of A: A[j, i] = SampleNTT(rho || i || j).
        a_hat = [_mlkem_sample_ntt(rho + bytes((i, j))) for j in range(_MLKEM_K)]
        u = _mlkem_ntt_inverse(_mlkem_multiply_ntts(a_hat, y_hat))
        e1 = _mlkem_sample_poly_cbd(r, _MLKEM_K + i)
        c.append(_mlkem_byte_encode(_mlkem_compress(u, e1), _MLKEM_DU))
    v = _mlkem_ntt_inverse(_mlkem_multiply_ntts(t_hat, y_hat))
    e2 = _mlkem_sample_poly_cbd(r, 2 * _MLKEM_K)
    c.append(_mlkem_byte_encode(_mlkem_compress(v, e2, _mlkem_byte_decode1(m)), _MLKEM_DV))
    return b"".join(c)


def mlkem768_encaps(ek, m=None):
    """ML-KEM-768 encapsulation to the key ek: (shared key K, ciphertext c), 32 and 1088 bytes.

    ML-KEM.Encaps (Algorithm 20) with the input checks of §7.2: ValueError when ek has the wrong
    length or fails the modulus check.  m is the 32 bytes of randomness of Encaps_internal
    (Algorithm 17), fresh by default; tests pass their own.
    """
    ek = bytes(ek)
    if len(ek) != _MLKEM_EK_LEN:
        raise ValueError(f"ML-KEM-768 encapsulation key must be {_MLKEM_EK_LEN} bytes, "
                         f"got {len(ek)}")
    m = secrets.token_bytes(32) if m is None else bytes(m)
    if len(m) != 32:
        raise ValueError("ML-KEM encapsulation randomness must be 32 bytes")
    # Modulus check: ek[0:1152] == ByteEncode_12(ByteDecode_12(...)), i.e. all 768 values < q.
    t = _mlkem_unpack12(ek[:384 * _MLKEM_K])
    if _mlkem_at_least_q(t, 256 * _MLKEM_K):
        raise ValueError("ML-KEM encapsulation key fails the modulus check (a value >= q)")
    pairs = _mlkem_pairs(t.to_bytes(512 * _MLKEM_K, "little"))
    t_hat = [pairs[128 * j:128 * j + 128] for j in range(_MLKEM_K)]
    kr = hashlib.sha3_512(m + hashlib.sha3_256(ek).digest()).digest()     # (K, r) = G(m || H(ek))
    return kr[:32], _mlkem_k_pke_encrypt(t_hat, ek[384 * _MLKEM_K:], m, kr[32:])


# === 5.13 PEM (RFC 7468) ==========================================================================
# PEM/DER, RSA-PSS signing, private keys, certificate chains and self-signed certificates (5.13 to
# 5.18), written from the specifications: X.690 (DER), RFC 7468 (PEM), RFC 8017 (RSA, PSS),
# RFC 5208/5958 (PKCS#8), RFC 5915 (SEC1 EC keys), RFC 8410 (Ed25519 keys), RFC 5280 (X.509).

def _pem_base64(label, lines):
    try:
        return base64.b64decode("".join(lines), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"PEM block {label!r} has invalid base64 ({exc})") from None


def _pem_blocks(data):
    """Every PEM block in data as (label, headers, der); headers are the RFC 1421 ones
    ("Proc-Type: 4,ENCRYPTED") that old OpenSSL writes for encrypted keys."""
    blocks = []
    label = None
    # latin-1 never fails, so explanatory text around the blocks may be in any encoding.
    for line in data.decode("latin-1").splitlines():
        line = line.strip()
        if label is None:
            if line.startswith("-----BEGIN ") and line.endswith("-----"):
                label, headers, body = line[11:-5], {}, []
        elif line.startswith("-----END "):
            if line != f"-----END {label}-----":
                raise ValueError(f"PEM block {label!r} ends with {line!r}")
            blocks.append((label, headers, _pem_base64(label, body)))
            label = None
        elif ":" in line and not body:  # base64 never contains ':'
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        elif line:
            body.append(line)
    if label is not None:
        raise ValueError(f"PEM block {label!r} has no END line")
    return blocks


def pem_decode(data):
    """All PEM blocks in data, in order, as (label, der) pairs."""
    return [(label, der) for label, _, der in _pem_blocks(data)]


# For tests and tools: the server only reads PEM.
def pem_encode(label, der):
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode()


# === 5.14 DER reader (X.690) ======================================================================
# Values are returned as bytes; callers check tags and field counts.

def der_read(data, pos=0):
    """The element starting at data[pos]: (tag, value, position after it)."""
    if pos + 2 > len(data):
        raise ValueError("malformed DER: truncated element")
    tag, length = data[pos], data[pos + 1]
    if tag & 0x1f == 0x1f:
        raise ValueError("malformed DER: multi-byte tags are not supported")
    pos += 2
    if length & 0x80:
        count = length & 0x7f
        if count == 0 or count > 4:  # 0 is BER's indefinite length; >4 bytes is absurd here
            raise ValueError("malformed DER: unsupported length encoding")
        if pos + count > len(data):
            raise ValueError("malformed DER: truncated length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("malformed DER: element longer than its container")
    return tag, bytes(data[pos:end]), end


def der_decode(data, tag):
    """The value of the one element that makes up all of data, which must have this tag."""
    got, value, end = der_read(data)
    if got != tag:
        raise ValueError(f"malformed DER: expected tag {tag:#04x}, found {got:#04x}")
    if end != len(data):
        raise ValueError(f"malformed DER: {len(data) - end} bytes of trailing data")
    return value


def der_children(value):
    """The elements inside a constructed value, as a list of (tag, value)."""
    items = []
    pos = 0
    while pos < len(value):
        tag, child, pos = der_read(value, pos)
        items.append((tag, child))
    return items


def der_sequence(data, min_fields, what):
    """The fields of the SEQUENCE that is all of data; at least min_fields of them."""
    items = der_children(der_decode(data, 0x30))
    if len(items) < min_fields:
        raise ValueError(f"malformed {what}: {len(items)} fields, expected at least {min_fields}")
    return items


def der_field(item, tag, what):
    """The value of one (tag, value) field, checking its tag."""
    if item[0] != tag:
        raise ValueError(f"malformed {what}: expected tag {tag:#04x}, found {item[0]:#04x}")
    return item[1]


def der_to_int(value):
    if not value:
        raise ValueError("malformed DER: empty INTEGER")
    return int.from_bytes(value, "big", signed=True)


def der_to_oid(value):
    """Dotted text of an OBJECT IDENTIFIER value: base-128 arcs, the first holding 40*a + b."""
    if not value or value[-1] & 0x80:
        raise ValueError("malformed DER: bad OBJECT IDENTIFIER")
    arcs = []
    acc = 0
    for byte in value:
        acc = (acc << 7) | (byte & 0x7f)
        if not byte & 0x80:
            arcs.append(acc)
            acc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


# === 5.15 DER writer ==============================================================================
# Just what keys and certificates need.

def der_tlv(tag, value):
    length = len(value)
    if length < 0x80:
        return bytes((tag, length)) + value
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + value


def der_seq(*items):
    return der_tlv(0x30, b"".join(items))


def der_set(*items):
    # DER orders the members of a SET OF by their encodings.
    return der_tlv(0x31, b"".join(sorted(items)))


def der_int(n):
    """A non-negative INTEGER; the extra byte keeps the sign bit clear."""
    return der_tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def der_oid(dotted):
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7f]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7f))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der_tlv(0x06, bytes(body))


def der_null():
    return b"\x05\x00"


def der_bool(value):
    return der_tlv(0x01, b"\xff" if value else b"\x00")


def der_octets(data):
    return der_tlv(0x04, data)


def der_bits(data, unused_bits=0):
    return der_tlv(0x03, bytes((unused_bits,)) + data)


def der_utf8(text):
    return der_tlv(0x0c, text.encode("utf-8"))


def der_time(epoch_seconds):
    """RFC 5280 4.1.2.5: UTCTime for the years 1950-2049, GeneralizedTime otherwise."""
    t = time.gmtime(epoch_seconds)
    if 1950 <= t.tm_year < 2050:
        return der_tlv(0x17, time.strftime("%y%m%d%H%M%SZ", t).encode())
    return der_tlv(0x18, time.strftime("%Y%m%d%H%M%SZ", t).encode())


def der_explicit(number, inner):
    """A context-specific [number] EXPLICIT wrapper."""
    return der_tlv(0xa0 | number, inner)


# === 5.16 RSA-PSS signatures (RFC 8017) ===========================================================

_RSA_PSS_HASHES = ("sha256", "sha384", "sha512")


def _rsa_mgf1(hash_name, seed, length):
    """MGF1 (RFC 8017 B.2.1): hashes of seed || counter, concatenated and cut to length."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _rsa_pss_encode(m_hash, em_bits, hash_name, salt):
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1) of an already hashed message."""
    h_len = len(m_hash)
    em_len = (em_bits + 7) // 8
    if em_len < h_len + len(salt) + 2:
        raise ValueError(f"RSA key too small for PSS with {hash_name}")
    h = hashlib.new(hash_name, b"\0" * 8 + m_hash + salt).digest()
    db = b"\0" * (em_len - len(salt) - h_len - 2) + b"\x01" + salt
    mask = _rsa_mgf1(hash_name, h, len(db))
    masked = int.from_bytes(db, "big") ^ int.from_bytes(mask, "big")
    # Clear the top 8*emLen - emBits bits so the encoded integer is below the modulus.
    masked &= (1 << (8 * len(db) - (8 * em_len - em_bits))) - 1
    return masked.to_bytes(len(db), "big") + h + b"\xbc"


# A blinding pair (r^e, r^-1 mod n) serves this many signatures, squared after each one (Kocher's
# update, as OpenSSL's BN_BLINDING does): squaring keeps every value used once and costs two modular
# multiplications, where a fresh r costs an exponentiation and an inversion (~0.4 ms at 2048 bits,
# 6 % of a signature).
_RSA_BLINDING_USES = 32


class RSAKey:
    """An RSA private key that makes RSASSA-PSS signatures (RFC 8017 8.1)."""

    def __init__(self, n, e, d, p, q):
        if p * q != n:
            raise ValueError("RSA key is inconsistent: p*q is not the modulus")
        if (e * d) % (p - 1) != 1 or (e * d) % (q - 1) != 1:
            raise ValueError("RSA key is inconsistent: d is not the inverse of e")
        self.n, self.e, self.d, self.p, self.q = n, e, d, p, q
        self.bits = n.bit_length()
        # CRT form (RFC 8017 3.2): two half-size exponentiations are about 3x faster than one.
        self.dp = d % (p - 1)
        self.dq = d % (q - 1)
        self.qinv = pow(q, -1, p)
        self._blinding = None         # (r^e mod n, r^-1 mod n) for the next signature
        self._blinding_left = 0       # signatures until a fresh r

    def _next_blinding(self):
        """(r^e, r^-1) mod n for one signature; the stored pair moves on to (r^2e, r^-2)."""
        n = self.n
        if not self._blinding_left:
            # r is not invertible only if it shares a factor with n: negligible.
            r = secrets.randbelow(n - 2) + 2
            self._blinding = (pow(r, self.e, n), pow(r, -1, n))
            self._blinding_left = _RSA_BLINDING_USES
        pair = self._blinding
        self._blinding = (pair[0] * pair[0] % n, pair[1] * pair[1] % n)
        self._blinding_left -= 1
        return pair

    def _rsasp1(self, m):
        """RSASP1 (RFC 8017 5.2.1) with the CRT, blinded: the secret exponentiations work on
        r^e * m for a value r used once, so their timing says nothing about m."""
        n, p, q = self.n, self.p, self.q
        r_e, r_inv = self._next_blinding()
        blinded = r_e * m % n
        s1 = pow(blinded % p, self.dp, p)
        s2 = pow(blinded % q, self.dq, q)
        s = s2 + (self.qinv * (s1 - s2) % p) * q
        return s * r_inv % n

    def sign_pss(self, msg, hash_name):
        """RSASSA-PSS-SIGN with MGF1 of the same hash and a random salt as long as the hash."""
        if hash_name not in _RSA_PSS_HASHES:
            raise ValueError(f"unsupported PSS hash {hash_name!r}")
        m_hash = hashlib.new(hash_name, msg).digest()
        em = _rsa_pss_encode(m_hash, self.bits - 1, hash_name, secrets.token_bytes(len(m_hash)))
        m = int.from_bytes(em, "big")
        s = self._rsasp1(m)
        # A fault in one CRT half would reveal a factor of n from the signature (the Bellcore
        # attack), so check s^e = m before it leaves: modulo p and modulo q, which together say
        # the same as modulo n (CRT) at a third of the cost of the full-size check.
        e, p, q = self.e, self.p, self.q
        if pow(s % p, e, p) != m % p or pow(s % q, e, q) != m % q:
            raise RuntimeError("RSA signature failed its self-check; not releasing it")
        return s.to_bytes((self.bits + 7) // 8, "big")


# === 5.17 Private keys (PKCS#1, SEC 1, PKCS#8, RFC 8410) ==========================================

_PKI_OID_RSA = "1.2.840.113549.1.1.1"
_PKI_OID_EC = "1.2.840.10045.2.1"
_PKI_OID_ED25519 = "1.3.101.112"
_PKI_OID_P256 = "1.2.840.10045.3.1.7"
_PKI_OID_P384 = "1.3.132.0.34"

# Names for OIDs we refuse, so the error says what the file holds.
_PKI_OID_NAMES = {
    "1.2.840.113549.1.1.10": "RSASSA-PSS", "1.2.840.10040.4.1": "DSA", "1.2.840.10046.2.1": "DH",
    "1.3.101.110": "X25519", "1.3.101.111": "X448", "1.3.101.113": "Ed448",
    "1.3.132.0.35": "secp521r1", "1.3.132.0.10": "secp256k1", "1.3.132.0.33": "secp224r1",
    "1.2.840.10045.3.1.1": "prime192v1",
}

_PKI_EC_CURVES = {  # named-curve OID -> (PrivateKey kind, curve)
    _PKI_OID_P256: ("ecdsa-p256", SECP256R1),
    _PKI_OID_P384: ("ecdsa-p384", SECP384R1),
}

_PKI_KINDS = {  # kind -> (description, TLS 1.3 SignatureSchemes, preferred first)
    "rsa": ("RSA", [0x0804, 0x0805, 0x0806]),
    "ecdsa-p256": ("ECDSA P-256", [0x0403]),
    "ecdsa-p384": ("ECDSA P-384", [0x0503]),
    "ed25519": ("Ed25519", [0x0807]),
}

_PKI_RSA_SCHEME_HASH = {0x0804: "sha256", 0x0805: "sha384", 0x0806: "sha512"}

_PKI_SUPPORTED_KEYS = ("supported: PRIVATE KEY (PKCS#8: RSA, EC P-256/P-384, Ed25519), "
                       "RSA PRIVATE KEY (PKCS#1), EC PRIVATE KEY (SEC1)")


def _pki_oid_name(oid):
    name = _PKI_OID_NAMES.get(oid)
    return f"{name} (OID {oid})" if name else f"OID {oid}"


class PrivateKey:
    """A private key of any supported kind, with what the TLS 1.3 handshake needs from it."""

    def __init__(self, kind, key):
        self.kind = kind
        self.key = key  # RSAKey, ECDSAKey or Ed25519Key
        self.description, schemes = _PKI_KINDS[kind]
        self.signature_schemes = list(schemes)
        if kind == "rsa":
            self.description = f"RSA-{key.bits}"

    def sign(self, scheme, message):
        """The signature of message under TLS SignatureScheme `scheme`."""
        if scheme not in self.signature_schemes:
            raise ValueError(f"a {self.description} key cannot make signature scheme {scheme:#06x}")
        if self.kind == "rsa":
            return self.key.sign_pss(message, _PKI_RSA_SCHEME_HASH[scheme])
        return self.key.sign(message)

    def spki_der(self):
        """SubjectPublicKeyInfo (RFC 5280 4.1.2.7) of the public key."""
        if self.kind == "rsa":
            algorithm = der_seq(der_oid(_PKI_OID_RSA), der_null())
            public = der_seq(der_int(self.key.n), der_int(self.key.e))
        elif self.kind == "ed25519":
            algorithm = der_seq(der_oid(_PKI_OID_ED25519))
            public = self.key.public
        else:
            curve_oid = _PKI_OID_P256 if self.kind == "ecdsa-p256" else _PKI_OID_P384
            algorithm = der_seq(der_oid(_PKI_OID_EC), der_oid(curve_oid))
            public = self.key.public
        return der_seq(algorithm, der_bits(public))

    def pkcs8_der(self):
        """PrivateKeyInfo (RFC 5208, RFC 5958 v1) of the key, for libraries that load keys."""
        key = self.key
        if self.kind == "rsa":
            algorithm = der_seq(der_oid(_PKI_OID_RSA), der_null())
            numbers = (0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv)
            inner = der_seq(*[der_int(v) for v in numbers])  # RSAPrivateKey (RFC 8017 A.1.2)
        elif self.kind == "ed25519":
            algorithm = der_seq(der_oid(_PKI_OID_ED25519))
            inner = der_octets(key._seed)  # CurvePrivateKey (RFC 8410 §7)
        else:
            curve_oid = _PKI_OID_P256 if self.kind == "ecdsa-p256" else _PKI_OID_P384
            algorithm = der_seq(der_oid(_PKI_OID_EC), der_oid(curve_oid))
            # ECPrivateKey (SEC 1 C.4, RFC 5915): the curve is in the algorithm already.
            d = key._d.to_bytes(key.curve.byte_len, "big")
            inner = der_seq(der_int(1), der_octets(d), der_explicit(1, der_bits(key.public)))
        return der_seq(der_int(0), algorithm, der_octets(inner))


def _pki_rsa_private_key(der):
    """RSAPrivateKey (RFC 8017 A.1.2), the 'RSA PRIVATE KEY' PEM body."""
    fields = der_sequence(der, 9, "RSA private key")
    version, n, e, d, p, q = [der_to_int(der_field(f, 0x02, "RSA private key")) for f in fields[:6]]
    if version != 0:
        raise ValueError("multi-prime RSA keys are not supported")
    if not 2048 <= n.bit_length() <= 4096:
        raise ValueError(f"RSA key of {n.bit_length()} bits is not supported; use 2048 to 4096 "
                         f"bits")
    return PrivateKey("rsa", RSAKey(n, e, d, p, q))


def _pki_ec_compress(point):
    """A public point in compressed form (SEC1 2.3.3), so that both forms compare equal."""
    if point[:1] in (b"\x02", b"\x03"):
        return point
    if point[:1] != b"\x04" or len(point) % 2 != 1:
        raise ValueError("unsupported EC point encoding")
    half = (len(point) - 1) // 2
    return bytes((2 | point[-1] & 1,)) + point[1:1 + half]


def _pki_named_curve(item):
    """The curve OID from an ECParameters (tag, value), refusing spelled-out curves."""
    if item[0] != 0x06:
        raise ValueError("EC keys with explicit curve parameters are not supported; use a named "
                         "curve")
    return der_to_oid(item[1])


def _pki_ec_private_key(der, curve_oid=None):
    """ECPrivateKey (RFC 5915), the 'EC PRIVATE KEY' PEM body; PKCS#8 passes the curve."""
    fields = der_sequence(der, 2, "EC private key")
    if der_to_int(der_field(fields[0], 0x02, "EC private key")) != 1:
        raise ValueError("malformed EC private key: version is not 1")
    d = int.from_bytes(der_field(fields[1], 0x04, "EC private key"), "big")
    public = None
    for tag, value in fields[2:]:
        if tag == 0xa0:
            named = _pki_named_curve(der_read(value)[:2])
            if curve_oid is not None and named != curve_oid:
                raise ValueError("EC private key names two different curves")
            curve_oid = named
        elif tag == 0xa1:
            public = der_decode(value, 0x03)[1:]
    if curve_oid is None:
        raise ValueError("EC private key does not name its curve")
    if curve_oid not in _PKI_EC_CURVES:
        raise ValueError(f"unsupported EC curve {_pki_oid_name(curve_oid)}; supported: P-256 "
                         f"(prime256v1), P-384 (secp384r1)")
    kind, curve = _PKI_EC_CURVES[curve_oid]
    if not 1 <= d < curve.n:
        raise ValueError("EC private key is out of range")
    key = ECDSAKey(curve, d)
    if public is not None and _pki_ec_compress(public) != _pki_ec_compress(key.public):
        raise ValueError("EC private key is inconsistent: stored public key does not match")
    return PrivateKey(kind, key)


def _pki_ed25519_private_key(inner, extra_fields):
    """RFC 8410 7: CurvePrivateKey is an OCTET STRING holding the 32-byte seed."""
    seed = der_decode(inner, 0x04)
    if len(seed) != 32:
        raise ValueError(f"malformed Ed25519 private key: seed is {len(seed)} bytes, not 32")
    key = Ed25519Key(seed)
    for tag, value in extra_fields:  # RFC 5958 publicKey [1] IMPLICIT BIT STRING
        if tag == 0x81 and value[1:] != key.public:
            raise ValueError("Ed25519 private key is inconsistent: stored public key does not "
                             "match")
    return PrivateKey("ed25519", key)


def _pki_pkcs8_private_key(der):
    """OneAsymmetricKey (RFC 5958; PrivateKeyInfo of RFC 5208), the 'PRIVATE KEY' PEM body."""
    fields = der_sequence(der, 3, "PKCS#8 private key")
    algorithm = der_children(der_field(fields[1], 0x30, "PKCS#8 private key"))
    if not algorithm:
        raise ValueError("malformed PKCS#8 private key: empty algorithm")
    oid = der_to_oid(der_field(algorithm[0], 0x06, "PKCS#8 algorithm"))
    inner = der_field(fields[2], 0x04, "PKCS#8 private key")
    if oid == _PKI_OID_RSA:
        return _pki_rsa_private_key(inner)
    if oid == _PKI_OID_EC:
        if len(algorithm) < 2:
            raise ValueError("PKCS#8 EC private key does not name its curve")
        return _pki_ec_private_key(inner, _pki_named_curve(algorithm[1]))
    if oid == _PKI_OID_ED25519:
        return _pki_ed25519_private_key(inner, fields[3:])
    raise ValueError(f"unsupported key algorithm {_pki_oid_name(oid)}; supported: RSA, "
                     f"EC P-256/P-384, Ed25519")


_PKI_KEY_PARSERS = {
    "PRIVATE KEY": _pki_pkcs8_private_key,
    "RSA PRIVATE KEY": _pki_rsa_private_key,
    "EC PRIVATE KEY": _pki_ec_private_key,
}


def load_private_key(pem):
    """The first private key in PEM data; ValueError with one line saying what is wrong."""
    blocks = _pem_blocks(pem)
    if not blocks:
        raise ValueError("no PEM block found in the key file (convert a DER key with: openssl pkey "
                         "-inform DER -in key.der -out key.pem); " + _PKI_SUPPORTED_KEYS)
    for label, headers, der in blocks:
        if label == "ENCRYPTED PRIVATE KEY" or "ENCRYPTED" in headers.get("Proc-Type", ""):
            raise ValueError("the private key is encrypted; decrypt it first with: "
                             "openssl pkey -in key.pem -out plain.pem")
        parse = _PKI_KEY_PARSERS.get(label)
        if parse:
            try:
                return parse(der)
            except ValueError as exc:
                raise ValueError(f"cannot load the {label} block: {exc}") from None
    labels = [label for label, _, _ in blocks]
    if "CERTIFICATE" in labels:
        raise ValueError(f"found a certificate where a private key was expected (PEM blocks: "
                         f"{', '.join(labels)}); {_PKI_SUPPORTED_KEYS}")
    raise ValueError(f"no private key in the key file (PEM blocks: {', '.join(labels)}); "
                     f"{_PKI_SUPPORTED_KEYS}")


# === 5.18 Certificates (RFC 5280) =================================================================

def _pki_tbs_fields(cert_der):
    """The fields of Certificate -> tbsCertificate, as (tag, value) pairs."""
    cert = der_sequence(cert_der, 3, "certificate")
    return der_children(der_field(cert[0], 0x30, "certificate"))


def _pki_cert_spki(cert_der):
    """The subjectPublicKeyInfo value from Certificate -> tbsCertificate."""
    tbs = _pki_tbs_fields(cert_der)
    # The version is [0] EXPLICIT and absent in v1 certificates; then come serialNumber,
    # signature, issuer, validity, subject and subjectPublicKeyInfo.
    index = 6 if tbs and tbs[0][0] == 0xa0 else 5
    if len(tbs) <= index:
        raise ValueError("malformed certificate: tbsCertificate is too short")
    return der_field(tbs[index], 0x30, "subjectPublicKeyInfo")


def _pki_spki_identity(spki_value):
    """(description, normalised public key) of a SubjectPublicKeyInfo value, so that different
    encodings of one key (NULL parameters or not, compressed points) compare equal."""
    fields = der_children(spki_value)
    if len(fields) != 2:
        raise ValueError("malformed subjectPublicKeyInfo")
    algorithm = der_children(der_field(fields[0], 0x30, "subjectPublicKeyInfo"))
    oid = der_to_oid(der_field(algorithm[0], 0x06, "subjectPublicKeyInfo")) if algorithm else ""
    bits = der_field(fields[1], 0x03, "subjectPublicKeyInfo")
    if bits[:1] != b"\0":
        raise ValueError("malformed subjectPublicKeyInfo: key is not whole bytes")
    public = bits[1:]
    if oid == _PKI_OID_RSA:
        rsa = der_sequence(public, 2, "RSA public key")
        n, e = [der_to_int(der_field(f, 0x02, "RSA public key")) for f in rsa[:2]]
        return f"RSA-{n.bit_length()}", ("rsa", n, e)
    if oid == _PKI_OID_EC and len(algorithm) == 2:
        curve_oid = _pki_named_curve(algorithm[1])
        if curve_oid in _PKI_EC_CURVES:
            description = _PKI_KINDS[_PKI_EC_CURVES[curve_oid][0]][0]
        else:
            description = "ECDSA " + _pki_oid_name(curve_oid)
        return description, ("ec", curve_oid, _pki_ec_compress(public))
    if oid == _PKI_OID_ED25519:
        return "Ed25519", ("ed25519", public)
    return _pki_oid_name(oid), ("other", oid)


def load_cert_chain(pem):
    """The DER of every CERTIFICATE block in pem, in file order (leaf first)."""
    blocks = pem_decode(pem)
    certs = [der for label, der in blocks if label == "CERTIFICATE"]
    if not certs:
        labels = ", ".join(label for label, _ in blocks) or "none"
        raise ValueError(f"no CERTIFICATE block in the certificate file (PEM blocks: {labels})")
    for number, cert in enumerate(certs, 1):
        try:
            _pki_spki_identity(_pki_cert_spki(cert))
        except ValueError as exc:
            raise ValueError(f"certificate {number} in the chain is malformed: {exc}") from None
    return certs


def check_key_matches_cert(key, cert_der):
    """ValueError unless the certificate's public key is the private key's."""
    cert_desc, cert_id = _pki_spki_identity(_pki_cert_spki(cert_der))
    key_id = _pki_spki_identity(der_decode(key.spki_der(), 0x30))[1]
    if cert_id != key_id:
        raise ValueError(f"private key does not match the certificate (key: {key.description}, "
                         f"certificate: {cert_desc})")


_PKI_OID_SUBJECT_ALT_NAME = "2.5.29.17"


def certificate_dns_names(cert_der):
    """The dNSName entries of a certificate's subjectAltName (RFC 5280 §4.2.1.6), lower-case;
    none without the extension."""
    for tag, value in _pki_tbs_fields(cert_der):
        if tag != 0xa3:   # extensions: [3] EXPLICIT, the last field of tbsCertificate
            continue
        for extension in der_sequence(value, 0, "extensions"):
            fields = der_children(der_field(extension, 0x30, "extension"))
            if len(fields) >= 2 and der_to_oid(der_field(fields[0], 0x06, "extension")) == \
                    _PKI_OID_SUBJECT_ALT_NAME:
                names = der_sequence(der_field(fields[-1], 0x04, "subjectAltName"), 0,
                                     "subjectAltName")
                return [name.decode("ascii", "replace").lower() for kind, name in names
                        if kind == 0x82]   # dNSName: [2] IMPLICIT IA5String
    return []


_PKI_OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
_PKI_OID_COMMON_NAME = "2.5.4.3"
_PKI_OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"


def _pki_extension(oid, critical, value):
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }"""
    flag = der_bool(True) if critical else b""  # DER leaves out a DEFAULT value
    return der_seq(der_oid(oid), flag, der_octets(value))


def _pki_subject_alt_name(hosts):
    """GeneralNames: IP literals as iPAddress [7], everything else as dNSName [2]."""
    names = []
    for host in hosts:
        try:
            names.append(der_tlv(0x87, ipaddress.ip_address(host).packed))
        except ValueError:
            names.append(der_tlv(0x82, host.encode("ascii")))
    return der_seq(*names)


def make_self_signed(hosts=("localhost", "127.0.0.1", "::1"), days=365):
    """A fresh ECDSA P-256 key and a self-signed X.509 v3 certificate for hosts: (PrivateKey, DER).

    It is its own CA (basicConstraints cA, keyCertSign) so clients can trust it directly
    with e.g. `curl --cacert` or `openssl verify -CAfile`."""
    key = PrivateKey("ecdsa-p256", ECDSAKey(SECP256R1, ec_keypair(SECP256R1)[0]))
    name = der_seq(der_set(der_seq(der_oid(_PKI_OID_COMMON_NAME),
                                   der_utf8("tarweb.py self-signed"))))
    now = int(time.time())
    validity = der_seq(der_time(now - 86400), der_time(now + days * 86400))  # a day of clock skew
    key_id = hashlib.sha1(key.key.public).digest()  # RFC 5280 4.2.1.2, method (1)
    extensions = der_seq(
        _pki_extension("2.5.29.19", True, der_seq(der_bool(True))),  # basicConstraints: cA
        # keyUsage: digitalSignature (bit 0) and keyCertSign (bit 5) = 1000 01xx, 2 unused bits
        _pki_extension("2.5.29.15", True, der_bits(b"\x84", 2)),
        _pki_extension("2.5.29.37", False, der_seq(der_oid(_PKI_OID_SERVER_AUTH))),
        _pki_extension("2.5.29.17", False, _pki_subject_alt_name(hosts)),
        _pki_extension("2.5.29.14", False, der_octets(key_id)),
        _pki_extension("2.5.29.35", False, der_seq(der_tlv(0x80, key_id))),  # keyIdentifier [0]
    )
    # 126 random bits plus a set top bit: positive, non-zero and exactly 16 bytes of INTEGER.
    serial = secrets.randbits(126) | 1 << 126
    signature_algorithm = der_seq(der_oid(_PKI_OID_ECDSA_SHA256))  # parameters absent (RFC 5758)
    tbs = der_seq(der_explicit(0, der_int(2)), der_int(serial), signature_algorithm, name, validity,
                  name, key.spki_der(), der_explicit(3, extensions))
    cert = der_seq(tbs, signature_algorithm, der_bits(key.sign(0x0403, tbs)))
    return key, cert


# === 5.19 libcrypto through ctypes (OpenSSL 1.1.1, 3.x) ===========================================
# The same primitives from the host's OpenSSL libcrypto, much faster than pure Python.  Only the
# library that CPython's own _hashlib already loaded is used: it is in this process anyway, so no
# path is guessed and no other dependency comes in.  Every call is declared once (argtypes and
# restype, as for libc in section 1); each failure becomes the exception the pure code raises in
# that case (ValueError, AEADError), or a RuntimeError naming the call when the pure code could not
# fail there (an allocation).

class LibcryptoUnavailable(Exception):
    """libcrypto cannot be the crypto backend; the text is one line with the fix."""


_LC_P, _LC_INT, _LC_SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_LC_SIZE_P = ctypes.POINTER(ctypes.c_size_t)
# name -> (restype, argtypes).  Pointers are c_void_p, the AEAD calls' int * included: a plain
# int address converts faster than a POINTER(c_int) object, which calls made per record feel.
_LC_FUNCTIONS = {
    "OpenSSL_version_num": (ctypes.c_ulong, []),
    "OpenSSL_version": (ctypes.c_char_p, [_LC_INT]),
    "ERR_clear_error": (None, []),
    "EVP_aes_128_gcm": (_LC_P, []),
    "EVP_aes_256_gcm": (_LC_P, []),
    "EVP_chacha20_poly1305": (_LC_P, []),
    "EVP_sha256": (_LC_P, []),
    "EVP_sha384": (_LC_P, []),
    "EVP_sha512": (_LC_P, []),
    "EVP_CIPHER_CTX_new": (_LC_P, []),
    "EVP_CIPHER_CTX_free": (None, [_LC_P]),
    "EVP_CIPHER_CTX_ctrl": (_LC_INT, [_LC_P, _LC_INT, _LC_INT, _LC_P]),
    "EVP_EncryptInit_ex": (_LC_INT, [_LC_P, _LC_P, _LC_P, _LC_P, _LC_P]),
    "EVP_DecryptInit_ex": (_LC_INT, [_LC_P, _LC_P, _LC_P, _LC_P, _LC_P]),
    "EVP_EncryptUpdate": (_LC_INT, [_LC_P, _LC_P, _LC_P, _LC_P, _LC_INT]),
    "EVP_DecryptUpdate": (_LC_INT, [_LC_P, _LC_P, _LC_P, _LC_P, _LC_INT]),
    "EVP_EncryptFinal_ex": (_LC_INT, [_LC_P, _LC_P, _LC_P]),
    "EVP_DecryptFinal_ex": (_LC_INT, [_LC_P, _LC_P, _LC_P]),
    "EVP_PKEY_new_raw_private_key": (_LC_P, [_LC_INT, _LC_P, _LC_P, _LC_SIZE]),
    "EVP_PKEY_new_raw_public_key": (_LC_P, [_LC_INT, _LC_P, _LC_P, _LC_SIZE]),
    "EVP_PKEY_get_raw_public_key": (_LC_INT, [_LC_P, _LC_P, _LC_SIZE_P]),
    "EVP_PKEY_free": (None, [_LC_P]),
    "EVP_PKEY_CTX_new": (_LC_P, [_LC_P, _LC_P]),
    "EVP_PKEY_CTX_free": (None, [_LC_P]),
    "EVP_PKEY_CTX_ctrl": (_LC_INT, [_LC_P, _LC_INT, _LC_INT, _LC_INT, _LC_INT, _LC_P]),
    "EVP_PKEY_derive_init": (_LC_INT, [_LC_P]),
    "EVP_PKEY_derive_set_peer": (_LC_INT, [_LC_P, _LC_P]),
    "EVP_PKEY_derive": (_LC_INT, [_LC_P, _LC_P, _LC_SIZE_P]),
    "d2i_AutoPrivateKey": (_LC_P, [_LC_P, ctypes.POINTER(_LC_P), ctypes.c_long]),
    "EVP_MD_CTX_new": (_LC_P, []),
    "EVP_MD_CTX_free": (None, [_LC_P]),
    "EVP_DigestSignInit": (_LC_INT, [_LC_P, ctypes.POINTER(_LC_P), _LC_P, _LC_P, _LC_P]),
    "EVP_DigestSign": (_LC_INT, [_LC_P, _LC_P, _LC_SIZE_P, _LC_P, _LC_SIZE]),
    # The EC_KEY calls are deprecated in OpenSSL 3.0 but present in 1.1.1 and every 3.x; the
    # EVP replacements for raw points differ between the two (EVP_PKEY_fromdata is 3.0 only).
    "EC_KEY_new_by_curve_name": (_LC_P, [_LC_INT]),
    "EC_KEY_generate_key": (_LC_INT, [_LC_P]),
    "EC_KEY_get0_group": (_LC_P, [_LC_P]),
    "EC_KEY_get0_public_key": (_LC_P, [_LC_P]),
    "EC_KEY_free": (None, [_LC_P]),
    "EC_POINT_new": (_LC_P, [_LC_P]),
    "EC_POINT_free": (None, [_LC_P]),
    "EC_POINT_oct2point": (_LC_INT, [_LC_P, _LC_P, _LC_P, _LC_SIZE, _LC_P]),
    "EC_POINT_point2oct": (_LC_SIZE, [_LC_P, _LC_P, _LC_INT, _LC_P, _LC_SIZE, _LC_P]),
    "ECDH_compute_key": (_LC_INT, [_LC_P, _LC_SIZE, _LC_P, _LC_P, _LC_P]),
}

_LC_MIN_VERSION = 0x10101000          # 1.1.1: raw X25519/Ed25519 keys, EVP_DigestSign
_LC_EVP_CTRL_AEAD_GET_TAG = 0x10
_LC_EVP_CTRL_AEAD_SET_TAG = 0x11
_LC_EVP_PKEY_RSA = 6
_LC_EVP_PKEY_X25519 = 1034
_LC_EVP_PKEY_ED25519 = 1087
_LC_EVP_PKEY_CTRL_RSA_PADDING = 0x1001
_LC_EVP_PKEY_CTRL_RSA_PSS_SALTLEN = 0x1002
_LC_RSA_PKCS1_PSS_PADDING = 6
_LC_RSA_PSS_SALTLEN_DIGEST = -1        # salt as long as the hash, as TLS 1.3 requires (§4.2.3)
_LC_POINT_CONVERSION_UNCOMPRESSED = 4
_LC_CURVE_NIDS = {"secp256r1": 415, "secp384r1": 715}  # NID_X9_62_prime256v1, NID_secp384r1
_LC_RECORD_BUFFER = 16384 + 256        # the largest TLS 1.3 record's ciphertext


def _lc_library_path():
    """The libcrypto mapped into this process by _hashlib (read from /proc/self/maps)."""
    try:
        import _hashlib  # noqa: F401  (loads libcrypto, unless Python was built without it)
    except ImportError as exc:
        raise LibcryptoUnavailable(f"this Python has no _hashlib ({exc}); use a Python built "
                                   f"with OpenSSL, or the pure-Python crypto") from None
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        paths = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    found = sorted({p for p in paths if os.path.basename(p).startswith("libcrypto.so")})
    if not found:
        raise LibcryptoUnavailable("this Python's _hashlib does not use a shared libcrypto "
                                   "(OpenSSL linked statically?); use the pure-Python crypto")
    if len(found) > 1:
        raise LibcryptoUnavailable(f"several libcrypto libraries are loaded ({', '.join(found)}); "
                                   f"use the pure-Python crypto")
    return found[0]


def _lc_open(path):
    """CDLL(path) with every _LC_FUNCTIONS entry declared; LibcryptoUnavailable if one is missing
    or the version is below 1.1.1."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise LibcryptoUnavailable(f"cannot open {path} ({exc}); use the pure-Python crypto") \
            from None
    missing = [name for name in _LC_FUNCTIONS if not hasattr(lib, name)]
    if "OpenSSL_version_num" in missing:  # named SSLeay before 1.1.0
        raise LibcryptoUnavailable(f"{path} is older than OpenSSL 1.1.1; upgrade OpenSSL or use "
                                   f"the pure-Python crypto")
    if missing:
        raise LibcryptoUnavailable(f"{path} lacks {', '.join(missing)}; use OpenSSL 1.1.1 or 3.x, "
                                   f"or the pure-Python crypto")
    for name, (restype, argtypes) in _LC_FUNCTIONS.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    if lib.OpenSSL_version_num() < _LC_MIN_VERSION:
        raise LibcryptoUnavailable(f"{path} is {lib.OpenSSL_version(0).decode()}, older than "
                                   f"1.1.1; upgrade OpenSSL or use the pure-Python crypto")
    return lib


def _lc_check(c, result, name):
    """result of a call of c that gives 1 or a pointer on success; RuntimeError naming it
    otherwise, the error queue emptied so that no stale error reaches CPython's hashlib or ssl."""
    if not result or result < 0:
        c.ERR_clear_error()
        raise RuntimeError(f"libcrypto {name} failed")
    return result


class _LcOutput(threading.local):
    """The buffer AEAD output goes to before it is copied out, one per thread rather than one
    per AEAD object: a connection's two 16 KiB buffers would double its memory, and ctypes
    calls release the GIL, so threads (tests) must not share one."""

    def __init__(self):
        self.size = 0
        self.room(_LC_RECORD_BUFFER)

    def room(self, n):
        """The buffer's address, the buffer grown first if n bytes do not fit."""
        if n > self.size:
            self.buffer = ctypes.create_string_buffer(n)
            self.size, self.address = n, ctypes.addressof(self.buffer)
        return self.address


_LC_OUTPUT = _LcOutput()


class _LcAEAD:
    """An AEAD on one EVP_CIPHER_CTX per direction, each keyed once: a record then sets only its
    IV.  The in-place calls work on the caller's buffer; seal and open copy through the
    thread's _LC_OUTPUT buffer.  Subclasses set _c (the CDLL), _name, _check_key and
    _cipher_for, and raise the pure class's exceptions."""

    def __init__(self, key):
        self._check_key(key)
        self._key = bytes(key)
        self._cipher_ptr = getattr(self._c, self._cipher_for(len(key)))()
        self._seal_ctx = self._open_ctx = None   # made on first use: a direction uses one
        self._len = ctypes.c_int()   # where EVP_*Update and *Final write a length we ignore
        self._len_addr = ctypes.addressof(self._len)

    def __del__(self):
        for ctx in (getattr(self, "_seal_ctx", None), getattr(self, "_open_ctx", None)):
            if ctx:
                self._c.EVP_CIPHER_CTX_free(ctx)

    def _context(self, init):
        """A new context keyed for init (EVP_EncryptInit_ex or EVP_DecryptInit_ex)."""
        c = self._c
        ctx = _lc_check(c, c.EVP_CIPHER_CTX_new(), "EVP_CIPHER_CTX_new")
        if init(ctx, self._cipher_ptr, None, self._key, None) != 1:
            c.EVP_CIPHER_CTX_free(ctx)
            _lc_check(c, 0, init.__name__)
        return ctx

    def seal_in_place(self, nonce, aad, view, address, n):
        """As _AEADInPlace.seal_in_place: view is not touched, only its address."""
        if len(nonce) != 12:
            raise ValueError(f"{self._name} nonce must be 12 bytes, got {len(nonce)}")
        c = self._c
        if self._seal_ctx is None:
            self._seal_ctx = self._context(c.EVP_EncryptInit_ex)
        ctx, length, aad = self._seal_ctx, self._len_addr, bytes(aad)
        ok = (c.EVP_EncryptInit_ex(ctx, None, None, None, bytes(nonce)) == 1
              and c.EVP_EncryptUpdate(ctx, None, length, aad, len(aad)) == 1
              and c.EVP_EncryptUpdate(ctx, address, length, address, n) == 1
              and c.EVP_EncryptFinal_ex(ctx, address + n, length) == 1
              and c.EVP_CIPHER_CTX_ctrl(ctx, _LC_EVP_CTRL_AEAD_GET_TAG, 16, address + n) == 1)
        if not ok:
            _lc_check(c, ok, f"{self._name} seal")

    def open_in_place(self, nonce, aad, view, address, n):
        """As _AEADInPlace.open_in_place: view is not touched, only its address."""
        if len(nonce) != 12:
            raise AEADError(f"{self._name} nonce must be 12 bytes, got {len(nonce)}")
        c = self._c
        if self._open_ctx is None:
            self._open_ctx = self._context(c.EVP_DecryptInit_ex)
        ctx, length, aad = self._open_ctx, self._len_addr, bytes(aad)
        ok = (c.EVP_DecryptInit_ex(ctx, None, None, None, bytes(nonce)) == 1
              and c.EVP_DecryptUpdate(ctx, None, length, aad, len(aad)) == 1
              and c.EVP_DecryptUpdate(ctx, address, length, address, n) == 1
              and c.EVP_CIPHER_CTX_ctrl(ctx, _LC_EVP_CTRL_AEAD_SET_TAG, 16, address + n) == 1)
        if not ok:
            _lc_check(c, ok, f"{self._name} open")
        # Final checks the tag: until it passes, the decrypted bytes must not be used.
        if c.EVP_DecryptFinal_ex(ctx, address + n, length) != 1:
            c.ERR_clear_error()
            raise AEADError(f"{self._name} authentication failed")

    def seal(self, nonce, plaintext, aad):
        n = len(plaintext)
        out = _LC_OUTPUT.room(n + 16)
        ctypes.memmove(out, bytes(plaintext), n)
        self.seal_in_place(nonce, aad, None, out, n)
        return ctypes.string_at(out, n + 16)

    def open(self, nonce, data, aad):
        if len(data) < 16:
            raise AEADError(f"{self._name} input shorter than the tag")
        n = len(data) - 16
        out = _LC_OUTPUT.room(n + 16)
        ctypes.memmove(out, bytes(data), n + 16)
        self.open_in_place(nonce, aad, None, out, n)
        return ctypes.string_at(out, n)


class _LcAESGCM(_LcAEAD):
    _name = "AES-GCM"

    @staticmethod
    def _check_key(key):
        if len(key) not in (16, 32):
            raise ValueError(f"AES key must be 16 or 32 bytes, got {len(key)}")

    @staticmethod
    def _cipher_for(key_len):
        return "EVP_aes_128_gcm" if key_len == 16 else "EVP_aes_256_gcm"


class _LcChaCha20Poly1305(_LcAEAD):
    _name = "ChaCha20-Poly1305"

    @staticmethod
    def _check_key(key):
        if len(key) != 32:
            raise ValueError(f"ChaCha20-Poly1305 key must be 32 bytes, got {len(key)}")

    @staticmethod
    def _cipher_for(key_len):
        return "EVP_chacha20_poly1305"


def _lc_sign(c, pkey, md, pss, message, out):
    """EVP_DigestSign of message with pkey and digest md (NULL for Ed25519) into the buffer out;
    pss: RSA-PSS with a salt as long as the digest."""
    ctx = _lc_check(c, c.EVP_MD_CTX_new(), "EVP_MD_CTX_new")
    try:
        pctx = ctypes.c_void_p()
        _lc_check(c, c.EVP_DigestSignInit(ctx, ctypes.byref(pctx), md, None, pkey),
                  "EVP_DigestSignInit")
        if pss:
            _lc_pss(c, pctx)
        size = ctypes.c_size_t(len(out))
        _lc_check(c, c.EVP_DigestSign(ctx, out, ctypes.byref(size), message, len(message)),
                  "EVP_DigestSign")
        return out.raw[:size.value]
    finally:
        c.EVP_MD_CTX_free(ctx)  # frees pctx too


def _lc_pss(c, pctx):
    """PSS padding, salt as long as the digest, on a signing EVP_PKEY_CTX (1.1.1 and 3.x)."""
    for cmd, value in ((_LC_EVP_PKEY_CTRL_RSA_PADDING, _LC_RSA_PKCS1_PSS_PADDING),
                       (_LC_EVP_PKEY_CTRL_RSA_PSS_SALTLEN, _LC_RSA_PSS_SALTLEN_DIGEST)):
        _lc_check(c, c.EVP_PKEY_CTX_ctrl(pctx, _LC_EVP_PKEY_RSA, -1, cmd, value, None),
                  "EVP_PKEY_CTX_ctrl")


class _LcSigningKey:
    """A PrivateKey loaded into libcrypto once (from its PKCS#8 DER), with the surface the TLS
    layer uses: kind, description, signature_schemes, sign(scheme, message), spki_der()."""

    def __init__(self, c, private_key):
        self._c = c
        self._private_key = private_key
        self.kind = private_key.kind
        self.description = private_key.description
        self.signature_schemes = list(private_key.signature_schemes)
        der = private_key.pkcs8_der()
        cursor = ctypes.c_void_p(ctypes.cast(ctypes.c_char_p(der), ctypes.c_void_p).value)
        self._pkey = _lc_check(c, c.d2i_AutoPrivateKey(None, ctypes.byref(cursor), len(der)),
                               "d2i_AutoPrivateKey")
        # EVP_PKEY_size is a macro in 3.x; 512 bytes hold the largest signature of a supported
        # key (RSA-4096; ECDSA P-384 needs at most 104, Ed25519 64).
        self._signature = ctypes.create_string_buffer(512)

    def __del__(self):
        if getattr(self, "_pkey", None):
            self._c.EVP_PKEY_free(self._pkey)

    def spki_der(self):
        return self._private_key.spki_der()

    def _digest(self, scheme):
        """The EVP_MD for scheme: NULL for Ed25519, which hashes inside the signature."""
        if self.kind == "ed25519":
            return None
        if self.kind == "rsa":
            return getattr(self._c, f"EVP_{_PKI_RSA_SCHEME_HASH[scheme]}")()
        return getattr(self._c, f"EVP_{self._private_key.key.curve.hash_name}")()

    def sign(self, scheme, message):
        """The signature of message under TLS SignatureScheme `scheme` (ECDSA: DER, as TLS
        wants and as ECDSAKey.sign makes)."""
        if scheme not in self.signature_schemes:
            raise ValueError(f"a {self.description} key cannot make signature scheme {scheme:#06x}")
        return _lc_sign(self._c, self._pkey, self._digest(scheme), self.kind == "rsa",
                        bytes(message), self._signature)


class Libcrypto:
    """The loaded libcrypto: AESGCM and ChaCha20Poly1305 classes with the pure classes' interface,
    x25519_ephemeral_shared, ecdh_ephemeral and signing_key.  Made by libcrypto_load()."""

    def __init__(self, path):
        self.path = path
        self._c = _lc_open(path)
        self.version = self._c.OpenSSL_version(0).decode()
        self.AESGCM = type("AESGCM", (_LcAESGCM,), {"_c": self._c})
        self.ChaCha20Poly1305 = type("ChaCha20Poly1305", (_LcChaCha20Poly1305,), {"_c": self._c})

    def _raw_key(self, new, key_type, raw, name):
        return _lc_check(self._c, new(key_type, None, raw, len(raw)), name)

    def _derive(self, ours, peer, size):
        """The EVP_PKEY_derive secret of our key and the peer's; None if the derivation fails."""
        c = self._c
        pctx = _lc_check(c, c.EVP_PKEY_CTX_new(ours, None), "EVP_PKEY_CTX_new")
        try:
            out, length = ctypes.create_string_buffer(size), ctypes.c_size_t(size)
            _lc_check(c, c.EVP_PKEY_derive_init(pctx), "EVP_PKEY_derive_init")
            _lc_check(c, c.EVP_PKEY_derive_set_peer(pctx, peer), "EVP_PKEY_derive_set_peer")
            if c.EVP_PKEY_derive(pctx, out, ctypes.byref(length)) != 1:
                c.ERR_clear_error()
                return None
            return out.raw[:length.value]
        finally:
            c.EVP_PKEY_CTX_free(pctx)

    def x25519_ephemeral_shared(self, peer_pub):
        """(public key, shared secret) for a fresh ephemeral key and peer_pub, as the pure
        x25519_ephemeral_shared; the same ValueErrors."""
        _x25519_check_peer(peer_pub)
        c = self._c
        ours = self._raw_key(c.EVP_PKEY_new_raw_private_key, _LC_EVP_PKEY_X25519,
                             secrets.token_bytes(32), "EVP_PKEY_new_raw_private_key")
        try:
            public, length = ctypes.create_string_buffer(32), ctypes.c_size_t(32)
            _lc_check(c, c.EVP_PKEY_get_raw_public_key(ours, public, ctypes.byref(length)),
                      "EVP_PKEY_get_raw_public_key")
            peer = self._raw_key(c.EVP_PKEY_new_raw_public_key, _LC_EVP_PKEY_X25519,
                                 bytes(peer_pub), "EVP_PKEY_new_raw_public_key")
            try:
                shared = self._derive(ours, peer, 32)
            finally:
                c.EVP_PKEY_free(peer)
        finally:
            c.EVP_PKEY_free(ours)
        # OpenSSL refuses to derive exactly when the result is all zero (a low-order peer key):
        # that refusal becomes the pure code's ValueError.
        return public.raw, _x25519_check_shared(shared or bytes(32))

    def ecdh_ephemeral(self, curve, peer_pub):
        """(our uncompressed public point, shared x coordinate) for a fresh key on curve
        (SECP256R1 or SECP384R1) and peer_pub; the pure checks, so the same ValueErrors."""
        _ecp_decode_point(curve, peer_pub)
        c = self._c
        key = _lc_check(c, c.EC_KEY_new_by_curve_name(_LC_CURVE_NIDS[curve.name]),
                        "EC_KEY_new_by_curve_name")
        try:
            _lc_check(c, c.EC_KEY_generate_key(key), "EC_KEY_generate_key")
            group = c.EC_KEY_get0_group(key)
            point = _lc_check(c, c.EC_POINT_new(group), "EC_POINT_new")
            try:
                return self._ecdh(curve, key, group, point, bytes(peer_pub))
            finally:
                c.EC_POINT_free(point)
        finally:
            c.EC_KEY_free(key)

    def _ecdh(self, curve, key, group, point, peer_pub):
        c = self._c
        size = curve.byte_len
        _lc_check(c, c.EC_POINT_oct2point(group, point, peer_pub, len(peer_pub), None),
                  "EC_POINT_oct2point")
        shared = ctypes.create_string_buffer(size)
        if c.ECDH_compute_key(shared, size, point, key, None) != size:
            _lc_check(c, 0, "ECDH_compute_key")
        public = ctypes.create_string_buffer(1 + 2 * size)
        if c.EC_POINT_point2oct(group, c.EC_KEY_get0_public_key(key),
                                _LC_POINT_CONVERSION_UNCOMPRESSED, public, len(public),
                                None) != len(public):
            _lc_check(c, 0, "EC_POINT_point2oct")
        return public.raw, shared.raw

    def signing_key(self, private_key):
        """private_key (a PrivateKey) as a libcrypto key with the same signing surface."""
        return _LcSigningKey(self._c, private_key)

    def _self_test(self):
        """Run every algorithm once, so a library built without one fails at start-up."""
        for name, aead, key_len in (("AES-128-GCM", self.AESGCM, 16),
                                    ("AES-256-GCM", self.AESGCM, 32),
                                    ("ChaCha20-Poly1305", self.ChaCha20Poly1305, 32)):
            key, nonce = bytes(key_len), bytes(12)
            self._try(name, lambda: aead(key).open(nonce, aead(key).seal(nonce, b"x", b"a"),
                                                   b"a") == b"x")
        nine = (9).to_bytes(32, "little")
        self._try("X25519", lambda: len(self.x25519_ephemeral_shared(nine)[1]) == 32)
        for curve in (SECP256R1, SECP384R1):
            generator = _ecp_encode_point(curve, curve.gx, curve.gy)
            self._try(curve.name, lambda: len(self.ecdh_ephemeral(curve, generator)[1])
                      == curve.byte_len)
        self._try("Ed25519", self._ed25519_known_answer)

    def _ed25519_known_answer(self):
        """RFC 8032 §7.1 TEST 1 from the raw seed: no pure-Python key (and its tables) needed."""
        c = self._c
        seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
        pkey = _lc_check(c, c.EVP_PKEY_new_raw_private_key(_LC_EVP_PKEY_ED25519, None, seed, 32),
                         "EVP_PKEY_new_raw_private_key")
        try:
            signature = _lc_sign(c, pkey, None, False, b"", ctypes.create_string_buffer(64))
        finally:
            c.EVP_PKEY_free(pkey)
        return signature.hex().startswith("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d8")

    def _try(self, name, test):
        """LibcryptoUnavailable naming the algorithm unless test() runs and returns True."""
        try:
            passed = test()
        except (ValueError, RuntimeError) as exc:
            passed = exc
        if passed is not True:
            raise LibcryptoUnavailable(f"{self.version} ({self.path}) fails its {name} self-test "
                                       f"({passed}); use the pure-Python crypto")


def libcrypto_load():
    """The Libcrypto that this Python's _hashlib uses, checked; LibcryptoUnavailable if there is
    none, or it is too old or lacks an algorithm."""
    lib = Libcrypto(_lc_library_path())
    lib._self_test()
    return lib


# === 6. TLS 1.3: server handshake state machine, record layer, kTLS hand-off ======================

# TLS 1.3 server side from RFC 8446: HKDF (RFC 5869), the key schedule, a server handshake
# state machine (bytes in -> bytes out, no I/O) and a userspace record layer for afterwards.
#
# The server offers no PSK, no session tickets, no client authentication and never accepts 0-RTT.

# === 6.1 HKDF and the key schedule (RFC 5869, RFC 8446 §7) =======================================

_TLS_HASH_LEN = {"sha256": 32, "sha384": 48}


def _tls_hash_len(hash_name):
    length = _TLS_HASH_LEN.get(hash_name)
    if length is None:
        length = _TLS_HASH_LEN[hash_name] = hashlib.new(hash_name).digest_size
    return length


# Named constructors and block sizes of the suites' hashes, for _tls_hmac.
_TLS_HMAC_HASHES = {"sha256": (hashlib.sha256, 64), "sha384": (hashlib.sha384, 128)}
_TLS_HMAC_IPAD = bytes(b ^ 0x36 for b in range(256))
_TLS_HMAC_OPAD = bytes(b ^ 0x5c for b in range(256))


def _tls_hmac(hash_name, key, msg):
    """HMAC (RFC 2104).  Written out for the suites' hashes because hmac.digest() looks the hash
    up by name in OpenSSL on every call, which costs more than the two hash computations; a
    handshake makes some twenty of these."""
    hash_and_block = _TLS_HMAC_HASHES.get(hash_name)
    if hash_and_block is None or len(key) > hash_and_block[1]:
        return hmac.digest(key, msg, hash_name)   # other hashes, and keys that must be hashed first
    new, block_size = hash_and_block
    padded = bytes(key).ljust(block_size, b"\x00")
    inner = new(padded.translate(_TLS_HMAC_IPAD) + msg).digest()
    return new(padded.translate(_TLS_HMAC_OPAD) + inner).digest()


def hkdf_extract(hash_name, salt, ikm):
    """HKDF-Extract: PRK = HMAC-Hash(salt, IKM); an empty salt means HashLen zero bytes."""
    if not salt:
        salt = bytes(_tls_hash_len(hash_name))
    return _tls_hmac(hash_name, salt, ikm)


def hkdf_expand(hash_name, prk, info, length):
    """HKDF-Expand: T(i) = HMAC-Hash(PRK, T(i-1) | info | i), output truncated to length."""
    hash_len = _tls_hash_len(hash_name)
    if 0 < length <= hash_len:
        # Every expansion in TLS 1.3 fits in one block: T(1) alone, no loop.
        return _tls_hmac(hash_name, prk, info + b"\x01")[:length]
    if not 0 < length <= 255 * hash_len:   # RFC 5869 §2.3: L <= 255 * HashLen
        raise ValueError(f"HKDF-Expand: length {length} outside 1..{255 * hash_len}")
    blocks = []
    block = b""
    produced = 0
    counter = 1
    while produced < length:
        block = _tls_hmac(hash_name, prk, block + info + bytes([counter]))
        blocks.append(block)
        produced += len(block)
        counter += 1
    return b"".join(blocks)[:length]


# (label, length) -> the HkdfLabel bytes before the context: a handshake uses the same dozen.
_TLS_HKDF_LABEL_HEADS = {}


def hkdf_expand_label(hash_name, secret, label, context, length):
    """HKDF-Expand-Label (RFC 8446 §7.1): info is the HkdfLabel struct with the "tls13 " prefix."""
    label = bytes(label)
    head = _TLS_HKDF_LABEL_HEADS.get((label, length))
    if head is None:
        full_label = b"tls13 " + label
        head = struct.pack(">HB", length, len(full_label)) + full_label
        if len(_TLS_HKDF_LABEL_HEADS) < 64:   # the protocol's labels only, whoever calls us
            _TLS_HKDF_LABEL_HEADS[label, length] = head
    return hkdf_expand(hash_name, secret, head + bytes((len(context),)) + context, length)


def derive_secret(hash_name, secret, label, transcript_hash):
    """Derive-Secret (RFC 8446 §7.1), taking the transcript hash already computed."""
    return hkdf_expand_label(hash_name, secret, label, transcript_hash, _tls_hash_len(hash_name))


# Hash of the empty string per hash name: the context of the "derived" secrets.
_TLS_EMPTY_HASHES = {}


def _tls_empty_hash(hash_name):
    empty = _TLS_EMPTY_HASHES.get(hash_name)
    if empty is None:
        empty = _TLS_EMPTY_HASHES[hash_name] = hashlib.new(hash_name).digest()
    return empty


_TLS_DERIVED_FROM_EARLY = {}


def _tls13_derived_from_early(hash_name):
    """Derive-Secret(Early Secret, "derived", "") without a PSK: a constant per hash, cached."""
    derived = _TLS_DERIVED_FROM_EARLY.get(hash_name)
    if derived is None:
        zeros = bytes(_tls_hash_len(hash_name))
        early_secret = hkdf_extract(hash_name, zeros, zeros)
        derived = derive_secret(hash_name, early_secret, b"derived", _tls_empty_hash(hash_name))
        _TLS_DERIVED_FROM_EARLY[hash_name] = derived
    return derived


def _tls13_early_secret(hash_name, psk):
    """Early Secret = HKDF-Extract(0, PSK) (§7.1), for a resumed session."""
    return hkdf_extract(hash_name, b"", psk)


def _tls13_binder_key(hash_name, early_secret):
    """binder_key of a resumption PSK (§7.1: "res binder"), whose Finished MAC is the binder."""
    return derive_secret(hash_name, early_secret, b"res binder", _tls_empty_hash(hash_name))


def _tls13_handshake_secrets(hash_name, shared_secret, hello_hash, early_secret=None):
    """Handshake Secret and the client/server handshake traffic secrets (transcript CH..SH);
    early_secret is a resumed session's, None without a PSK."""
    if early_secret is None:
        derived = _tls13_derived_from_early(hash_name)
    else:
        derived = derive_secret(hash_name, early_secret, b"derived", _tls_empty_hash(hash_name))
    handshake_secret = hkdf_extract(hash_name, derived, shared_secret)
    client = derive_secret(hash_name, handshake_secret, b"c hs traffic", hello_hash)
    server = derive_secret(hash_name, handshake_secret, b"s hs traffic", hello_hash)
    return handshake_secret, client, server


def _tls13_application_secrets(hash_name, handshake_secret, server_finished_hash):
    """Master Secret and the first client/server application traffic secrets (transcript CH..
    server Finished)."""
    salt = derive_secret(hash_name, handshake_secret, b"derived", _tls_empty_hash(hash_name))
    master_secret = hkdf_extract(hash_name, salt, bytes(_tls_hash_len(hash_name)))
    client = derive_secret(hash_name, master_secret, b"c ap traffic", server_finished_hash)
    server = derive_secret(hash_name, master_secret, b"s ap traffic", server_finished_hash)
    return master_secret, client, server


def _tls13_finished_mac(hash_name, base_secret, transcript_hash):
    """Finished verify_data (RFC 8446 §4.4.4): HMAC(finished_key, transcript hash)."""
    finished_key = hkdf_expand_label(hash_name, base_secret, b"finished", b"",
                                     _tls_hash_len(hash_name))
    return _tls_hmac(hash_name, finished_key, transcript_hash)


def _tls13_next_traffic_secret(hash_name, secret):
    """application_traffic_secret_N+1 after a KeyUpdate (RFC 8446 §7.2)."""
    return hkdf_expand_label(hash_name, secret, b"traffic upd", b"", _tls_hash_len(hash_name))


# === 6.2 Messages and records (RFC 8446 §4, §5.1, §6) ==========================================

_TLS_CT_CHANGE_CIPHER_SPEC = 20
_TLS_CT_ALERT = 21
_TLS_CT_HANDSHAKE = 22
_TLS_CT_APPLICATION_DATA = 23

_TLS_HS_CLIENT_HELLO = 1
_TLS_HS_SERVER_HELLO = 2
_TLS_HS_NEW_SESSION_TICKET = 4
_TLS_HS_ENCRYPTED_EXTENSIONS = 8
_TLS_HS_CERTIFICATE = 11
_TLS_HS_CERTIFICATE_VERIFY = 15
_TLS_HS_FINISHED = 20
_TLS_HS_KEY_UPDATE = 24
_TLS_HS_MESSAGE_HASH = 254

_TLS_EXT_SERVER_NAME = 0
_TLS_EXT_SUPPORTED_GROUPS = 10
_TLS_EXT_SIGNATURE_ALGORITHMS = 13
_TLS_EXT_ALPN = 16
_TLS_EXT_PRE_SHARED_KEY = 41
_TLS_EXT_EARLY_DATA = 42
_TLS_EXT_SUPPORTED_VERSIONS = 43
_TLS_EXT_PSK_KEY_EXCHANGE_MODES = 45
_TLS_EXT_KEY_SHARE = 51
_TLS_EXT_PADDING = 21   # RFC 7685

_TLS_ALERT_CLOSE_NOTIFY = 0
_TLS_ALERT_UNEXPECTED_MESSAGE = 10
_TLS_ALERT_BAD_RECORD_MAC = 20
_TLS_ALERT_RECORD_OVERFLOW = 22
_TLS_ALERT_HANDSHAKE_FAILURE = 40
_TLS_ALERT_ILLEGAL_PARAMETER = 47
_TLS_ALERT_DECODE_ERROR = 50
_TLS_ALERT_DECRYPT_ERROR = 51
_TLS_ALERT_PROTOCOL_VERSION = 70
_TLS_ALERT_INTERNAL_ERROR = 80
_TLS_ALERT_USER_CANCELED = 90
_TLS_ALERT_MISSING_EXTENSION = 109
_TLS_ALERT_NO_APPLICATION_PROTOCOL = 120

# AlertLevel (§6): our close_notify goes as a warning, every other alert we send as fatal.
_TLS_ALERT_WARNING = 1
_TLS_ALERT_FATAL = 2
_TLS_CLOSE_NOTIFY_BODY = bytes([_TLS_ALERT_WARNING, _TLS_ALERT_CLOSE_NOTIFY])

_TLS_ALERT_NAMES = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
    47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security",
    80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
    109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
    113: "bad_certificate_status_response", 115: "unknown_psk_identity",
    116: "certificate_required", 120: "no_application_protocol",
}

TLS_AES_128_GCM_SHA256 = 0x1301
TLS_AES_256_GCM_SHA384 = 0x1302
TLS_CHACHA20_POLY1305_SHA256 = 0x1303

# What a cipher suite means (§B.4): transcript and HKDF hash, AEAD key length and class, name.
_TLSSuite = collections.namedtuple("_TLSSuite", "hash_name key_len aead_class name")
_TLS_SUITES = {
    TLS_AES_128_GCM_SHA256: _TLSSuite("sha256", 16, AESGCM, "TLS_AES_128_GCM_SHA256"),
    TLS_AES_256_GCM_SHA384: _TLSSuite("sha384", 32, AESGCM, "TLS_AES_256_GCM_SHA384"),
    TLS_CHACHA20_POLY1305_SHA256: _TLSSuite("sha256", 32, ChaCha20Poly1305,
                                            "TLS_CHACHA20_POLY1305_SHA256"),
}

TLS_GROUP_X25519 = 0x001d
TLS_GROUP_SECP256R1 = 0x0017
TLS_GROUP_SECP384R1 = 0x0018
TLS_GROUP_X25519MLKEM768 = 0x11ec   # draft-ietf-tls-ecdhe-mlkem: post-quantum hybrid
# The post-quantum hybrid first, as rustls and the browsers prefer it.
_TLS_GROUP_PREFERENCE = (TLS_GROUP_X25519MLKEM768, TLS_GROUP_X25519, TLS_GROUP_SECP256R1,
                         TLS_GROUP_SECP384R1)
TLS_GROUP_NAMES = {"x25519mlkem768": TLS_GROUP_X25519MLKEM768,   # --tls-groups
                   "x25519": TLS_GROUP_X25519, "p256": TLS_GROUP_SECP256R1,
                   "p384": TLS_GROUP_SECP384R1}
_TLS_GROUP_CURVES = {TLS_GROUP_SECP256R1: SECP256R1, TLS_GROUP_SECP384R1: SECP384R1}  # ECDHE

_TLS_VERSION_13 = 0x0304
_TLS_LEGACY_VERSION = 0x0303

_TLS_RECORD_HEADER_LEN = 5                   # type, legacy_record_version, length (§5.1)
_TLS_MAX_PLAINTEXT = 1 << 14                 # §5.1
_TLS_MAX_INNER_PLAINTEXT = (1 << 14) + 1     # content + inner content type, §5.2
_TLS_MAX_CIPHERTEXT = (1 << 14) + 256        # §5.2
_TLS_MAX_RECORD = _TLS_RECORD_HEADER_LEN + _TLS_MAX_CIPHERTEXT   # a whole record, header included
_TLS_AEAD_TAG_LEN = 16                       # all three suites
_TLS_RECORD_OVERHEAD = _TLS_RECORD_HEADER_LEN + 1 + _TLS_AEAD_TAG_LEN   # header, type, tag
_TLS_RECORD_HEADER = struct.Struct(">BHH")
_TLS_CLOSE_NOTIFY_ROOM = _TLS_RECORD_OVERHEAD + 2                     # a sealed close_notify
# Largest handshake message we buffer. Real ClientHellos are a few KB even with post-quantum
# key shares; this bounds memory per connection.
_TLS_MAX_HANDSHAKE_MESSAGE = 1 << 16
# We never accept 0-RTT, so a client that sends it anyway has its records skipped (§4.2.10).
# We never issued a max_early_data_size, so the skipping budget is our own choice.
_TLS_MAX_EARLY_DATA_SKIP = 1 << 16

# ServerHello.random of a HelloRetryRequest: SHA-256("HelloRetryRequest"), §4.1.3.
_TLS_HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
# §4.4.3: 64 spaces, the context string and a zero byte precede the transcript hash.
_TLS_CERT_VERIFY_PREFIX = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
_TLS_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"


class _TLSFatal(Exception):
    """A fatal protocol error: alert is the code to send (None when the peer's alert ended it)."""

    def __init__(self, alert, message):
        Exception.__init__(self, message)
        self.alert = alert
        self.message = message


class _TLSReader:
    """Strict cursor over a byte string: any overrun or length-range violation is decode_error."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data, what):
        self.data = data
        self.pos = 0
        self.what = what

    def _fail(self, detail):
        raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, f"{self.what}: {detail}")

    def take(self, n):
        end = self.pos + n
        if end > len(self.data):
            self._fail("truncated")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def uint(self, size):
        end = self.pos + size
        if end > len(self.data):
            self._fail("truncated")
        value = int.from_bytes(self.data[self.pos:end], "big")
        self.pos = end
        return value

    def vector(self, len_size, min_len, max_len):
        """A <min..max> vector whose length prefix is len_size bytes."""
        # Written out rather than built on uint() and take(): a ClientHello has dozens.
        data = self.data
        start = self.pos + len_size
        if start > len(data):
            self._fail("truncated")
        length = int.from_bytes(data[self.pos:start], "big")
        if length < min_len or length > max_len:
            self._fail(f"vector length {length} outside {min_len}..{max_len}")
        end = start + length
        if end > len(data):
            self._fail("truncated")
        self.pos = end
        return data[start:end]

    def at_end(self):
        return self.pos == len(self.data)

    def expect_end(self):
        if self.pos != len(self.data):
            self._fail(f"{len(self.data) - self.pos} trailing bytes")


def _tls_uint16_list(data, len_size, min_len, max_len, what):
    """Parse a vector of uint16 values (groups, signature schemes, versions)."""
    reader = _TLSReader(data, what)
    body = reader.vector(len_size, min_len, max_len)
    reader.expect_end()
    return _tls_uint16_values(body, what)


def _tls_uint16_values(body, what):
    """The big-endian uint16 values packed in body."""
    if len(body) % 2:
        raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, f"{what}: odd length")
    return list(struct.unpack(f">{len(body) // 2}H", body))


def _tls_vec8(data):
    return bytes([len(data)]) + data


def _tls_vec16(data):
    return struct.pack(">H", len(data)) + data


def _tls_vec24(data):
    return len(data).to_bytes(3, "big") + data


def _tls_extension(ext_type, data):
    return struct.pack(">HH", ext_type, len(data)) + data


def _tls_handshake_message(msg_type, body):
    return bytes([msg_type]) + _tls_vec24(body)


def _tls_plaintext_records(content_type, data):
    """TLSPlaintext records (§5.1) carrying data, at most 2^14 bytes each."""
    records = []
    for start in range(0, len(data), _TLS_MAX_PLAINTEXT):
        fragment = data[start:start + _TLS_MAX_PLAINTEXT]
        header = _TLS_RECORD_HEADER.pack(content_type, _TLS_LEGACY_VERSION, len(fragment))
        records.append(header + fragment)
    return b"".join(records)


def _tls_alert_name(code):
    name = _TLS_ALERT_NAMES.get(code, "unknown")
    return f"{name}({code})"


def _tls_record_at(buf, pos, end):
    """The complete record at buf[pos:end] as (type, body start, body end), or None if
    incomplete.

    The content type is checked as soon as its byte is there, so that a non-TLS peer (say a
    plain-HTTP request on the TLS port) is rejected without waiting for more bytes.
    """
    if end - pos < 1:
        return None
    content_type = buf[pos]
    if not _TLS_CT_CHANGE_CIPHER_SPEC <= content_type <= _TLS_CT_APPLICATION_DATA:
        raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                        f"not a TLS record (content type {content_type})")
    if end - pos < _TLS_RECORD_HEADER_LEN:
        return None
    length = (buf[pos + 3] << 8) | buf[pos + 4]
    if length > _TLS_MAX_CIPHERTEXT:
        raise _TLSFatal(_TLS_ALERT_RECORD_OVERFLOW, f"record of {length} bytes")
    start = pos + _TLS_RECORD_HEADER_LEN
    if end < start + length:
        return None
    return content_type, start, start + length


def _tls_next_record(buf, pos):
    """The complete record at buf[pos:] as (type, header, body, next_pos), or None."""
    record = _tls_record_at(buf, pos, len(buf))
    if record is None:
        return None
    content_type, start, end = record
    return content_type, bytes(buf[pos:start]), bytes(buf[start:end]), end


def _tls_check_alert_body(body):
    # §5.1: alerts are never fragmented or coalesced, so an alert record holds exactly 2 bytes;
    # an empty one is not a short alert but a record that must not exist, as an empty handshake
    # record is: unexpected_message (§5.1, §5.4).
    if not body:
        raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "empty alert record")
    if len(body) != 2:
        raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, f"alert record of {len(body)} bytes")
    return body[1]


# === 6.3 Crypto backends: the primitives behind suites and groups =================================

# The TLS layer asks a backend for an AEAD class per suite, a key exchange per group and a
# signing key; it never learns which backend it has. Both give the same answers: the pure one is
# the reference.

_X25519MLKEM768_SHARE_LEN = _MLKEM_EK_LEN + 32


def x25519mlkem768_exchange(x25519_ephemeral_shared, peer_share):
    """X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem §3, FIPS 203) with the given ephemeral X25519:
    the client's share is an ML-KEM-768 encapsulation key then an X25519 public key; ours is the
    ciphertext then our X25519 public key; the secret is the ML-KEM shared key then the X25519
    one. ValueError for a bad share (its X25519 half is checked first, as it is cheaper)."""
    if len(peer_share) != _X25519MLKEM768_SHARE_LEN:
        raise ValueError(f"X25519MLKEM768 share of {len(peer_share)} bytes, not "
                         f"{_X25519MLKEM768_SHARE_LEN}")
    our_x25519, x25519_secret = x25519_ephemeral_shared(peer_share[_MLKEM_EK_LEN:])
    mlkem_secret, ciphertext = mlkem768_encaps(peer_share[:_MLKEM_EK_LEN])
    return ciphertext + our_x25519, mlkem_secret + x25519_secret


class PythonCrypto:
    """Section 5's pure-Python primitives: no dependency, slow, and not constant-time (README
    "Security notes")."""

    name = "python"
    description = "python (pure-Python primitives, tarweb.py section 5)"
    # ChaCha20-Poly1305 first: in pure Python it seals ~5x cheaper than AES-GCM.
    suite_preference = (TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256,
                        TLS_AES_256_GCM_SHA384)

    def aead_class(self, suite):
        return _TLS_SUITES[suite].aead_class

    def key_exchange(self, group, peer_share):
        """(our key_share, shared secret); ValueError for a bad peer share."""
        if group == TLS_GROUP_X25519:
            return x25519_ephemeral_shared(peer_share)
        if group == TLS_GROUP_X25519MLKEM768:
            return x25519mlkem768_exchange(x25519_ephemeral_shared, peer_share)
        curve = _TLS_GROUP_CURVES[group]
        private, public = ec_keypair(curve)
        return public, ecdh_shared(curve, private, peer_share)

    def signing_key(self, key):
        return key


class LibcryptoCrypto:
    """The same primitives from the host's OpenSSL libcrypto (section 5.19): a Libcrypto from
    libcrypto_load()."""

    name = "libcrypto"
    # AES-128-GCM first, as OpenSSL's own servers choose: it runs on the CPU's AES instructions.
    suite_preference = (TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384,
                        TLS_CHACHA20_POLY1305_SHA256)

    def __init__(self, lib):
        self.lib = lib
        self.description = f"libcrypto {lib.version} ({lib.path})"
        self._aeads = {AESGCM: lib.AESGCM, ChaCha20Poly1305: lib.ChaCha20Poly1305}

    def aead_class(self, suite):
        return self._aeads[_TLS_SUITES[suite].aead_class]

    def key_exchange(self, group, peer_share):
        """(our key_share, shared secret); ValueError for a bad peer share."""
        if group == TLS_GROUP_X25519:
            return self.lib.x25519_ephemeral_shared(peer_share)
        if group == TLS_GROUP_X25519MLKEM768:
            # ML-KEM stays in Python: OpenSSL has it only from 3.5 (Debian 12 has 3.0).
            return x25519mlkem768_exchange(self.lib.x25519_ephemeral_shared, peer_share)
        return self.lib.ecdh_ephemeral(_TLS_GROUP_CURVES[group], peer_share)

    def signing_key(self, key):
        """An object like key (a PrivateKey) whose sign() runs in libcrypto."""
        return self.lib.signing_key(key)


PYTHON_CRYPTO = PythonCrypto()


# === 6.4 Record protection and the record loop (§5.2-5.4) ========================================

class _TLSRecordCipher:
    """One direction of record protection: traffic secret, AEAD key, IV and sequence number."""

    def __init__(self, cipher_suite, secret, seq=0, crypto=PYTHON_CRYPTO):
        hash_name, key_len, _, _ = _TLS_SUITES[cipher_suite]
        self.cipher_suite = cipher_suite
        self.crypto = crypto
        self.secret = secret
        self.key = hkdf_expand_label(hash_name, secret, b"key", b"", key_len)
        self.iv = hkdf_expand_label(hash_name, secret, b"iv", b"", 12)
        self.seq = seq
        self._iv_int = int.from_bytes(self.iv, "big")
        self._aead_class = crypto.aead_class(cipher_suite)
        self._aead = None

    def next_generation(self):
        """The cipher for the next traffic secret after a KeyUpdate; the sequence restarts at 0."""
        hash_name = _TLS_SUITES[self.cipher_suite].hash_name
        next_secret = _tls13_next_traffic_secret(hash_name, self.secret)
        return _TLSRecordCipher(self.cipher_suite, next_secret, crypto=self.crypto)

    def _cipher(self):
        # Built on first use: AES-GCM precomputes tables per key (about 0.6 ms), wasted on the
        # application keys when the kernel (kTLS) takes over the connection.
        if self._aead is None:
            self._aead = self._aead_class(self.key)
        return self._aead

    def _nonce(self):
        # §5.3: the 64-bit sequence number, left-padded to the IV length, XORed with the IV.
        return (self._iv_int ^ self.seq).to_bytes(12, "big")

    def seal(self, content_type, content):
        """One TLSCiphertext record: content (any bytes-like object) plus its inner type, no
        padding."""
        inner = b"".join((content, bytes([content_type])))
        header = _TLS_RECORD_HEADER.pack(_TLS_CT_APPLICATION_DATA, _TLS_LEGACY_VERSION,
                                         len(inner) + _TLS_AEAD_TAG_LEN)
        record = header + self._cipher().seal(self._nonce(), inner, header)
        self.seq += 1
        return record

    def seal_records(self, content_type, data, then=()):
        """data split into records of at most 2^14 bytes of content each, followed by the
        records of `then`, a list of (content type, content)."""
        records = [(content_type, data[i:i + _TLS_MAX_PLAINTEXT])
                   for i in range(0, len(data), _TLS_MAX_PLAINTEXT)]
        records += then
        if len(records) > 1:   # their keystreams in one ChaCha20 pass (see _chacha20_keystreams)
            chacha20_poly1305_prefetch(
                self.keystream_requests([len(content) + 1 for _, content in records]))
        return b"".join([self.seal(kind, content) for kind, content in records])

    def keystream_requests(self, lengths):
        """Requests for chacha20_poly1305_prefetch: the next records, of these inner-plaintext
        lengths.  None (an empty list) for AES-GCM, which makes its keystream record by record,
        and for libcrypto's ChaCha20-Poly1305, which needs no prefetch."""
        if self._aead_class is not ChaCha20Poly1305:
            return []
        aead = self._cipher()
        return [(aead, (self._iv_int ^ (self.seq + i)).to_bytes(12, "big"), length)
                for i, length in enumerate(lengths)]

    def open(self, header, body):
        """(content type, content) of a protected record; AEADError (seq unchanged) if it fails."""
        inner = self._cipher().open(self._nonce(), body, header)
        self.seq += 1
        content_type, n = _tls_inner_content(inner, 0, len(inner))
        return content_type, inner[:n]

    def seal_in_place(self, content_type, view, address, pos, n):
        """seal() for content already in a buffer: view[pos + 5:pos + 5 + n], with 5 bytes of
        room before it for the header and _TLS_RECORD_OVERHEAD - 5 after it for the content
        type and tag (address is view's).  Returns the end of the record."""
        body = pos + _TLS_RECORD_HEADER_LEN
        header = _TLS_RECORD_HEADER.pack(_TLS_CT_APPLICATION_DATA, _TLS_LEGACY_VERSION,
                                         n + 1 + _TLS_AEAD_TAG_LEN)
        view[pos:body] = header
        view[body + n] = content_type
        self._cipher().seal_in_place(self._nonce(), header, view[body:], address + body, n + 1)
        self.seq += 1
        return body + n + 1 + _TLS_AEAD_TAG_LEN

    def open_in_place(self, view, address, pos, end):
        """open() for the record at view[pos:end], decrypted where it lies: (content type,
        content length), the content at view[pos + 5:]."""
        body = pos + _TLS_RECORD_HEADER_LEN
        n = end - body - _TLS_AEAD_TAG_LEN
        if n < 0:
            raise AEADError("record shorter than its tag")
        self._cipher().open_in_place(self._nonce(), view[pos:body], view[body:end],
                                     address + body, n)
        self.seq += 1
        return _tls_inner_content(view, body, n)


def _tls_inner_content(buf, start, n):
    """(content type, content length) of the TLSInnerPlaintext in buf[start:start + n]."""
    if n > _TLS_MAX_INNER_PLAINTEXT:
        raise _TLSFatal(_TLS_ALERT_RECORD_OVERFLOW, f"inner plaintext of {n} bytes")
    if n and buf[start + n - 1] == 0:
        # §5.4: the real content type is the last non-zero byte; zeros after it are padding.
        n = len(bytes(buf[start:start + n]).rstrip(b"\x00"))
    if not n:
        raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "record without a content type")
    return buf[start + n - 1], n - 1


def _tls_record_layout(pos, n):
    """(position, content length) of the records that carry n bytes of content, laid out one
    after another from pos for RecordLayer.seal_in_place."""
    step = _TLS_MAX_PLAINTEXT + _TLS_RECORD_OVERHEAD
    return [(pos + i // _TLS_MAX_PLAINTEXT * step, min(_TLS_MAX_PLAINTEXT, n - i))
            for i in range(0, n, _TLS_MAX_PLAINTEXT)]


def _tls_record_lengths(n):
    """Inner-plaintext lengths of the records that carry n bytes of content."""
    return [min(_TLS_MAX_PLAINTEXT, n - i) + 1 for i in range(0, n, _TLS_MAX_PLAINTEXT)]


class _TLSHandshakeBuffer:
    """Reassembles handshake messages split across records or packed into one (§5.1)."""

    def __init__(self):
        self._buf = bytearray()

    def add(self, fragment):
        if not fragment:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "empty handshake record")
        self._buf += fragment

    def pending(self):
        """True while part of a message is buffered (no other record type may come then)."""
        return bool(self._buf)

    def pop(self):
        """The next complete message, 4-byte header included, or None."""
        if len(self._buf) < 4:
            return None
        length = int.from_bytes(self._buf[1:4], "big")
        if length > _TLS_MAX_HANDSHAKE_MESSAGE:
            raise _TLSFatal(_TLS_ALERT_DECODE_ERROR,
                            f"handshake message type {self._buf[0]} of {length} bytes")
        if len(self._buf) < 4 + length:
            return None
        message = bytes(self._buf[:4 + length])
        del self._buf[:4 + length]
        return message

    def check_boundary(self, what):
        # §5.1: a key change must fall on a record boundary.
        if self._buf:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                            f"handshake data after {what} in the same record")


class _TLSRecordReader:
    """The reading side of TLSServer and RecordLayer: one record loop, and one mapping from
    what stops it to the alert we send, so that both answer the same error the same way.

    A subclass keeps the bytes not yet read in _inbuf and defines _reading() (False once it
    is done, closed or failed), _on_record(content_type, header, body, sink) and
    _fail(alert, message, sink); sink collects what one call returns.
    """

    def _read_records(self, data, sink):
        """Hand every complete record of the buffered bytes plus data to _on_record."""
        self._inbuf += data
        pos = 0
        try:
            while self._reading():
                record = _tls_next_record(self._inbuf, pos)
                if record is None:
                    break
                content_type, header, body, pos = record
                self._on_record(content_type, header, body, sink)
        except Exception as exc:
            self._stop_on(exc, sink)
        del self._inbuf[:pos]

    def _stop_on(self, exc, sink):
        """_fail with the alert a record loop's exception calls for."""
        if isinstance(exc, _TLSFatal):
            self._fail(exc.alert, exc.message, sink)
        else:   # a bug or a primitive failing: never a traceback to the peer
            self._fail(_TLS_ALERT_INTERNAL_ERROR, f"internal error: {exc!r}", sink)


# === 6.5 Userspace record layer for application data ==============================================

class RecordLayer(_TLSRecordReader):
    """Application-data record protection after the handshake, both directions.

    open(data) -> (plaintext, events, to_send). events may hold "close" (peer's close_notify),
    "alert" (peer's fatal alert) or "error" (we rejected a record; to_send holds our alert).
    to_send must be written before anything sealed afterwards (it may hold a KeyUpdate).
    received: bytes that came before this layer existed; the first open() reads them.
    crypto: the backend (section 6.3) whose AEAD classes protect the records.
    """

    def __init__(self, cipher_suite, rx_secret, tx_secret, rx_seq=0, tx_seq=0, received=b"",
                 crypto=PYTHON_CRYPTO):
        if cipher_suite not in _TLS_SUITES:
            raise ValueError(f"unknown TLS 1.3 cipher suite 0x{cipher_suite:04x}")
        self.cipher_suite = cipher_suite
        self._rx = _TLSRecordCipher(cipher_suite, rx_secret, rx_seq, crypto)
        self._tx = _TLSRecordCipher(cipher_suite, tx_secret, tx_seq, crypto)
        self._inbuf = bytearray(received)
        self._handshake = _TLSHandshakeBuffer()
        self._key_updates_owed = 0   # KeyUpdate(update_requested) received, not yet answered
        self.closed = False
        self.failed = False
        self.error = None
        self.close_notify_sealed = False

    @property
    def rx_seq(self):
        return self._rx.seq

    @property
    def tx_seq(self):
        return self._tx.seq

    @property
    def rx_secret(self):
        return self._rx.secret

    @property
    def tx_secret(self):
        return self._tx.secret

    def traffic_keys(self):
        """(rx_key, rx_iv, tx_key, tx_iv) of the current generation."""
        return self._rx.key, self._rx.iv, self._tx.key, self._tx.iv

    # For tests and tools: the server never looks at an incomplete record.
    def pending_bytes(self):
        """Received bytes of an incomplete record, not yet decrypted."""
        return bytes(self._inbuf)

    def seal(self, app_data, close=False):
        """Application data (bytes, bytearray or memoryview, e.g. of an mmap) as records of at
        most 2^14 bytes each; b"" for empty input.  close=True appends our close_notify,
        sealed in the same pass, for a connection whose last response this is."""
        then = []
        if close and not self.close_notify_sealed:
            then.append((_TLS_CT_ALERT, _TLS_CLOSE_NOTIFY_BODY))
            self.close_notify_sealed = True
        return self._tx.seal_records(_TLS_CT_APPLICATION_DATA, app_data, then)

    def seal_in_place(self, view, address, records, close=False):
        """seal() for application data laid out in a buffer (address is view's): records lists
        (position, length) of each record's content, one record at least; a content starts 5
        bytes after its position, with _TLS_RECORD_OVERHEAD bytes of room around it (see
        _tls_record_layout).  close=True puts our close_notify behind the last record; it needs
        _TLS_CLOSE_NOTIFY_ROOM bytes.  Returns where the sealed bytes end."""
        close = close and not self.close_notify_sealed
        if len(records) > 1 or close:   # their keystreams in one ChaCha20 pass (seal_records)
            lengths = [n + 1 for _, n in records]
            if close:
                lengths.append(len(_TLS_CLOSE_NOTIFY_BODY) + 1)
            chacha20_poly1305_prefetch(self._tx.keystream_requests(lengths))
        for pos, n in records:
            end = self._tx.seal_in_place(_TLS_CT_APPLICATION_DATA, view, address, pos, n)
        if close:
            self.close_notify_sealed = True
            n = len(_TLS_CLOSE_NOTIFY_BODY)
            view[end + _TLS_RECORD_HEADER_LEN:end + _TLS_RECORD_HEADER_LEN + n] = \
                _TLS_CLOSE_NOTIFY_BODY
            end = self._tx.seal_in_place(_TLS_CT_ALERT, view, address, end, n)
        return end

    def close_notify(self):
        """Our close_notify record, or b"" if it has been sealed already: it ends our side of
        the connection, so it goes out once."""
        if self.close_notify_sealed:
            return b""
        self.close_notify_sealed = True
        return self._tx.seal(_TLS_CT_ALERT, _TLS_CLOSE_NOTIFY_BODY)

    def open(self, data):
        if not self._reading():
            return b"", [], b""   # §6.1: data after a closure alert is ignored
        plaintext, events, to_send = sink = [], [], []
        self._read_records(data, sink)
        if not self._reading():
            self._inbuf.clear()   # nothing more is read, so nothing is kept either
        return b"".join(plaintext), events, self._answer_key_update(to_send)

    def _answer_key_update(self, to_send):
        """to_send joined, with our KeyUpdates behind it, one per update_requested read."""
        if not to_send and not self._key_updates_owed:
            return b""
        # §4.6.3: each update_requested is answered by an update_not_requested under the key of
        # the moment, then the key moves on, before any application data of ours. §4.6.3 would
        # let one answer cover several requests; answering each is what OpenSSL does and what
        # TLS test suites check. The server's caller bounds what a flood of them can pile up.
        while self._key_updates_owed and not self.failed:
            self._key_updates_owed -= 1
            to_send.append(self._tx.seal(_TLS_CT_HANDSHAKE,
                                         _tls_handshake_message(_TLS_HS_KEY_UPDATE, b"\x00")))
            self._tx = self._tx.next_generation()
        self._key_updates_owed = 0
        return b"".join(to_send)

    def buffered(self):
        """True while part of a record is held here: open_in_place cannot be used then."""
        return bool(self._inbuf)

    def open_in_place(self, view, address, start, end):
        """open() for received bytes that lie in a buffer (address is view's), when nothing is
        buffered(): each whole record in view[start:end] is decrypted where it lies, and its
        application data moved down to follow the previous record's, from start on.  Returns
        (end of the plaintext, events, to_send).  A record left incomplete at the end is kept
        here, as open() keeps it, and the bytes that complete it go to open()."""
        write = pos = start
        sink = [], [], []
        try:
            while not (self.closed or self.failed):   # _reading(), for the hot path
                record = _tls_record_at(view, pos, end)
                if record is None:
                    break
                content_type, body, next_pos = record
                if content_type != _TLS_CT_APPLICATION_DATA:
                    self._unprotected(content_type)
                inner_type, n = self._open_in_place(view, address, pos, next_pos)
                if inner_type == _TLS_CT_APPLICATION_DATA and not self._handshake.pending():
                    view[write:write + n] = view[body:body + n]
                    write += n
                else:
                    self._on_content(inner_type, bytes(view[body:body + n]), sink)
                pos = next_pos
        except Exception as exc:
            self._stop_on(exc, sink)
        if pos < end and self._reading():
            self._inbuf += view[pos:end]
        return write, sink[1], self._answer_key_update(sink[2])

    def _open_in_place(self, view, address, pos, end):
        try:
            return self._rx.open_in_place(view, address, pos, end)
        except AEADError:
            raise _TLSFatal(_TLS_ALERT_BAD_RECORD_MAC, "record failed to decrypt")

    def _reading(self):
        return not (self.closed or self.failed)

    def _fail(self, alert, message, sink):
        _, events, to_send = sink
        self.failed = True
        self.error = message
        events.append("error")
        to_send.append(self._tx.seal(_TLS_CT_ALERT, bytes([_TLS_ALERT_FATAL, alert])))

    def _on_record(self, content_type, header, body, sink):
        if content_type != _TLS_CT_APPLICATION_DATA:
            self._unprotected(content_type)
        try:
            inner_type, content = self._rx.open(header, body)
        except AEADError:
            raise _TLSFatal(_TLS_ALERT_BAD_RECORD_MAC, "record failed to decrypt")
        self._on_content(inner_type, content, sink)

    @staticmethod
    def _unprotected(content_type):
        raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                        f"unprotected record of type {content_type} after the handshake")

    def _on_content(self, inner_type, content, sink):
        plaintext, events, _ = sink
        if inner_type == _TLS_CT_HANDSHAKE:
            self._handshake.add(content)
            self._post_handshake_messages()
            return
        if self._handshake.pending():
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "record inside a fragmented message")
        if inner_type == _TLS_CT_APPLICATION_DATA:
            plaintext.append(content)
        elif inner_type == _TLS_CT_ALERT:
            self._peer_alert(_tls_check_alert_body(content), events)
        else:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, f"record of inner type {inner_type}")

    def _peer_alert(self, code, events):
        if code == _TLS_ALERT_CLOSE_NOTIFY:
            self.closed = True
            events.append("close")
        elif code != _TLS_ALERT_USER_CANCELED:   # user_canceled is followed by close_notify
            self.failed = True
            self.error = f"peer sent alert {_tls_alert_name(code)}"
            events.append("alert")

    def _post_handshake_messages(self):
        while True:
            message = self._handshake.pop()
            if message is None:
                break
            if message[0] != _TLS_HS_KEY_UPDATE:
                raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                                f"post-handshake message type {message[0]}")
            if len(message) != 5:
                raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, f"KeyUpdate of {len(message) - 4} bytes")
            if message[4] > 1:
                raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                                f"KeyUpdate request_update {message[4]}")
            self._handshake.check_boundary("KeyUpdate")
            self._rx = self._rx.next_generation()
            self._key_updates_owed += message[4]


# === 6.6 ClientHello parsing (§4.1.2, §4.2) =====================================================

_TLS_EXTENSION_HEADER = struct.Struct(">HH")


def _tls_retry_invariant(hello):
    """What a second ClientHello must repeat of the first (§4.1.2): every extension, in the same
    order and with the same data, except that key_share (checked apart) and pre_shared_key (its
    ages and binders are recomputed) may change their data, early_data may go (checked apart)
    and padding may come, go or change."""
    return [(ext_type, None if ext_type in (_TLS_EXT_KEY_SHARE, _TLS_EXT_PRE_SHARED_KEY) else data)
            for ext_type, data in hello.extensions.items()
            if ext_type not in (_TLS_EXT_EARLY_DATA, _TLS_EXT_PADDING)]


def _tls_parse_extensions(block, extensions):
    """Fill extensions (type -> extension_data) from a ClientHello's extension block; return the
    last type.  A plain loop over struct headers: a browser's hello carries some twenty."""
    end = len(block)
    pos = 0
    ext_type = None
    while pos < end:
        if pos + 4 > end:
            raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, "ClientHello extensions: truncated")
        ext_type, length = _TLS_EXTENSION_HEADER.unpack_from(block, pos)
        start = pos + 4
        pos = start + length
        if pos > end:
            raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, "ClientHello extensions: truncated")
        if ext_type in extensions:
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                            f"ClientHello: duplicate extension {ext_type}")
        extensions[ext_type] = block[start:pos]
    return ext_type


class _TLSClientHello:
    """The fields of a ClientHello; extensions maps type -> raw extension_data."""

    def __init__(self, message):
        self.message = message
        reader = _TLSReader(message[4:], "ClientHello")
        self.legacy_version = reader.uint(2)
        self.random = reader.take(32)
        self.session_id = reader.vector(1, 0, 32)
        self.cipher_suites = _tls_uint16_values(reader.vector(2, 2, 0xfffe),
                                                "ClientHello cipher_suites")
        self.compression_methods = reader.vector(1, 1, 255)
        self.extensions = {}
        if reader.at_end():
            return   # a pre-TLS 1.2 hello without extensions: rejected as protocol_version later
        block = reader.vector(2, 0, 0xffff)
        reader.expect_end()
        last_type = _tls_parse_extensions(block, self.extensions)
        if _TLS_EXT_PRE_SHARED_KEY in self.extensions and last_type != _TLS_EXT_PRE_SHARED_KEY:
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                            "ClientHello: pre_shared_key is not the last extension")

    def supported_versions(self):
        data = self.extensions.get(_TLS_EXT_SUPPORTED_VERSIONS)
        if data is None:
            return []
        return _tls_uint16_list(data, 1, 2, 254, "supported_versions")

    def uint16_extension(self, ext_type, what):
        """supported_groups / signature_algorithms as a list, None when absent."""
        data = self.extensions.get(ext_type)
        if data is None:
            return None
        return _tls_uint16_list(data, 2, 2, 0xfffe, what)

    def key_shares(self):
        """{group: key_exchange} of the key_share extension, None when absent."""
        data = self.extensions.get(_TLS_EXT_KEY_SHARE)
        if data is None:
            return None
        outer = _TLSReader(data, "key_share")
        reader = _TLSReader(outer.vector(2, 0, 0xffff), "key_share")
        outer.expect_end()
        shares = {}
        while not reader.at_end():
            group = reader.uint(2)
            key_exchange = reader.vector(2, 1, 0xffff)
            if group in shares:
                raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                                f"key_share: two shares for group 0x{group:04x}")
            shares[group] = key_exchange
        return shares

    def alpn_protocols(self):
        data = self.extensions.get(_TLS_EXT_ALPN)
        if data is None:
            return None
        outer = _TLSReader(data, "ALPN")
        reader = _TLSReader(outer.vector(2, 2, 0xffff), "ALPN")
        outer.expect_end()
        protocols = []
        while not reader.at_end():
            protocols.append(reader.vector(1, 1, 255))
        return protocols

    def server_name(self):
        """The host_name of the server_name extension (RFC 6066 §3), lower-cased, or None."""
        data = self.extensions.get(_TLS_EXT_SERVER_NAME)
        if data is None:
            return None
        outer = _TLSReader(data, "server_name")
        reader = _TLSReader(outer.vector(2, 1, 0xffff), "server_name")
        outer.expect_end()
        host = None
        while not reader.at_end():
            name_type = reader.uint(1)
            name = reader.vector(2, 1, 0xffff)
            if name_type != 0:
                continue
            if host is not None:
                raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER, "server_name: two host names")
            # A DNS name (RFC 6066 §3); anything but printable ASCII would only pollute logs.
            if any(byte < 0x21 or byte > 0x7e for byte in name):
                raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, "server_name: not a printable ASCII name")
            host = name.decode("ascii").lower()
        return host

    def psk_modes(self):
        """The psk_key_exchange_modes (§4.2.9) as bytes; empty when absent."""
        data = self.extensions.get(_TLS_EXT_PSK_KEY_EXCHANGE_MODES)
        if data is None:
            return b""
        reader = _TLSReader(data, "psk_key_exchange_modes")
        modes = reader.vector(1, 1, 255)
        reader.expect_end()
        return modes

    def pre_shared_key(self):
        """(identities, binders, binders_len) of the pre_shared_key extension (§4.2.11), None
        when absent: identities are (ticket, obfuscated_ticket_age) pairs, and binders_len is
        the size of the binders list with its length, the end of the hello that the binders do
        not cover (it is the last extension)."""
        data = self.extensions.get(_TLS_EXT_PRE_SHARED_KEY)
        if data is None:
            return None
        reader = _TLSReader(data, "pre_shared_key")
        identities = _TLSReader(reader.vector(2, 7, 0xffff), "pre_shared_key identities")
        binders_len = len(data) - reader.pos
        binders = _TLSReader(reader.vector(2, 33, 0xffff), "pre_shared_key binders")
        reader.expect_end()
        offered = []
        while not identities.at_end():
            offered.append((identities.vector(2, 1, 0xffff), identities.uint(4)))
        macs = []
        while not binders.at_end():
            macs.append(binders.vector(1, 32, 255))
        if len(macs) != len(offered):
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                            f"pre_shared_key: {len(offered)} identities, {len(macs)} binders")
        return offered, macs, binders_len

    def check_minor_extensions(self):
        """Validate the extensions we only need to tolerate, so malformed ones still fail."""
        if not self.psk_modes() and _TLS_EXT_PRE_SHARED_KEY in self.extensions:
            raise _TLSFatal(_TLS_ALERT_MISSING_EXTENSION,
                            "pre_shared_key without psk_key_exchange_modes")
        if self.extensions.get(_TLS_EXT_EARLY_DATA, b"") != b"":
            raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, "early_data extension is not empty")


# === 6.7 Session tickets (§4.6.1, §4.2.11) ======================================================

# A ticket is the resumption PSK and what it may be used for, sealed under a server ticket key:
# nothing is stored per session, and any process that holds the key can resume it.
#   ticket = key name (8) | nonce (12) | ChaCha20-Poly1305(key, nonce, state, aad = key name)
#   state  = version (1) | suite (2) | issued, ms since 1970 (8) | ticket_age_add (4) |
#            lifetime, s (4) | SNI <0..255> | ALPN <0..255> | PSK <32..48>
# ChaCha20-Poly1305 whatever the crypto backend, so that processes with different backends
# share tickets; it is also the cheaper AEAD in pure Python. Nonces are random: a key seals far
# fewer than the 2^32 tickets after which random 96-bit nonces would risk a repeat.
TLS_TICKET_LIFETIME = 24 * 3600          # seconds: the default ticket_lifetime
TLS_TICKET_LIFETIME_MAX = 7 * 24 * 3600  # §4.6.1: servers MUST NOT use more than seven days
TLS_TICKET_ROTATION = 12 * 3600          # a random ticket key seals this long, then opens only
TLS_TICKET_AGE_TOLERANCE_MS = 30_000     # the client's and our idea of a ticket's age may differ
_TLS_TICKET_VERSION = 1
_TLS_TICKET_STATE = struct.Struct(">BHQII")
_TLS_TICKET_NAME_LEN = 8
_TLS_TICKET_NONCE_LEN = 12
_TLS_PSK_DHE_KE = 1                      # psk_key_exchange_modes (§4.2.9); psk_ke (0) is refused


class _TicketState:
    """What a ticket says: the PSK and the session it came from."""

    __slots__ = ("suite", "issued_ms", "age_add", "lifetime", "sni", "alpn", "psk")

    def __init__(self, suite, issued_ms, age_add, lifetime, sni, alpn, psk):
        self.suite, self.issued_ms, self.age_add = suite, issued_ms, age_add
        self.lifetime, self.sni, self.alpn, self.psk = lifetime, sni, alpn, psk

    def encode(self):
        return (_TLS_TICKET_STATE.pack(_TLS_TICKET_VERSION, self.suite, self.issued_ms,
                                       self.age_add, self.lifetime)
                + _tls_vec8(self.sni) + _tls_vec8(self.alpn) + _tls_vec8(self.psk))

    @classmethod
    def decode(cls, data):
        """The state in an authenticated ticket, or None if this version cannot read it."""
        size = _TLS_TICKET_STATE.size
        if len(data) < size or data[0] != _TLS_TICKET_VERSION:
            return None
        _, suite, issued_ms, age_add, lifetime = _TLS_TICKET_STATE.unpack_from(data)
        reader = _TLSReader(data[size:], "ticket")
        try:
            sni, alpn, psk = (reader.vector(1, 0, 255), reader.vector(1, 0, 255),
                              reader.vector(1, 32, 48))
            reader.expect_end()
        except _TLSFatal:
            return None
        if suite not in _TLS_SUITES:
            return None
        return cls(suite, issued_ms, age_add, lifetime, sni, alpn, psk)

    def usable(self, now_ms, obfuscated_age, sni, alpn):
        """Within its lifetime by our clock and by the client's (§4.2.11.1: the client's age is
        obfuscated_ticket_age - ticket_age_add), and for the same server name and protocol."""
        age = now_ms - self.issued_ms
        client_age = (obfuscated_age - self.age_add) & 0xffffffff
        return (0 <= age <= self.lifetime * 1000
                and abs(client_age - age) <= TLS_TICKET_AGE_TOLERANCE_MS
                and self.sni == sni and self.alpn == alpn)


class _TicketKey:
    """One ticket key: its name (which ticket it sealed) and its AEAD, both derived from the
    secret, so that the secret alone is shared between processes."""

    def __init__(self, secret, crypto):
        prk = hkdf_extract("sha256", b"tarweb.py session ticket key", secret)
        self.name = hkdf_expand("sha256", prk, b"name", _TLS_TICKET_NAME_LEN)
        self.aead = crypto.aead_class(TLS_CHACHA20_POLY1305_SHA256)(
            hkdf_expand("sha256", prk, b"chacha20-poly1305", 32))
        self.retired = None   # when it stopped sealing (time.time()), None while it seals


class TicketKeys:
    """The server's ticket keys: the first seals new tickets, every one opens them.

    ticket_secrets: 32-byte secrets from a ticket key file (--tls-ticket-key), kept as given; None:
    a random key, replaced every TLS_TICKET_ROTATION seconds, each old one kept while tickets
    it sealed may live. count is the number of tickets sent per handshake."""

    def __init__(self, crypto, ticket_secrets=None, lifetime=TLS_TICKET_LIFETIME, count=2,
                 clock=time.time):
        if not 0 < lifetime <= TLS_TICKET_LIFETIME_MAX:
            raise ValueError(f"ticket lifetime must be 1..{TLS_TICKET_LIFETIME_MAX} seconds")
        self.crypto = crypto
        self.lifetime = lifetime
        self.count = count
        self.clock = clock
        self.rotating = ticket_secrets is None
        self.keys = [_TicketKey(s, crypto) for s in ticket_secrets or [os.urandom(32)]]
        self.created = clock()

    def seal(self, states):
        """Tickets (the identities clients send back) holding states: one per state."""
        self._rotate()
        key = self.keys[0]
        plains = [state.encode() for state in states]
        nonces = [os.urandom(_TLS_TICKET_NONCE_LEN) for _ in states]
        # Pure Python: the keystreams of all the tickets in one ChaCha20 pass.
        chacha20_poly1305_prefetch([(key.aead, nonce, len(plain))
                                    for nonce, plain in zip(nonces, plains)]
                                   if isinstance(key.aead, ChaCha20Poly1305) else [])
        return [key.name + nonce + key.aead.seal(nonce, plain, key.name)
                for nonce, plain in zip(nonces, plains)]

    def open(self, ticket):
        """The _TicketState in a ticket one of our keys sealed, or None: any ticket a client
        sends, valid, expired, forged or from another server, only costs a full handshake."""
        name = ticket[:_TLS_TICKET_NAME_LEN]
        nonce = ticket[_TLS_TICKET_NAME_LEN:_TLS_TICKET_NAME_LEN + _TLS_TICKET_NONCE_LEN]
        for key in self.keys:
            if key.name == name:
                try:
                    plain = key.aead.open(nonce, ticket[len(name) + len(nonce):], name)
                except AEADError:
                    return None
                return _TicketState.decode(plain)
        return None

    def _rotate(self):
        """A random key seals for TLS_TICKET_ROTATION seconds; the old keys open tickets for a
        lifetime more, then go."""
        if not self.rotating:
            return
        now = self.clock()
        if now - self.created >= TLS_TICKET_ROTATION:
            self.keys[0].retired = now
            self.keys = [_TicketKey(os.urandom(32), self.crypto)] + [
                k for k in self.keys if now - k.retired < self.lifetime]
            self.created = now


def parse_ticket_keys(text):
    """The secrets of a ticket key file: one per line, 64 hex digits (`openssl rand -hex 32`),
    the first sealing, all opening; blank lines and # comments ignored. ValueError names the
    line at fault."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            secret = bytes.fromhex(line)
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise ValueError(f"line {number}: not 64 hex digits (make a key with "
                             f"'openssl rand -hex 32')")
        keys.append(secret)
    if not keys:
        raise ValueError("no key in it (make one with 'openssl rand -hex 32')")
    return keys


# === 6.8 Server configuration and handshake state machine (§4, Appendix A.2) =====================

class TLSConfig:
    """What every connection shares: key, certificate chain (DER, leaf first), ALPN, suites,
    and the crypto backend; with more, further (key, chain) pairs chosen by server_name.

    alpn is the server's order of preference; an empty alpn ignores the client's ALPN offer.
    cipher_preference is the server's order of preference among the three TLS 1.3 suites, and
    groups among the key exchange groups (TLS_GROUP_*).
    crypto (section 6.3) does the key exchange and record protection; key becomes its signing
    key. tickets (TicketKeys, section 6.7) turns on session tickets and resumption.
    """

    def __init__(self, key, cert_chain, alpn=(b"http/1.1",),
                 cipher_preference=(TLS_CHACHA20_POLY1305_SHA256, TLS_AES_128_GCM_SHA256,
                                    TLS_AES_256_GCM_SHA384), crypto=PYTHON_CRYPTO, more=(),
                 groups=_TLS_GROUP_PREFERENCE, tickets=None):
        for suite in cipher_preference:
            if suite not in _TLS_SUITES:
                raise ValueError(f"TLSConfig: unknown TLS 1.3 cipher suite 0x{suite:04x}")
        for protocol in alpn:
            if not 1 <= len(protocol) <= 255:
                raise ValueError("TLSConfig: ALPN protocol names must be 1..255 bytes")
        self.crypto = crypto
        self.alpn = tuple(bytes(p) for p in alpn)
        self.cipher_preference = tuple(cipher_preference)
        if not groups or any(group not in _TLS_GROUP_PREFERENCE for group in groups):
            raise ValueError(f"TLSConfig: groups must be among {_TLS_GROUP_PREFERENCE}")
        self.groups = tuple(groups)
        self.tickets = tickets
        # more: further (key, chain) pairs, chosen by the client's server_name (identity_for).
        self.identities = [_TLSIdentity(k, chain, crypto) for k, chain in [(key, cert_chain),
                                                                           *more]]

    @property
    def key(self):
        """The first identity's signing key (the one used without SNI)."""
        return self.identities[0].key

    @property
    def cert_chain(self):
        return self.identities[0].cert_chain

    def identity_for(self, server_name):
        """The identity whose certificate names server_name: an exact subjectAltName DNS name
        first, then a "*." wildcard standing for its one leftmost label (RFC 6125 §6.4.3, as
        browsers read it); the first identity without a server_name or a match."""
        if server_name:
            label, _, parent = server_name.partition(".")
            for identity in self.identities:
                if server_name in identity.names:
                    return identity
            for identity in self.identities:
                if label and parent and "*." + parent in identity.names:
                    return identity
        return self.identities[0]


class _TLSIdentity:
    """A signing key and its certificate chain: the Certificate message (§4.4.2), built once,
    and the DNS names the leaf certificate is for."""

    def __init__(self, key, cert_chain, crypto):
        if not cert_chain:
            raise ValueError("TLSConfig: the certificate chain is empty")
        if not key.signature_schemes:
            raise ValueError("TLSConfig: the key offers no signature scheme")
        self.key = crypto.signing_key(key)
        self.cert_chain = [bytes(der) for der in cert_chain]
        self.names = set(certificate_dns_names(self.cert_chain[0]))
        entries = b"".join(_tls_vec24(der) + _tls_vec16(b"") for der in self.cert_chain)
        self.certificate_message = _tls_handshake_message(_TLS_HS_CERTIFICATE,
                                                          _tls_vec8(b"") + _tls_vec24(entries))


# The server's states, named as in RFC 8446 Appendix A.2. It waits only in these three: RECVD_CH,
# NEGOTIATED and WAIT_FLIGHT2 are passed within one ClientHello's processing (a HelloRetryRequest
# leads from RECVD_CH back to START, the first hello kept); WAIT_EOED needs accepted 0-RTT and
# WAIT_CERT and WAIT_CV need client authentication, neither of which the server offers.
_TLS_STATE_START = "START"
_TLS_STATE_WAIT_FINISHED = "WAIT_FINISHED"
_TLS_STATE_CONNECTED = "CONNECTED"


def _tls_key_exchange(crypto, group, peer_share):
    """(our key_share, shared secret) for the negotiated group; bad peer points are
    illegal_parameter."""
    try:
        return crypto.key_exchange(group, peer_share)
    except ValueError as exc:
        raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER, f"invalid key share: {exc}")


class TLSServer(_TLSRecordReader):
    """One server-side TLS 1.3 handshake, driven by receive(bytes) -> bytes to send.

    When done: cipher_suite, group, alpn, sni, resumed (a session ticket's PSK was used),
    record_layer (continues the connection; bytes that came after the client Finished wait in
    it, unread), traffic_keys(), rx_seq, tx_seq, client_app_secret, server_app_secret.
    When failed: error (short text) and alert (the code sent, None if the peer sent one).
    """

    def __init__(self, config):
        self.config = config
        self.done = False
        self.failed = False
        self.error = None
        self.alert = None
        self.sni = None
        self.alpn = None
        self.cipher_suite = None
        self.group = None
        self.signature_scheme = None
        self.resumed = False
        self.record_layer = None
        self._state = _TLS_STATE_START
        self._inbuf = bytearray()
        self._handshake = _TLSHandshakeBuffer()
        self._first_hello = None
        self._transcript = None
        self._rx = None                  # client handshake traffic protection, once SH is out
        self._tx = None                  # server handshake traffic protection, once SH is out
        self._ccs_sent = False
        self._ccs_received = False      # the client's compatibility CCS (one at most)
        self._early_data_budget = 0      # bytes of refused 0-RTT records we may still skip
        self._client_finished = None     # the verify_data the client must send
        self._app_secrets = None         # (client, server) application traffic secrets
        self._app_tx = None              # their server side's protection, once our Finished is out

    # -- public surface ----------------------------------------------------------------------------

    def receive(self, data):
        """Feed bytes read from the peer; returns the bytes to send (possibly empty)."""
        if self.failed:
            return b""
        if self.done:
            raise RuntimeError("TLS handshake already complete: use .record_layer")
        out = []
        self._read_records(data, out)
        if self.done:
            self._start_record_layer()
        return b"".join(out)

    def traffic_keys(self):
        """(rx_key, rx_iv, tx_key, tx_iv) of the application traffic, current generation."""
        return self.record_layer.traffic_keys()

    @property
    def rx_seq(self):
        return self.record_layer.rx_seq

    @property
    def tx_seq(self):
        return self.record_layer.tx_seq

    # For tests and tools, as are server_app_secret and signature_scheme.
    @property
    def client_app_secret(self):
        return self.record_layer.rx_secret

    @property
    def server_app_secret(self):
        return self.record_layer.tx_secret

    # -- records -----------------------------------------------------------------------------------

    def _reading(self):
        # Records after the client Finished are application data: the record layer's to read.
        return not (self.done or self.failed)

    def _fail(self, alert, message, out):
        self.failed = True
        self.error = message
        self.alert = alert
        if alert is None:
            return
        # Alerts are protected once we have sent ServerHello, plaintext before (§5, §6); once
        # our Finished is out, under our application traffic key (§4.4.4, §7.1).
        body = bytes([_TLS_ALERT_FATAL, alert])
        if self._tx is None:
            out.append(_tls_plaintext_records(_TLS_CT_ALERT, body))
        elif self._app_tx is not None:
            out.append(self._app_tx.seal(_TLS_CT_ALERT, body))
        else:
            out.append(self._tx.seal(_TLS_CT_ALERT, body))

    def _on_record(self, content_type, header, body, out):
        if content_type == _TLS_CT_CHANGE_CIPHER_SPEC:
            self._on_change_cipher_spec(body)
        elif content_type == _TLS_CT_ALERT:
            self._on_alert(_tls_check_alert_body(body))
        elif self._state == _TLS_STATE_WAIT_FINISHED:
            self._on_protected_record(content_type, header, body, out)
        elif content_type == _TLS_CT_HANDSHAKE:
            if len(body) > _TLS_MAX_PLAINTEXT:
                raise _TLSFatal(_TLS_ALERT_RECORD_OVERFLOW,
                                f"plaintext record of {len(body)} bytes")
            self._on_handshake_data(body, out)
        elif self._first_hello is not None and self._skip_early_data(body):
            pass   # refused 0-RTT data sent before the client saw our HelloRetryRequest
        else:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                            f"record of type {content_type} before ServerHello")

    def _on_change_cipher_spec(self, body):
        # Appendix D.4: a compatibility CCS (exactly 0x01) may arrive after the first
        # ClientHello and before the client Finished; it is dropped. Anything else is fatal.
        # §5 says to drop "an unencrypted record of type change_cipher_spec", which some read as
        # any number of them; a client sends one (D.4: "immediately before its second flight"),
        # and more serve no middlebox, so a second one is unexpected_message, as TLS test
        # suites expect.
        if self._first_hello is None or body != b"\x01" or self._handshake.pending() \
                or self._ccs_received:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "unexpected change_cipher_spec")
        self._ccs_received = True

    def _on_alert(self, code):
        if self._handshake.pending():
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE, "alert inside a fragmented message")
        raise _TLSFatal(None, f"peer sent alert {_tls_alert_name(code)} during the handshake")

    def _skip_early_data(self, body):
        """True if this record fits the budget for skipping refused early data (§4.2.10)."""
        if len(body) > self._early_data_budget:
            return False
        self._early_data_budget -= len(body)
        return True

    def _on_protected_record(self, content_type, header, body, out):
        if content_type != _TLS_CT_APPLICATION_DATA:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                            f"unprotected record of type {content_type} after ServerHello")
        try:
            inner_type, content = self._rx.open(header, body)
        except AEADError:
            # A 0-RTT record under the early traffic key we refused fails here: skip it (§4.2.10).
            if self._skip_early_data(body):
                return
            raise _TLSFatal(_TLS_ALERT_BAD_RECORD_MAC, "handshake record failed to decrypt")
        self._early_data_budget = 0   # the client's second flight has started
        if inner_type == _TLS_CT_HANDSHAKE:
            self._on_handshake_data(content, out)
        elif inner_type == _TLS_CT_ALERT:
            self._on_alert(_tls_check_alert_body(content))
        else:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                            f"protected record of type {inner_type} during the handshake")

    def _on_handshake_data(self, fragment, out):
        self._handshake.add(fragment)
        while not self.done:
            message = self._handshake.pop()
            if message is None:
                break
            if self._state == _TLS_STATE_WAIT_FINISHED:
                self._on_client_finished(message)
            elif message[0] == _TLS_HS_CLIENT_HELLO:
                self._on_client_hello(message, out)
            else:
                raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                                f"handshake message type {message[0]} instead of ClientHello")

    # -- ClientHello: START -> RECVD_CH -> NEGOTIATED ----------------------------------------------

    def _on_client_hello(self, message, out):
        hello = _TLSClientHello(message)
        # A key change follows the ClientHello, and the client cannot send a second hello
        # before it has seen our HelloRetryRequest: nothing may follow in the record.
        self._handshake.check_boundary("ClientHello")
        if self._first_hello is not None:
            self._check_retried_hello(hello)
        params = self._negotiate(hello)
        if params is None:
            self._send_hello_retry(hello, out)
        else:
            self._send_server_flight(hello, params, out)

    def _negotiate(self, hello):
        """(suite, group, peer share, resumption, (key, Certificate message, scheme)) for hello,
        or None when a HelloRetryRequest is needed. resumption is (selected identity, Early
        Secret) of a session ticket to resume, and then there is no certificate (None)."""
        if hello.legacy_version != _TLS_LEGACY_VERSION:
            raise _TLSFatal(_TLS_ALERT_PROTOCOL_VERSION,
                            f"ClientHello legacy_version 0x{hello.legacy_version:04x}")
        if _TLS_VERSION_13 not in hello.supported_versions():
            raise _TLSFatal(_TLS_ALERT_PROTOCOL_VERSION, "client does not offer TLS 1.3")
        if hello.compression_methods != b"\x00":
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER, "ClientHello compression methods")
        hello.check_minor_extensions()
        self.sni = hello.server_name()
        self.alpn = self._choose_alpn(hello.alpn_protocols())
        groups = hello.uint16_extension(_TLS_EXT_SUPPORTED_GROUPS, "supported_groups")
        schemes = hello.uint16_extension(_TLS_EXT_SIGNATURE_ALGORITHMS, "signature_algorithms")
        shares = hello.key_shares()
        # §9.2: without a PSK, signature_algorithms, supported_groups and key_share are all
        # mandatory. A PSK-only hello (psk_ke) is well-formed, but we cannot complete it. A
        # PSK we cannot resume leaves a certificate to authenticate us, so no
        # signature_algorithms is missing_extension unless we resume (§4.2.3).
        if schemes is None and _TLS_EXT_PRE_SHARED_KEY not in hello.extensions:
            raise _TLSFatal(_TLS_ALERT_MISSING_EXTENSION,
                            "ClientHello without signature_algorithms")
        for present, name in ((groups, "supported_groups"), (shares, "key_share")):
            if present is None:
                alert = (_TLS_ALERT_HANDSHAKE_FAILURE if _TLS_EXT_PRE_SHARED_KEY in hello.extensions
                         else _TLS_ALERT_MISSING_EXTENSION)
                raise _TLSFatal(alert, f"ClientHello without {name}")
        for group in shares:
            if group not in groups:
                raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                                f"key_share for group 0x{group:04x} not in supported_groups")
        suite = self._choose(self.config.cipher_preference, hello.cipher_suites, "cipher suite")
        common_groups = [g for g in self.config.groups if g in groups]
        if not common_groups:
            raise _TLSFatal(_TLS_ALERT_HANDSHAKE_FAILURE, "no common key exchange group")
        for group in common_groups:
            if group in shares:
                resumption = self._resumption(hello, suite)
                if resumption is not None:
                    return suite, group, shares[group], resumption, None
                if schemes is None:
                    raise _TLSFatal(_TLS_ALERT_MISSING_EXTENSION,
                                    "ClientHello without signature_algorithms")
                return suite, group, shares[group], None, self._choose_certificate(schemes)
        # No share we can use (never the case for a second hello, _check_retried_hello saw to it).
        self.cipher_suite = suite
        self.group = common_groups[0]
        return None

    @staticmethod
    def _choose(ours, theirs, what):
        for item in ours:
            if item in theirs:
                return item
        raise _TLSFatal(_TLS_ALERT_HANDSHAKE_FAILURE, f"no common {what}")

    def _choose_alpn(self, offered):
        if offered is None or not self.config.alpn:   # alpn=() in the config: ALPN is ignored
            return None
        for protocol in self.config.alpn:
            if protocol in offered:
                return protocol
        names = b", ".join(offered).decode("ascii", "replace")
        raise _TLSFatal(_TLS_ALERT_NO_APPLICATION_PROTOCOL,
                        f"no common ALPN protocol (client offered {names})")

    def _choose_certificate(self, schemes):
        """(key, Certificate message, signature scheme): the certificate for the client's
        server_name (TLSConfig.identity_for), signed with our first scheme the client accepts
        for its key."""
        identity = self.config.identity_for(self.sni)
        scheme = self._choose(identity.key.signature_schemes, schemes, "signature scheme")
        return identity.key, identity.certificate_message, scheme

    def _resumption(self, hello, suite):
        """(selected identity, Early Secret) of the first offered ticket of ours that this
        connection may resume (§4.2.11), or None for a full handshake. We resume only with
        psk_dhe_ke, which keeps forward secrecy. A ticket whose binder fails is decrypt_error."""
        tickets = self.config.tickets
        offer = hello.pre_shared_key()
        if tickets is None or offer is None or _TLS_PSK_DHE_KE not in hello.psk_modes():
            return None
        hash_name = _TLS_SUITES[suite].hash_name
        now_ms = int(tickets.clock() * 1000)
        sni, alpn = (self.sni or "").encode("ascii"), self.alpn or b""
        identities, binders, binders_len = offer
        for index, (ticket, obfuscated_age) in enumerate(identities):
            state = tickets.open(ticket)
            # §4.2.11: a PSK goes only with a suite of its hash (the binder is made with it).
            if state is None or _TLS_SUITES[state.suite].hash_name != hash_name:
                continue
            early_secret = _tls13_early_secret(hash_name, state.psk)
            self._check_binder(hello, hash_name, early_secret, binders[index], binders_len)
            if state.usable(now_ms, obfuscated_age, sni, alpn):
                return index, early_secret
        return None

    def _check_binder(self, hello, hash_name, early_secret, binder, binders_len):
        """§4.2.11.2: a binder is a Finished MAC under the PSK's binder key over the transcript
        up to this hello without its binders list (after a HelloRetryRequest, the first hello's
        message_hash and the HelloRetryRequest come first). Compared in constant time, before
        anything else of the ticket is believed."""
        transcript = self._transcript.copy() if self._transcript is not None else \
            hashlib.new(hash_name)
        transcript.update(hello.message[:len(hello.message) - binders_len])
        expected = _tls13_finished_mac(hash_name, _tls13_binder_key(hash_name, early_secret),
                                       transcript.digest())
        if not hmac.compare_digest(binder, expected):
            raise _TLSFatal(_TLS_ALERT_DECRYPT_ERROR, "PSK binder does not verify")

    def _check_retried_hello(self, hello):
        """§4.1.2: the second ClientHello repeats the first except for key_share and friends."""
        first = self._first_hello
        same = (hello.legacy_version == first.legacy_version and hello.random == first.random
                and hello.session_id == first.session_id
                and hello.cipher_suites == first.cipher_suites
                and hello.compression_methods == first.compression_methods
                and _tls_retry_invariant(hello) == _tls_retry_invariant(first))
        if not same:
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                            "second ClientHello differs from the first")
        if _TLS_EXT_EARLY_DATA in hello.extensions:
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER, "early_data after HelloRetryRequest")
        shares = hello.key_shares()
        if shares is None or list(shares) != [self.group]:
            raise _TLSFatal(_TLS_ALERT_ILLEGAL_PARAMETER,
                            "second ClientHello must hold one key share, for the group requested")

    def _remember_hello(self, hello):
        """Keep the first ClientHello, for the second to be checked against. 0-RTT offered in
        it is refused, so its records are skipped within a budget (§4.2.10); once the second
        hello is in, nothing more is skipped."""
        if self._first_hello is None:
            self._first_hello = hello
            if _TLS_EXT_EARLY_DATA in hello.extensions:
                self._early_data_budget = _TLS_MAX_EARLY_DATA_SKIP
        else:
            self._early_data_budget = 0

    # -- our messages ------------------------------------------------------------------------------

    def _write(self, messages, message):
        """Add one handshake message of ours to messages and to the transcript (§4.4.1), in one
        step so that neither is forgotten (as Go's crypto/tls writeHandshakeRecord does)."""
        self._transcript.update(message)
        messages.append(message)

    def _compat_ccs(self, hello):
        # Appendix D.4: a client in middlebox compatibility mode (non-empty session id) expects
        # a dummy change_cipher_spec right after our first ServerHello or HelloRetryRequest.
        if hello.session_id and not self._ccs_sent:
            self._ccs_sent = True
            return _TLS_CCS_RECORD
        return b""

    def _server_hello_message(self, random, hello, suite, key_share, psk_identity=None):
        """ServerHello (§4.1.3), or a HelloRetryRequest by its random: TLS 1.3 as the version
        (§4.2.1), the key_share extension (§4.2.8) and, when resuming, the index of the PSK
        identity taken (§4.2.11)."""
        version = struct.pack(">H", _TLS_VERSION_13)
        extensions = (_tls_extension(_TLS_EXT_SUPPORTED_VERSIONS, version)
                      + _tls_extension(_TLS_EXT_KEY_SHARE, key_share))
        if psk_identity is not None:
            extensions += _tls_extension(_TLS_EXT_PRE_SHARED_KEY, struct.pack(">H", psk_identity))
        body = (struct.pack(">H", _TLS_LEGACY_VERSION) + random + _tls_vec8(hello.session_id)
                + struct.pack(">HB", suite, 0) + _tls_vec16(extensions))
        return _tls_handshake_message(_TLS_HS_SERVER_HELLO, body)

    def _send_hello_retry(self, hello, out):
        """RECVD_CH -> START: a HelloRetryRequest (§4.1.4) asks for a share of self.group."""
        hash_name = _TLS_SUITES[self.cipher_suite].hash_name
        # §4.4.1: the first ClientHello enters the transcript as a synthetic message_hash.
        first_hash = hashlib.new(hash_name, hello.message).digest()
        self._transcript = hashlib.new(hash_name)
        self._transcript.update(_tls_handshake_message(_TLS_HS_MESSAGE_HASH, first_hash))
        messages = []
        self._write(messages, self._server_hello_message(
            _TLS_HRR_RANDOM, hello, self.cipher_suite, struct.pack(">H", self.group)))
        out.append(_tls_plaintext_records(_TLS_CT_HANDSHAKE, messages[0]) + self._compat_ccs(hello))
        self._remember_hello(hello)
        self._state = _TLS_STATE_START

    def _send_server_flight(self, hello, params, out):
        """NEGOTIATED -> WAIT_FINISHED: ServerHello in the clear, then EncryptedExtensions,
        Certificate, CertificateVerify (neither when resuming) and Finished under our handshake
        traffic key (§2), then session tickets under our application traffic key. Nothing goes
        out until all is built: an error on the way is answered in the clear."""
        suite, group, peer_share, resumption, certificate = params
        psk_identity, early_secret = resumption or (None, None)
        hash_name = _TLS_SUITES[suite].hash_name
        crypto = self.config.crypto
        our_share, shared_secret = _tls_key_exchange(crypto, group, peer_share)
        if self._transcript is None:   # else it holds the HelloRetryRequest exchange
            self._transcript = hashlib.new(hash_name)
        self._transcript.update(hello.message)
        clear, flight = [], []   # messages sent in the clear, and under the handshake key
        key_share = struct.pack(">H", group) + _tls_vec16(our_share)
        random = secrets.token_bytes(32)
        self._write(clear, self._server_hello_message(random, hello, suite, key_share,  # §4.1.3
                                                      psk_identity))
        # §7.1: the handshake traffic secrets cover ClientHello..ServerHello.
        handshake_secret, client_hs, server_hs = _tls13_handshake_secrets(
            hash_name, shared_secret, self._transcript.digest(), early_secret)
        self._write(flight, self._encrypted_extensions())          # §4.3.1
        if certificate is not None:
            key, certificate_message, self.signature_scheme = certificate
            self._write(flight, certificate_message)                                  # §4.4.2
            self._write(flight, self._certificate_verify(key, self.signature_scheme))  # §4.4.3
        self._write(flight, self._finished(hash_name, server_hs))   # §4.4.4
        tx = _TLSRecordCipher(suite, server_hs, crypto=crypto)
        rx = _TLSRecordCipher(suite, client_hs, crypto=crypto)
        master_secret = self._expect_client_finished(hash_name, handshake_secret, client_hs)
        self._app_tx = _TLSRecordCipher(suite, self._app_secrets[1], crypto=crypto)
        tickets = self._session_tickets(hello, suite, master_secret, resumption is not None)
        out.append(_tls_plaintext_records(_TLS_CT_HANDSHAKE, clear[0]) + self._compat_ccs(hello)
                   + self._seal_flight(tx, rx, b"".join(flight), tickets))
        self._tx, self._rx = tx, rx
        self.cipher_suite, self.group, self.resumed = suite, group, resumption is not None
        self._remember_hello(hello)
        self._state = _TLS_STATE_WAIT_FINISHED

    def _encrypted_extensions(self):
        """EncryptedExtensions (§4.3.1): the ALPN protocol we chose, if any."""
        extensions = b""
        if self.alpn is not None:
            extensions += _tls_extension(_TLS_EXT_ALPN, _tls_vec16(_tls_vec8(self.alpn)))
        return _tls_handshake_message(_TLS_HS_ENCRYPTED_EXTENSIONS, _tls_vec16(extensions))

    def _certificate_verify(self, key, scheme):
        """CertificateVerify (§4.4.3): our signature over the transcript so far."""
        signature = key.sign(scheme, _TLS_CERT_VERIFY_PREFIX + self._transcript.digest())
        return _tls_handshake_message(_TLS_HS_CERTIFICATE_VERIFY,
                                      struct.pack(">H", scheme) + _tls_vec16(signature))

    def _finished(self, hash_name, server_hs):
        """Our Finished (§4.4.4): the MAC of the transcript so far."""
        verify_data = _tls13_finished_mac(hash_name, server_hs, self._transcript.digest())
        return _tls_handshake_message(_TLS_HS_FINISHED, verify_data)

    def _expect_client_finished(self, hash_name, handshake_secret, client_hs):
        """The client's Finished verify_data and the application traffic secrets: both cover
        the transcript up to our Finished (§4.4.4, §7.1). Returns the Master Secret."""
        server_finished_hash = self._transcript.digest()
        master_secret, client_app, server_app = _tls13_application_secrets(
            hash_name, handshake_secret, server_finished_hash)
        self._client_finished = _tls13_finished_mac(hash_name, client_hs, server_finished_hash)
        self._app_secrets = client_app, server_app
        return master_secret

    def _session_tickets(self, hello, suite, master_secret, resumed):
        """NewSessionTicket messages (§4.6.1), to go under our application traffic key, or b""
        when tickets are off or the client cannot resume with psk_dhe_ke. They go with
        our Finished rather than after the client's: the note in §4.6.1 lets a server that
        does not authenticate clients compute the client's Finished, and so a browser's
        parallel connections can resume at once. Each ticket gets its own PSK (its nonce).
        A resumed connection gets one, for the one the client spent (as OpenSSL does)."""
        tickets = self.config.tickets
        if tickets is None or not tickets.count or _TLS_PSK_DHE_KE not in hello.psk_modes():
            return b""
        count = 1 if resumed else tickets.count
        hash_name = _TLS_SUITES[suite].hash_name
        transcript = self._transcript.copy()
        transcript.update(_tls_handshake_message(_TLS_HS_FINISHED, self._client_finished))
        resumption_secret = derive_secret(hash_name, master_secret, b"res master",  # §7.1
                                          transcript.digest())
        sni, alpn = (self.sni or "").encode("ascii"), self.alpn or b""
        issued_ms = int(tickets.clock() * 1000)
        states = [_TicketState(suite, issued_ms, secrets.randbits(32), tickets.lifetime, sni,
                               alpn, hkdf_expand_label(hash_name, resumption_secret,
                                                       b"resumption", bytes([i]),
                                                       _tls_hash_len(hash_name)))
                  for i in range(count)]
        messages = [_tls_handshake_message(_TLS_HS_NEW_SESSION_TICKET, (
            struct.pack(">II", tickets.lifetime, state.age_add) + _tls_vec8(bytes([i]))
            + _tls_vec16(ticket) + _tls_vec16(b"")))
            for i, (state, ticket) in enumerate(zip(states, tickets.seal(states)))]
        return b"".join(messages)

    def _seal_flight(self, tx, rx, flight, tickets):
        """The flight under the handshake key, then the tickets (if any) under the application
        key. The client's Finished will come as one record of known size (unpadded, as clients
        send it): its keystream is made in the same pass as ours."""
        chacha20_poly1305_prefetch(tx.keystream_requests(_tls_record_lengths(len(flight)))
                                   + rx.keystream_requests([4 + len(self._client_finished) + 1])
                                   + self._app_tx.keystream_requests([len(tickets) + 1]
                                                                     if tickets else []))
        return tx.seal_records(_TLS_CT_HANDSHAKE, flight) + (
            self._app_tx.seal(_TLS_CT_HANDSHAKE, tickets) if tickets else b"")

    # -- client Finished: WAIT_FINISHED -> CONNECTED -----------------------------------------------

    def _on_client_finished(self, message):
        if message[0] != _TLS_HS_FINISHED:
            raise _TLSFatal(_TLS_ALERT_UNEXPECTED_MESSAGE,
                            f"handshake message type {message[0]} instead of Finished")
        if len(message) - 4 != len(self._client_finished):
            raise _TLSFatal(_TLS_ALERT_DECODE_ERROR, f"Finished of {len(message) - 4} bytes")
        if not hmac.compare_digest(message[4:], self._client_finished):
            raise _TLSFatal(_TLS_ALERT_DECRYPT_ERROR, "client Finished does not verify")
        self._handshake.check_boundary("Finished")
        self.done = True
        self._state = _TLS_STATE_CONNECTED

    def _start_record_layer(self):
        # The handshake reads no application record: what came after the client Finished
        # goes to the record layer unread, for its first open().
        # Our session tickets (if any) went under the application key: its sequence goes on.
        client_app, server_app = self._app_secrets
        self.record_layer = RecordLayer(self.cipher_suite, client_app, server_app,
                                        tx_seq=self._app_tx.seq, received=bytes(self._inbuf),
                                        crypto=self.config.crypto)
        self._app_secrets = self._app_tx = self._rx = self._tx = None
        self._transcript = self._inbuf = None


# === 6.9 kTLS hand-off (Linux Documentation/networking/tls.rst) ===================================


def ktls_enable(fd, hs):
    """Give a finished handshake's application traffic keys to the kernel (TX and RX)."""
    rx_key, rx_iv, tx_key, tx_iv = hs.traffic_keys()
    setsockopt_fd(fd, socket.IPPROTO_TCP, TCP_ULP, b"tls")
    setsockopt_fd(fd, SOL_TLS, TLS_TX, ktls_crypto_info(hs.cipher_suite, tx_key, tx_iv, hs.tx_seq))
    setsockopt_fd(fd, SOL_TLS, TLS_RX, ktls_crypto_info(hs.cipher_suite, rx_key, rx_iv, hs.rx_seq))


# A client's KeyUpdate costs the server two setsockopts under kTLS (and a send when it asks for
# ours): it may send KEY_UPDATE_BURST at once, then KEY_UPDATE_RATE a second; one more ends its
# connection.
KEY_UPDATE_BURST = 32
KEY_UPDATE_RATE = 1.0
# The two whole KeyUpdate messages (RFC 8446 §4.6.3): update_not_requested, update_requested.
_TLS_KEY_UPDATES = (_tls_handshake_message(_TLS_HS_KEY_UPDATE, b"\x00"),
                    _tls_handshake_message(_TLS_HS_KEY_UPDATE, b"\x01"))


def ktls_probe():
    """The cipher suites this kernel's TLS ULP accepts, tried on a loopback connection, and
    the reason when there are none."""
    suites = set()
    for suite, params in _TLS_SUITES.items():
        info = ktls_crypto_info(suite, bytes(params.key_len), bytes(12), 0)
        try:
            with socket.create_server(("127.0.0.1", 0)) as srv, \
                    socket.create_connection(srv.getsockname()) as conn:
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                except OSError as e:
                    return set(), f"the 'tls' TCP ULP is missing ({e.strerror})"
                conn.setsockopt(SOL_TLS, TLS_TX, info)
                conn.setsockopt(SOL_TLS, TLS_RX, info)
                suites.add(suite)
        except OSError:
            continue  # this suite's cipher is not in the kernel; the others may be
    return suites, "" if suites else "no TLS 1.3 cipher suite is accepted by the kernel"


def ktls_rekey_probe(suite):
    """Whether this kernel changes a kTLS socket's keys (TLS 1.3 KeyUpdate, Linux 6.14+), and how
    we know: a second TLS_TX on a loopback socket, which older kernels refuse (EBUSY)."""
    info = ktls_crypto_info(suite, bytes(_TLS_SUITES[suite].key_len), bytes(12), 0)
    try:
        with socket.create_server(("127.0.0.1", 0)) as srv, \
                socket.create_connection(srv.getsockname()) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            conn.setsockopt(SOL_TLS, TLS_TX, info)
            try:
                conn.setsockopt(SOL_TLS, TLS_TX, info)
            except OSError as e:
                return False, f"a second TLS_TX was refused: {e.strerror}"
    except OSError as e:
        return False, f"the probe failed: {e.strerror}"
    return True, "a second TLS_TX was accepted"


def ktls_next_key(fd, option, cipher_suite, secret):
    """application_traffic_secret_N+1 of secret (RFC 8446 §7.2) and its key and IV (§7.3) to the
    kernel, with TLS_RX or TLS_TX (option) set again, sequence 0. Returns the new secret."""
    secret = _tls13_next_traffic_secret(_TLS_SUITES[cipher_suite].hash_name, secret)
    keys = _TLSRecordCipher(cipher_suite, secret)   # for its key and IV: its AEAD is never made
    setsockopt_fd(fd, SOL_TLS, option, ktls_crypto_info(cipher_suite, keys.key, keys.iv, 0))
    return secret


class KTLSKeys:
    """A kTLS connection's traffic secrets, kept for the client's KeyUpdates (RFC 8446 §4.6.3)
    on a kernel that rekeys: each moves one direction a generation on (ktls_next_key), TLS_RX
    for the client's records, TLS_TX for ours. allow() holds a client to KEY_UPDATE_BURST and
    KEY_UPDATE_RATE."""
    __slots__ = ("cipher_suite", "rx_secret", "tx_secret", "allowance", "stamp")

    def __init__(self, record_layer, now):
        """The secrets of the moment of the record layer whose keys the kernel took over."""
        self.cipher_suite = record_layer.cipher_suite
        self.rx_secret, self.tx_secret = record_layer.rx_secret, record_layer.tx_secret
        self.allowance, self.stamp = KEY_UPDATE_BURST, now

    def allow(self, now):
        """Spend one KeyUpdate of the client's allowance, which refills at KEY_UPDATE_RATE a
        second up to KEY_UPDATE_BURST; False once it is spent."""
        self.allowance = min(KEY_UPDATE_BURST,
                             self.allowance + (now - self.stamp) * KEY_UPDATE_RATE)
        self.stamp = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True

    def update_rx(self, fd):
        """The client's KeyUpdate was read: its next key, for the records behind it."""
        self.rx_secret = ktls_next_key(fd, TLS_RX, self.cipher_suite, self.rx_secret)

    def update_tx(self, fd):
        """Our KeyUpdate is sent: our next key, for the records after it."""
        self.tx_secret = ktls_next_key(fd, TLS_TX, self.cipher_suite, self.tx_secret)


class TLSContext:
    """What every TLS connection shares: certificates and keys, cipher policy, crypto backend,
    session ticket keys (TicketKeys or None) and kTLS support."""

    def __init__(self, identities, groups, ktls_mode, crypto, log, tickets=None):
        self.ktls_suites, why = ktls_probe() if ktls_mode != "off" else (set(), "")
        if ktls_mode == "require" and not self.ktls_suites:
            raise StartupError(f"--ktls require: kernel TLS is not available ({why}); load it "
                               f"with 'modprobe tls' (kernel built with CONFIG_TLS)")
        if ktls_mode == "auto" and not self.ktls_suites:
            slower = "about 100x slower for bulk transfers" if crypto.name == "python" else \
                "with copies that kTLS would save"
            log.warn(f"kernel TLS unavailable ({why}): TLS records are encrypted in userspace "
                     f"({crypto.name}), {slower}; fix: 'modprobe tls' (CONFIG_TLS)")
        self.ktls_rekey = bool(self.ktls_suites) and self.probe_rekey(log)
        self.log = log
        self.crypto, self.groups = crypto, groups
        self.identities = identities  # (PrivateKey, chain) pairs: a reload keeps a self-signed one
        self.config = self.make_config(identities, tickets)

    def make_config(self, identities, tickets):
        """The TLSConfig of these (key, chain) pairs and ticket keys: at start, and at a reload
        (reloader), whose new connections get it; handshakes under way keep theirs."""
        (key, chain), *more = identities
        return TLSConfig(key, chain, alpn=(b"http/1.1",), crypto=self.crypto, more=more,
                         groups=self.groups, cipher_preference=self.cipher_preference(self.crypto),
                         tickets=tickets)

    def probe_rekey(self, log):
        """Whether a client's KeyUpdate can rekey the kernel; -v says which, and how we know."""
        rekey, how = ktls_rekey_probe(min(self.ktls_suites))
        if rekey:
            log.info(f"kTLS rekey: yes ({how}): a client's KeyUpdate gives the kernel new keys")
        else:
            log.info(f"kTLS rekey: no ({how}; Linux 6.14+ rekeys): a client's KeyUpdate ends its "
                     f"connection cleanly")
        return rekey

    def cipher_preference(self, crypto):
        """The backend's order (cheapest first), except that suites the kernel's TLS lacks go
        last, so that kTLS can take over the records after the handshake."""
        return tuple(sorted(crypto.suite_preference,
                            key=lambda suite: bool(self.ktls_suites) and suite not in
                            self.ktls_suites))

    def ktls_failed(self, suite, err, log):
        self.ktls_suites.discard(suite)
        log.warn(f"kTLS refused {_TLS_SUITES[suite].name} ({err.strerror}): such connections now "
                 f"use the userspace record layer")


# === 7. Connection loop ===========================================================================

# Every SQE's user_data, which its completion brings back:
#   bits  0-31  slot index (listener index for OP_ACCEPT; 0 for the others below OP_RECV)
#   bits 32-39  operation: OP_*
#   bits 40-63  slot generation, bumped when a slot is freed, so that a completion arriving after
#               its slot was freed and reused is recognised and dropped
# user_data() encodes; Server.run() decodes inline (see there), with the same names.
OP_ACCEPT, OP_TIMER, OP_REAP, OP_IGNORE, OP_STATX, OP_WATCHDOG, OP_NOTIFY, OP_RELOAD = range(8)
OP_RECV, OP_SEND, OP_SEND_LINKED, OP_LINGER, OP_KEY_UPDATE = range(8, 13)
UD_INDEX_MASK = 0xFFFFFFFF
UD_OP_SHIFT, UD_OP_MASK = 32, 0xFF
UD_GEN_SHIFT, GEN_MASK = 40, (1 << 24) - 1


def user_data(op, index=0, gen=0):
    """The user_data of operation op on slot (or listener) index in its generation gen."""
    return index | op << UD_OP_SHIFT | gen << UD_GEN_SHIFT


# A slot's operations: slot.ud (its index and generation) | UD_RECV, and so on.
UD_RECV, UD_SEND, UD_SEND_LINKED, UD_LINGER, UD_KEY_UPDATE = (user_data(op) for op in (
    OP_RECV, OP_SEND, OP_SEND_LINKED, OP_LINGER, OP_KEY_UPDATE))
UD_TIMER, UD_REAP, UD_IGNORE, UD_STATX, UD_WATCHDOG, UD_NOTIFY = (user_data(op) for op in (
    OP_TIMER, OP_REAP, OP_IGNORE, OP_STATX, OP_WATCHDOG, OP_NOTIFY))
# A reload's two events: its loading thread is done (index 0), its grace period is over (1).
UD_LOADED, UD_GRACE = user_data(OP_RELOAD, 0), user_data(OP_RELOAD, 1)

# What sits between a slot's socket and HTTP; PROXY: its PROXY protocol header is being read.
PLAIN, HANDSHAKE, KTLS, USERTLS, PROXY = range(5)

SEND_CHUNK = 256 * 1024      # a body goes out in pieces this big, so slow readers show progress
# Userspace TLS seals records in place in a send area (see tx_area): every slot has one for a
# record; a response longer than that borrows one of a few bulk areas, if one is free, and goes
# out USERTLS_CHUNK at a time (sealing in pure Python blocks the loop: not more). Each area has
# room for the KeyUpdate answers owed before its records, and for a close_notify behind them.
USERTLS_CHUNK = 64 * 1024
TX_OWED_ROOM = 2048   # 75 KeyUpdate answers (27 bytes each); test suites send 32 in a row
TX_RECORD = _TLS_MAX_PLAINTEXT + _TLS_RECORD_OVERHEAD
TX_AREA = TX_OWED_ROOM + TX_RECORD + _TLS_CLOSE_NOTIFY_ROOM
TX_BULK_RECORDS = USERTLS_CHUNK // _TLS_MAX_PLAINTEXT
TX_BULK_AREA = TX_OWED_ROOM + TX_BULK_RECORDS * TX_RECORD + _TLS_CLOSE_NOTIFY_ROOM
TX_BULK_AREAS = 32
LINGER_TIMEOUT = 2.0         # how long a closing connection may keep sending us bytes
RBUF_EXTRA = 4096            # read buffer room beyond the largest allowed request head
HBUF_SIZE = 12 * 1024        # response head buffer: fits a 301 with an 8 KiB Location
ACCEPT_DEPTH = 8             # accepts in flight per listener at most (a burst: one enter)
# A request head or handshake may lose its slot to a waiting client once it has used a quarter
# of its time limit, and a second at least: a slow but honest client on a busy server keeps it.
REAP_MIN_AGE, REAP_MIN_SHARE = 1.0, 0.25
# A connection silent for this long (since its accept or its last response) may give its slot
# up: a client's first bytes follow the TCP handshake at once, so a slower one is idle.
REAP_IDLE_AGE = 0.1
# After a reload, a connection of the old site silent for this long is closed: longer than
# REAP_IDLE_AGE, as nothing waits for its slot, and a busy machine (or client) can hold a
# keep-alive client's next request back for a tenth of a second.
RETIRE_IDLE_AGE = 1.0
# accept(2) errors that belong to one client (a network error pending on its socket): try again
ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                errno.ENETUNREACH, errno.EINTR, errno.EAGAIN}


ACCESS_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class AccessLog:
    """Common Log Format lines, buffered and written once a second or when 64 KiB wait. A write
    that fails (disk full, a reader gone) drops the waiting lines and counts them; each kind of
    failure is reported once: the access log never stops the serving. path is the file's (None
    for standard output), which reopen opens again."""

    def __init__(self, fd, name, log, path=None):
        self.fd, self.name, self.log, self.path = fd, name, log, path
        self.lines = []
        self.size = 0
        self.dropped = 0         # lines lost to failed writes, for the stats line
        self.failures = set()    # errno values already reported

    def write(self, peer, request_line, status, body_len):
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        line = f'{peer} - - [{stamp}] "{log_escape(request_line)}" {status} {body_len}\n'
        self.lines.append(line)
        self.size += len(line)
        if self.size >= 65536:
            self.flush()

    def flush(self):
        data = "".join(self.lines).encode("ascii")  # log_escape left nothing else
        self.lines.clear()
        self.size = 0
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            self.dropped += data.count(b"\n")
            if e.errno not in self.failures:
                self.failures.add(e.errno)
                self.log.warn(f"access log {self.name}: {e.strerror}; dropping its lines while "
                              f"that lasts (counted as log_dropped in the stats line)")

    def reopen(self):
        """SIGUSR1, after logrotate moved the file away: the lines so far to the old file, the
        next ones to a new file at the path. If it cannot be opened, one line says so and the
        old file stays."""
        if self.path is None:
            return
        self.flush()
        try:
            fd = os.open(self.path, ACCESS_LOG_FLAGS, 0o644)
        except OSError as e:
            self.log.write(f"cannot reopen access log {self.path}: {e.strerror}; still writing "
                           f"to the file it was")
            return
        os.close(self.fd)
        self.fd = fd
        self.failures.clear()  # a new file: its failures are news


WATCHDOG_PING = b"WATCHDOG=1"


class SdNotify:
    """sd_notify(3): tells systemd, through the unix datagram socket named by $NOTIFY_SOCKET,
    how the server is doing: READY=1 and STATUS= once serving, STOPPING=1 when a stop begins
    (send), and WATCHDOG=1 every half $WATCHDOG_USEC while the loop runs (Server.on_watchdog).
    Every message is one datagram sent without waiting: a systemd that is slow (its queue full)
    or gone costs the message, never the server, and each kind of failure is logged once.
    A reload (SIGHUP) sends RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, in microseconds)
    when it begins (Server.begin_reload) and READY=1 when done or failed (Server.on_loaded),
    through send(): Type=notify-reload. A future supervisor forwarding SIGHUP to its workers
    would send these itself, once every worker has answered."""

    def __init__(self, address, watchdog_usec, log):
        self.address, self.log = address, log  # a path, or NUL and an abstract name (bytes)
        self.failures = set()                  # errno values already reported
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.watchdog = None  # the ring's timeout between two pings: half of WATCHDOG_USEC
        if watchdog_usec:
            half = watchdog_usec * 500  # nanoseconds
            self.watchdog = bytearray(kernel_timespec.pack(half // 10**9, half % 10**9))
            self._pack_ping()

    def _pack_ping(self):
        """The ping is a sendmsg through the ring, addressed as sd_notify addresses its
        datagrams (no connect: a systemd that re-creates its socket is found again): msghdr,
        iovec, sockaddr_un, "WATCHDOG=1", packed once; ping_addr is the msghdr's address."""
        address = self.address
        self.ping = bytearray(msghdr.size + 16 + 2 + len(address) + len(WATCHDOG_PING))
        base = buffer_address(self.ping)
        iov, name = base + msghdr.size, base + msghdr.size + 16
        data = name + 2 + len(address)
        msghdr.pack_into(self.ping, 0, name, 2 + len(address), iov, 1, 0, 0, 0)
        struct.pack_into(f"<QQH{len(address)}s{len(WATCHDOG_PING)}s", self.ping, msghdr.size,
                         data, len(WATCHDOG_PING), socket.AF_UNIX, address, WATCHDOG_PING)
        self.ping_addr = base

    def send(self, *fields):
        """One datagram of NAME=value lines (a one-off, at start or stop: a plain sendto)."""
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            self.failed(e.errno)

    def failed(self, err):
        if err not in self.failures:
            self.failures.add(err)
            where = log_escape(self.address.replace(b"\0", b"@", 1))
            self.log.warn(f"NOTIFY_SOCKET {where}: {os.strerror(err)}; systemd misses this "
                          f"server's messages (READY, STOPPING, WATCHDOG) while that lasts")


# A reload's loading thread and the event loop take turns at the GIL this often (seconds; the
# interpreter's default, 5 ms, would add that much to the loop's answers while a reload loads).
RELOAD_SWITCH = 0.0005


def start_thread(target, name):
    """A daemon thread running target, started with every signal blocked: signals stay with
    the loop's thread, whose wait in the kernel they interrupt."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread


def bytes_address(data):
    """Address of an immutable bytes object's contents; the caller keeps the object alive."""
    return ctypes.cast(data, ctypes.c_void_p).value


class Slot:
    """A connection's preallocated state. Buffers are fixed regions of the Server's arrays."""
    __slots__ = (
        # The socket
        "index",        # place in Server.slots and in every per-slot array; never changes
        "gen",          # generation, bumped when the slot is freed (user_data bits 40-63)
        "ud",           # user_data of index and gen: | UD_RECV and the like per operation
        "fd",           # the accepted socket; -1 while the slot is free
        "peer",         # client address for the access log and -v lines
        "mode",         # PLAIN, HANDSHAKE, KTLS or USERTLS: what sits between socket and HTTP;
                        # PROXY before them while the PROXY protocol header is read
        "site",         # the Site it was accepted under: a reload leaves it this one (retire)
        "tar_addr",     # where that site's tar is mapped
        # Fixed addresses in the Server's arrays, set once by _allocate
        "rbase",        # offset of the read buffer in Server.rbuf
        "raddr",        # address of the read buffer
        "haddr",        # address of the response head buffer
        "msg_addr",     # send msghdr, pointing at the slot's two iovecs (head, body)
        "rmsg_addr",    # kTLS recvmsg area: msghdr, then its iovec, then a control message
        "riov_addr",
        "cmsg_addr",
        # Read buffer
        "rstart",       # where the next request starts in the read buffer
        "rlen",         # bytes held in the read buffer
        "recv_busy",    # a recv is in flight
        "hs_need",      # bytes the handshake's recv asked for (a record header or body), or
                        # the PROXY header's take (0 while its bytes are peeked)
        # Write state
        "send_busy",    # a send is in flight
        "send_linked",  # ... linked to the recv behind it (silent on success)
        "send_ud",      # its user_data, for a cancel
        "iov",          # an unlinked send's (head addr, len, body addr, len): to resume it
        "pair",         # the connection's SQEs of send_then_recv, made on first use
        "out",          # bytes built in Python that a send reads: kept alive here
        "body_pos",     # address of the body still to send, in the tar's mmap
        "body_end",
        # HTTP
        "keep_alive",   # the response under way leaves the connection open
        "partial",      # a request head (or TLS handshake, or PROXY header) has begun: see
                        # need_more, reap
        # TLS
        "tls",          # TLSServer during the handshake (and the PROXY header before it),
                        # then the userspace record layer, or
                        # under kTLS the secrets for KeyUpdates (KTLSKeys) if the kernel rekeys
        "pending_out",  # TLS bytes owed to the client, sent before the next record
        "tx_base",      # offset of the slot's send area in Server.tbuf (userspace TLS)
        "bulk",         # offset of the bulk send area it borrowed, or None
        "spill",        # decrypted bytes that did not fit the read buffer yet
        # Timers and closing
        "deadline",     # monotonic time at which on_timer closes the connection
        "closing",      # cancels are out: freed when nothing is left in flight
        "lingering",    # half-closed: reading until the client closes (linger)
    )

    def __init__(self, index):
        self.index, self.gen, self.fd = index, 0, -1
        self.peer = "-"
        self.site = None
        self.tx_base, self.bulk = 0, None


class Limits:
    """What the Server allows its connections, in seconds and bytes; the CLI fills it in."""
    __slots__ = (
        "max_connections",    # slots allocated at start: connections open at once
        "header_timeout",     # a request head, from its first byte (or a fresh connection's
                              # accept, its PROXY header included)
        "idle_timeout",       # a keep-alive connection between requests; a send without progress
        "handshake_timeout",  # a TLS handshake, from accept (its PROXY header included)
        "max_header_bytes",   # largest request head; a larger one gets 431 (or 414)
        "grace",              # after a stop signal, for requests and responses in flight
    )

    def __init__(self, max_connections, header_timeout, idle_timeout, handshake_timeout,
                 max_header_bytes, grace):
        self.max_connections, self.max_header_bytes = max_connections, max_header_bytes
        self.header_timeout, self.idle_timeout = header_timeout, idle_timeout
        self.handshake_timeout, self.grace = handshake_timeout, grace


class Server:
    """The event loop: listeners, a ring, and max_connections fixed slots. A connection's life:

      accept -> [PROXY header] -> [TLS handshake -> kTLS or userspace records]
             -> request/response loop -> linger or close -> free

    and the completions (dispatched by run()) that move its slot from step to step:

      accept ...... arm_accepts keeps single-shot accepts in flight; on_accept -> open_slot.
                    With every slot busy the client waits in self.waiting: reap, after the
                    batch, closes a connection that is getting nowhere, and maybe_free hands
                    its slot over
      PROXY ....... --proxy-protocol: peek_proxy_header -> on_recv -> on_proxy_bytes, which
                    takes the header's bytes, and no more, as it sees them -> begin
      handshake ... recv_handshake -> on_recv -> on_handshake_bytes (a record at a time if kTLS
                    may follow) ->
                    finish_handshake: the keys go to the kernel (KTLS) or stay here (USERTLS)
      requests .... post_recv -> on_recv (on_ktls_recv, on_usertls_recv) -> process ->
                    send_response -> send_next -> on_send; keep-alive: the last send is linked
                    to the next recv, one completion a request
      rekey ....... kTLS: on_ktls_recv -> on_ktls_key_update (the client's next key to the
                    kernel) -> if asked, send_key_update -> on_key_update_sent (ours) -> post_recv
      closing ..... linger: close_notify, SHUT_WR, read until the client closes; or at once
                    start_close: cancel what is in flight. Then maybe_free, once nothing is:
                    close the socket, bump the generation, back on self.free
      timeouts .... on_timer, once a second: a slot past its deadline -> start_close
      watchdog .... on_watchdog, every half WATCHDOG_USEC under systemd: WATCHDOG=1 (SdNotify)
      reload ...... SIGHUP: begin_reload loads the new Site (and TLSConfig) in a thread, the
                    loop serving on; on_loaded swaps them in for new connections; retire lets
                    the old site's connections finish, closing them by --grace

    Each slot answers from the Site it was accepted under (slot.site, slot.tar_addr), so that a
    reload changes no response under way: its bytes come from the old mapping to the end.

    An exception in a handler costs its connection (internal_error), not the server."""

    def __init__(self, site, listeners, limits, log, tls=None, access_log=None, notify=None,
                 proxy_protocol=False, reload=None, secure=False):
        self.site, self.limits, self.log = site, limits, log
        self.proxy_protocol = proxy_protocol  # every connection starts with a PROXY header
        self.reload = reload      # () -> (Site, TLSConfig or None) from the files; see begin_reload
        self.notify = notify      # SdNotify, or None when systemd does not listen
        self.listeners = [sock for sock, _ in listeners]
        self.listener_tls = [is_tls for _, is_tls in listeners]
        self.tls = tls            # TLSContext: certificate, key and kTLS support; None for HTTP
        self.access_log = access_log  # AccessLog, or None
        self.want_peer = access_log is not None or log.level >= 1  # lines that name the client
        n = limits.max_connections
        # Two SQEs per slot (a linked send and recv) and 64 for the rest, as a power of two.
        self.ring = IoUring(min(IORING_MAX_ENTRIES, 1 << (2 * n + 64).bit_length()),
                            disabled=secure)
        self._check_kernel()
        if secure:  # --secure: the ring runs the operations of REQUIRED_OPS and nothing else
            self.ring.restrict(REQUIRED_OPS.values(), USED_SQE_FLAGS)
        self.rbuf_size = max(limits.max_header_bytes, MAX_REQUEST_LINE) + RBUF_EXTRA
        if tls is not None:
            self.rbuf_size = max(self.rbuf_size, _TLS_MAX_RECORD)  # a whole record must fit
        self._allocate(n)
        self.tar_addr = site.archive.address
        self.statx_buf = bytearray(STATX_BUF_SIZE)
        self.statx_busy = False
        self.statx_archive = None     # the Archive whose descriptor the statx in flight reads
        self.listener_fds = [sock.fileno() for sock in self.listeners]
        self.accepting = [0] * len(self.listeners)          # accepts in flight
        self.accept_paused = [False] * len(self.listeners)  # after EMFILE and the like
        # (fd, listener) accepted while every slot was busy: at most one per listener, as a
        # listener gets no new accept while its client waits here.
        self.waiting = collections.deque()
        self.reap_due = False
        self.stopping = False
        self.stop_requested = False   # set by request_stop(), from a signal handler
        self.stats_requested = False  # set by request_stats(), likewise
        self.reload_requested = False  # set by request_reload(), likewise
        self.loader = None            # the thread loading a reload, while it runs
        self.loaded = None            # what it loaded: (Site, TLSConfig or None), or an error text
        self.reload_again = False     # a SIGHUP came while loading: load again when done
        self.retiring = {}            # Site a reload replaced -> [its connections not yet
                                      # freed, the monotonic time its grace period ends]
        # The loader's "done": a byte through a socket pair, received by the ring (the loop
        # blocks in io_uring_enter; it must not be re-entered from another thread).
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_buf = bytearray(1)
        g = limits.grace
        self.grace_timespec = bytearray(kernel_timespec.pack(int(g), int(g % 1 * 1e9)))
        self.stop_deadline = None
        self.accepted = self.requests = self.closed = self.timeouts = 0  # for the stats line
        self.handshakes = self.resumed = self.tls_failures = self.reaped = self.errors = 0
        self.proxy_refused = 0
        self.timespec = bytearray(kernel_timespec.pack(1, 0))
        self.reap_timespec = bytearray(kernel_timespec.pack(0, int(REAP_IDLE_AGE * 1e9)))
        self.reap_timer_armed = False
        self.now = time.monotonic()

    def _check_kernel(self):
        ops = self.ring.supported_ops()
        missing = [name for name, op in REQUIRED_OPS.items() if op not in ops]
        if not self.ring.features & IORING_FEAT_CQE_SKIP:
            missing.append("IOSQE_CQE_SKIP_SUCCESS")
        if missing:
            raise StartupError("this kernel's io_uring lacks " + ", ".join(missing)
                               + "; use Linux 5.19 or newer")

    def _allocate(self, n):
        """Every per-connection byte is allocated here, once. Anonymous mappings rather than
        bytearrays: their pages stay untouched (not resident) until a connection uses them."""
        self.rbuf = mmap.mmap(-1, n * self.rbuf_size)
        self.hbuf = mmap.mmap(-1, n * HBUF_SIZE)
        self.iovs = mmap.mmap(-1, n * iovec2.size)    # send: head + body
        self.msgs = mmap.mmap(-1, n * msghdr.size)
        self.rmsgs = mmap.mmap(-1, n * RECV_AREA)      # kTLS receive: msghdr, iovec, cmsg
        raddr, haddr = buffer_address(self.rbuf), buffer_address(self.hbuf)
        iaddr, maddr = buffer_address(self.iovs), buffer_address(self.msgs)
        rmaddr = buffer_address(self.rmsgs)
        self.slots = []
        for i in range(n):
            s = Slot(i)
            s.rbase, s.raddr = i * self.rbuf_size, raddr + i * self.rbuf_size
            s.haddr = haddr + i * HBUF_SIZE
            s.msg_addr = maddr + i * msghdr.size
            s.rmsg_addr = rmaddr + i * RECV_AREA
            s.riov_addr, s.cmsg_addr = s.rmsg_addr + msghdr.size, s.rmsg_addr + RECV_CMSG_OFF
            # The send msghdr never changes: it always points at this slot's two iovecs.
            msghdr.pack_into(self.msgs, i * msghdr.size, 0, 0, iaddr + i * iovec2.size, 2, 0, 0, 0)
            self.slots.append(s)
        self.free = list(reversed(self.slots))
        self.active = 0
        self.rview, self.rbuf_addr = memoryview(self.rbuf), raddr
        if self.tls is not None:
            self.tbuf = mmap.mmap(-1, n * TX_AREA + TX_BULK_AREAS * TX_BULK_AREA)
            self.tview, self.tbuf_addr = memoryview(self.tbuf), buffer_address(self.tbuf)
            for s in self.slots:
                s.tx_base = s.index * TX_AREA
            self.bulk_free = [n * TX_AREA + i * TX_BULK_AREA for i in range(TX_BULK_AREAS)]
        self.close_notify = ktls_record_msg(_TLS_CT_ALERT, _TLS_CLOSE_NOTIFY_BODY)
        self.key_update = ktls_record_msg(_TLS_CT_HANDSHAKE, _TLS_KEY_UPDATES[0])

    # -- the loop ----------------------------------------------------------------------------------

    def run(self):
        """Until stopped: submit, wait for completions, hand each to its handler."""
        self.arm_accepts()
        self.arm_timer()
        if self.notify and self.notify.watchdog:
            self.arm_watchdog()
        ring, slots = self.ring, self.slots
        while True:
            ring.enter(True)
            self.now = time.monotonic()
            # user_data is decoded inline: three calls would cost ~2% of a keep-alive request.
            for ud, res, _ in ring.completions():
                op = (ud >> UD_OP_SHIFT) & UD_OP_MASK
                if op >= OP_RECV:  # an operation on a connection's slot
                    slot = slots[ud & UD_INDEX_MASK]
                    if (ud >> UD_GEN_SHIFT) != slot.gen or slot.fd < 0:
                        continue  # stale: the slot was freed (and maybe reused) since
                    try:
                        if op == OP_RECV:
                            self.on_recv(slot, res)
                        elif op == OP_LINGER:
                            self.on_link_broken(slot)
                        elif op == OP_KEY_UPDATE:
                            self.on_key_update_sent(slot, res)
                        else:
                            self.on_send(slot, res, op == OP_SEND_LINKED)
                    except Exception:
                        self.internal_error(slot)
                elif op == OP_ACCEPT:
                    self.contain(self.on_accept, ud & UD_INDEX_MASK, res)
                elif op == OP_TIMER:
                    self.contain(self.tick)
                elif op == OP_REAP:
                    self.reap_timer_armed = False
                    self.reap_due = bool(self.waiting)
                elif op == OP_STATX:
                    self.contain(self.on_statx, res)
                elif op == OP_WATCHDOG:
                    self.contain(self.on_watchdog)
                elif op == OP_NOTIFY:
                    self.contain(self.notify.failed, -res)
                elif op == OP_RELOAD:
                    self.contain(self.on_grace_over if ud & UD_INDEX_MASK else self.on_loaded)
            if self.reap_due:
                self.contain(self.reap)
            if self.stats_requested:
                self.stats_requested = False
                self.log.write(self.stats_line())
                if self.access_log:
                    self.access_log.reopen()
            if self.reload_requested:
                self.reload_requested = False
                self.contain(self.begin_reload)
            if self.stop_requested and not self.stopping:
                self.begin_stop(self.limits.grace)
            if self.stopping and self.drained():
                return

    def contain(self, handler, *args):
        """Run a handler that no one connection owns; a bug in it is counted and logged."""
        try:
            handler(*args)
        except Exception:
            self.internal_error(None)

    def internal_error(self, slot):
        """A bug must cost one connection, not the server: count it, log it, close."""
        self.errors += 1
        self.log.bug()
        if slot is not None and slot.fd >= 0 and not slot.closing:
            self.start_close(slot)

    # -- accepting ---------------------------------------------------------------------------------

    def arm_accepts(self):
        """Keep single-shot accepts in flight, no more than there are free slots: the kernel's
        backlog holds the other clients (a multishot accept would drain it). While every slot
        is busy each listener keeps one, whose client may take an idle connection's slot."""
        if self.stopping:
            return
        spare = len(self.free) - sum(self.accepting)
        for i, fd in enumerate(self.listener_fds):
            if self.accept_paused[i] or any(w[1] == i for w in self.waiting):
                continue
            while self.accepting[i] < ACCEPT_DEPTH and (spare > 0 or not self.accepting[i]):
                self.ring.prep_accept(fd, 0, 0, SOCK_CLOEXEC, user_data(OP_ACCEPT, i))
                self.accepting[i] += 1
                spare -= 1

    def on_accept(self, i, res):
        self.accepting[i] -= 1
        if res < 0:
            self.on_accept_error(i, -res)
        elif self.stopping:
            self.ring.prep_close(res, UD_IGNORE, IOSQE_CQE_SKIP_SUCCESS)
        elif self.free:
            self.open_slot(res, self.listener_tls[i])
        else:
            # Every slot is busy: the client waits for one, which an idle connection may give
            # up (decided once this batch's completions are in: a request may be among them).
            self.waiting.append((res, i))
            self.reap_due = True
        self.arm_accepts()

    def on_accept_error(self, i, err):
        if err == errno.ECANCELED:
            return
        if err in ACCEPT_RETRY:
            self.log.limited(("accept", err), f"accept failed: {os.strerror(err)}")
            return
        # Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or worse: trying
        # again at once would spin. The client stays in the backlog.
        self.accept_paused[i] = True
        self.log.limited(("accept", err), f"accept failed: {os.strerror(err)}; trying again "
                         f"when a connection closes, or in a second")

    def resume_accepts(self):
        """A slot (and its descriptor) came free, or a second passed: try paused listeners."""
        for i in range(len(self.accept_paused)):
            self.accept_paused[i] = False
        self.arm_accepts()

    def pause_accepts(self):
        """Stop accepting: cancel every accept in flight."""
        for i, n in enumerate(self.accepting):
            if n:
                self.ring.prep_cancel64(user_data(OP_ACCEPT, i), IORING_ASYNC_CANCEL_ALL,
                                        UD_IGNORE)

    # -- a new connection --------------------------------------------------------------------------

    def open_slot(self, fd, tls):
        slot = self.free.pop()
        slot.ud = user_data(0, slot.index, slot.gen)  # | UD_RECV and the like, per operation
        self.active += 1
        self.accepted += 1
        slot.fd = fd
        slot.site, slot.tar_addr = self.site, self.tar_addr
        slot.rstart = slot.rlen = 0
        slot.recv_busy = slot.send_busy = slot.send_linked = False
        slot.closing = slot.lingering = slot.partial = slot.keep_alive = False
        slot.out = slot.tls = slot.pair = None
        slot.pending_out = slot.spill = b""
        try:
            slot.peer = peer_name(fd) if self.want_peer else "-"
            # A PROXY header counts against the time allowed for what it comes before.
            if tls:
                slot.tls = TLSServer(self.tls.config)
                slot.deadline = self.now + self.limits.handshake_timeout
            else:
                slot.deadline = self.now + self.limits.header_timeout
            if self.proxy_protocol:
                slot.mode = PROXY
                self.peek_proxy_header(slot)
            else:
                self.begin(slot)
        except Exception:  # the slot owns the descriptor now: closing it closes the socket
            self.internal_error(slot)

    def begin(self, slot):
        """The connection's first read: the TLS handshake's, or the first request's."""
        if slot.tls is not None:
            slot.mode = HANDSHAKE
            self.recv_handshake(slot)
        else:
            slot.mode = PLAIN
            self.post_recv(slot)

    # -- the PROXY protocol header -----------------------------------------------------------------

    def peek_proxy_header(self, slot):
        """Look at the bytes that have come, behind those of the header taken so far, leaving
        them in the socket: where the header ends shows only once it is seen, and nothing
        behind it may be read here (the handshake reads its records exactly, for kTLS)."""
        slot.hs_need = 0
        self.ring.prep_recv(slot.fd, slot.raddr + slot.rlen, PROXY_V2_MAX - slot.rlen,
                            socket.MSG_PEEK, slot.ud | UD_RECV)
        slot.recv_busy = True

    def on_proxy_bytes(self, slot, res):
        """After a peek (hs_need 0), take the header's bytes among those seen (all of them
        while it is incomplete); after a take, begin, or peek at what comes next."""
        header = self.rbuf[slot.rbase:slot.rbase + slot.rlen + res]
        if slot.hs_need:
            if res != slot.hs_need:
                self.start_close(slot)
                return
            slot.rlen += res
            found = parse_proxy_header(header)  # as when peeked: these are the same bytes
            if found is None:
                self.peek_proxy_header(slot)
            else:
                self.proxy_header_done(slot, found[1])
            return
        slot.partial = True  # see reap
        try:
            found = parse_proxy_header(header)
        except ValueError as e:
            self.refuse_proxy_header(slot, e)
            return
        slot.hs_need = res if found is None else found[0] - slot.rlen
        self.ring.prep_recv(slot.fd, slot.raddr + slot.rlen, slot.hs_need, MSG_WAITALL,
                            slot.ud | UD_RECV)
        slot.recv_busy = True

    def proxy_header_done(self, slot, client):
        """The client's address replaces the balancer's (LOCAL and UNKNOWN leave the socket's)."""
        if client is not None:
            slot.peer = client
        slot.rlen = 0
        slot.partial = False
        self.begin(slot)

    def refuse_proxy_header(self, slot, err):
        """Not a PROXY header: close, answering nothing (a client that skipped the balancer
        learns nothing from us)."""
        self.proxy_refused += 1
        self.log.info(f"client {slot.peer}: PROXY header refused: {err}")
        self.start_close(slot)

    # -- requests ----------------------------------------------------------------------------------

    def post_recv(self, slot):
        """Read more request bytes behind what the buffer holds."""
        if slot.rstart:
            # Move a partial pipelined request to the front so the buffer has room again.
            self.rbuf.move(slot.rbase, slot.rbase + slot.rstart, slot.rlen - slot.rstart)
            slot.rlen -= slot.rstart
            slot.rstart = 0
        if slot.spill:
            # Decrypted request bytes are waiting (userspace TLS): they come before the socket.
            self.take_plaintext(slot)
            self.process(slot)
            return
        addr, room = slot.raddr + slot.rlen, self.rbuf_size - slot.rlen
        if slot.mode == KTLS:
            # recvmsg with a control buffer: the kernel tells each record's type there, and
            # a non-data record (alert, KeyUpdate) is delivered instead of failing with EIO.
            off = slot.index * RECV_AREA
            recv_area.pack_into(self.rmsgs, off, 0, 0, slot.riov_addr, 1, slot.cmsg_addr,
                                CMSG_SPACE_1, 0, addr, room)
            self.ring.prep_recvmsg(slot.fd, slot.rmsg_addr, 0, slot.ud | UD_RECV)
        else:
            self.ring.prep_recv(slot.fd, addr, room, 0, slot.ud | UD_RECV)
        slot.recv_busy = True

    def on_recv(self, slot, res):
        slot.recv_busy = False
        if slot.send_linked:
            slot.send_busy = False  # a recv linked behind a send only runs once the send is done
        if slot.closing:
            self.maybe_free(slot)
        elif res <= 0:
            self.start_close(slot)
        elif slot.lingering:
            slot.rlen = 0
            self.post_recv(slot)
        elif slot.mode == PLAIN:
            slot.rlen += res
            self.process(slot)
        elif slot.mode == HANDSHAKE:
            self.on_handshake_bytes(slot, res)
        elif slot.mode == KTLS:
            self.on_ktls_recv(slot, res)
        elif slot.mode == PROXY:
            self.on_proxy_bytes(slot, res)
        else:
            self.on_usertls_recv(slot, res)

    def process(self, slot):
        """Answer the next complete request in the slot's buffer, or read more."""
        buf, base = self.rbuf, slot.rbase
        start, end = base + slot.rstart, base + slot.rlen
        while start < end and buf[start] in (13, 10):
            start += 1  # RFC 9112 §2.2: ignore empty lines before a request line
        slot.rstart = start - base
        found = find_head_end(buf, start, end)
        if found is None:
            self.need_more(slot, start, end)
            return
        head_end, next_start = found
        if head_end - start > self.limits.max_header_bytes:
            self.send_response(slot, slot.site.error(oversize_status(buf, start, end), True), None)
            return
        head = buf[start:head_end]
        slot.rstart = next_start - base
        if slot.rstart == slot.rlen:
            slot.rstart = slot.rlen = 0
        self.requests += 1
        self.send_response(slot, slot.site.respond(head), head)

    def need_more(self, slot, start, end):
        """No complete head yet: enforce the size limits, start the header clock, read on."""
        if end - start >= self.limits.max_header_bytes or end - start >= self.rbuf_size - 1:
            self.send_response(slot, slot.site.error(oversize_status(self.rbuf, start, end), True),
                               None)
            return
        if end > start and not slot.partial:
            slot.partial = True  # first byte of a request: the header deadline starts now
            slot.deadline = self.now + self.limits.header_timeout
        elif end == start:
            slot.rstart = slot.rlen = 0
        self.post_recv(slot)

    # -- responses ---------------------------------------------------------------------------------

    def send_response(self, slot, response, request_head):
        status, head, body_off, body_len, keep_alive = response
        if self.access_log:
            self.log_access(slot, request_head, status, body_len)
        n = len(head)
        h = slot.index * HBUF_SIZE
        self.hbuf[h:h + n] = head
        slot.body_pos = slot.tar_addr + body_off
        slot.body_end = slot.body_pos + body_len
        slot.keep_alive = keep_alive
        slot.partial = False
        self.send_next(slot, n)

    def log_access(self, slot, request_head, status, body_len):
        line = b"-" if request_head is None else request_head.split(b"\n", 1)[0].rstrip(b"\r")
        self.access_log.write(slot.peer, line, status, body_len)

    def send_next(self, slot, head_len=0):
        """Send the head (if any) and the next piece of the body, straight from the tar's mmap.
        The last piece of a keep-alive response is linked to the next recv."""
        if slot.mode == USERTLS:
            self.send_next_sealed(slot, head_len)
            return
        body_addr = slot.body_pos
        body = min(slot.body_end - body_addr, SEND_CHUNK)
        slot.body_pos += body
        slot.deadline = self.now + self.limits.idle_timeout
        if slot.body_pos == slot.body_end and slot.keep_alive and slot.rlen == 0 \
                and slot.mode == PLAIN:
            self.send_then_recv(slot, slot.haddr, head_len, body_addr, body)
        else:
            self.submit_send(slot, slot.haddr, head_len, body_addr, body, False)

    def send_then_recv(self, slot, head_addr, head_len, body_addr, body_len):
        """The hot path: the rest of a keep-alive response (two iovecs), linked to the recv of
        the next request into the empty read buffer. See submit_send for the link."""
        iovec2.pack_into(self.iovs, slot.index * iovec2.size, head_addr, head_len, body_addr,
                         body_len)
        slot.send_busy = slot.send_linked = slot.recv_busy = True
        slot.send_ud = slot.ud | UD_SEND_LINKED
        if slot.pair is None:
            slot.pair = self.ring.sendmsg_recv_pair(
                slot.fd, slot.msg_addr, MSG_NOSIGNAL | MSG_WAITALL, slot.send_ud, slot.raddr,
                self.rbuf_size, slot.ud | UD_RECV)
        self.ring.prep_pair(slot.pair)

    def send_next_sealed(self, slot, head_len):
        """Userspace TLS: the head and the next piece of the body as records sealed in place in
        a send area, the body read into them from the tar."""
        start, room = self.tx_area(slot, head_len)
        view, pos = self.tview, start
        owed = slot.pending_out   # a KeyUpdate answer, sealed before these records
        view[pos:pos + len(owed)] = owed
        slot.pending_out = b""
        body = min(slot.body_end - slot.body_pos, room * _TLS_MAX_PLAINTEXT - head_len)
        n = head_len + body
        records = _tls_record_layout(pos + len(owed), n)
        first = records[0][0] + _TLS_RECORD_HEADER_LEN
        h = slot.index * HBUF_SIZE
        view[first:first + head_len] = self.hbuf[h:h + head_len]
        # pread, not the mapping: a tar truncated in place makes the mapping's end SIGBUS.
        if os.preadv(slot.site.archive.fd, [view[first + head_len:first + n]],
                     slot.body_pos - slot.tar_addr) < body:
            self.start_close(slot)  # the tar shrank: the rest of this body is gone
            return
        # The content was read in one piece: move each record's part to its place (the last
        # first, as they move up), leaving room for the headers and tags between them.
        for i in range(len(records) - 1, 0, -1):
            self.tbuf.move(records[i][0] + _TLS_RECORD_HEADER_LEN, first + i * _TLS_MAX_PLAINTEXT,
                           records[i][1])
        slot.body_pos += body
        slot.deadline = self.now + self.limits.idle_timeout
        # The last piece of a connection's last response carries our close_notify too (one
        # send); linger() then has nothing more to seal.
        last = slot.body_pos == slot.body_end
        end = slot.tls.seal_in_place(view, self.tbuf_addr, records,
                                     close=last and not slot.keep_alive)
        if last and slot.keep_alive and slot.rlen == 0 and not slot.spill and slot.bulk is None:
            self.send_then_recv(slot, self.tbuf_addr + start, end - start, 0, 0)
        else:
            self.submit_send(slot, self.tbuf_addr + start, end - start, 0, 0, False)

    def tx_area(self, slot, head_len):
        """(offset in tbuf, records it holds) of the area the next records are sealed in: the
        slot's own, or a bulk one it borrows for a response longer than a record (given back
        by release_bulk once the response is sent)."""
        if slot.bulk is None and self.bulk_free and \
                head_len + slot.body_end - slot.body_pos > _TLS_MAX_PLAINTEXT:
            slot.bulk = self.bulk_free.pop()
        if slot.bulk is None:
            return slot.tx_base, 1
        return slot.bulk, TX_BULK_RECORDS

    def release_bulk(self, slot):
        if slot.bulk is not None:
            self.bulk_free.append(slot.bulk)
            slot.bulk = None

    def submit_send(self, slot, head_addr, head_len, body_addr, body_len, linked):
        """SENDMSG of two iovecs (head, body). A linked send completes silently on success and
        the next recv runs right behind it: one CQE per keep-alive request. It must not stop
        short, so it carries MSG_WAITALL; kTLS refuses that flag (EOPNOTSUPP), so kTLS sends
        are never linked and on_send resumes a short one."""
        iovec2.pack_into(self.iovs, slot.index * iovec2.size, head_addr, head_len, body_addr,
                         body_len)
        slot.send_busy = True
        slot.send_linked = linked
        if linked:
            slot.send_ud = slot.ud | UD_SEND_LINKED
            self.ring.prep_sendmsg(slot.fd, slot.msg_addr, MSG_NOSIGNAL | MSG_WAITALL,
                                   slot.send_ud, IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS)
        else:
            slot.iov = (head_addr, head_len, body_addr, body_len)  # for resume_send
            slot.send_ud = slot.ud | UD_SEND
            self.ring.prep_sendmsg(slot.fd, slot.msg_addr, MSG_NOSIGNAL, slot.send_ud)

    def send_bytes(self, slot, data, linked):
        """Send bytes built in Python (handshake flights, userspace TLS records)."""
        slot.out = data  # keeps the memory alive while the kernel reads it
        self.submit_send(slot, bytes_address(data), len(data), 0, 0, linked)

    def resume_send(self, slot, sent):
        """A send stopped after `sent` bytes: submit the rest of its two iovecs."""
        head_addr, head_len, body_addr, body_len = slot.iov
        if sent < head_len:
            head_addr, head_len = head_addr + sent, head_len - sent
        else:
            sent -= head_len
            head_len = 0
            body_addr, body_len = body_addr + sent, body_len - sent
        self.submit_send(slot, head_addr, head_len, body_addr, body_len, False)

    def on_send(self, slot, res, linked):
        slot.send_busy = False
        if linked:
            # A linked send only completes visibly when it failed (or stopped short, which
            # MSG_WAITALL only does on error); the recv behind it is gone with it.
            self.on_link_broken(slot)
        elif slot.closing:
            self.maybe_free(slot)
        elif res < 0:
            self.start_close(slot)
        elif res < slot.iov[1] + slot.iov[3]:
            self.resume_send(slot, res)
        elif slot.body_pos < slot.body_end:
            self.send_next(slot)
        else:
            self.response_sent(slot)

    def response_sent(self, slot):
        """The last byte of a response is with the kernel: linger, or on to the next request."""
        self.release_bulk(slot)
        if not slot.keep_alive:
            self.linger(slot)
        elif slot.rlen:
            self.process(slot)  # a pipelined request is already waiting
        else:
            slot.deadline = self.now + self.limits.idle_timeout
            self.post_recv(slot)

    # -- TLS ---------------------------------------------------------------------------------------

    def recv_handshake(self, slot, n=_TLS_RECORD_HEADER_LEN):
        """The handshake's next read. While kTLS may take the connection over, it reads exactly
        one record, its header and then its body (n bytes), so that nothing behind the client's
        Finished is read: the kernel must find that in the socket. Otherwise it reads whatever
        has come, and what follows the Finished goes to the userspace record layer."""
        if self.tls.ktls_suites:
            slot.hs_need = n
            self.ring.prep_recv(slot.fd, slot.raddr, n, MSG_WAITALL, slot.ud | UD_RECV)
        else:
            slot.hs_need = 0
            self.ring.prep_recv(slot.fd, slot.raddr, self.rbuf_size, 0, slot.ud | UD_RECV)
        slot.recv_busy = True

    def on_handshake_bytes(self, slot, res):
        """Handshake bytes arrived (a record header or body, or whatever came): feed the
        handshake state machine."""
        if res < slot.hs_need:
            self.start_close(slot)  # the client closed in the middle of a record
            return
        slot.partial = True  # the handshake has begun: see reap()
        data = self.rbuf[slot.rbase:slot.rbase + res]
        hs = slot.tls
        out = hs.receive(data)
        if hs.failed:
            self.tls_failures += 1
            self.log.info(f"client {slot.peer}: TLS handshake failed: {log_escape(hs.error)}")
            if out:
                self.send_fatal_alert(slot, out)
            else:
                self.start_close(slot)
            return
        if hs.done:  # nothing to send after the client's Finished: the tickets went before it
            self.finish_handshake(slot)
            return
        # After a header read its body (if any); after a body the next header.
        header = _TLS_RECORD_HEADER_LEN
        need = (data[3] << 8 | data[4]) if slot.hs_need == header and res == header else 0
        if out:
            self.send_bytes(slot, out, True)
        self.recv_handshake(slot, need or header)

    def finish_handshake(self, slot):
        """The client's Finished is verified: hand the keys to the kernel, or keep the record
        layer in Python, and start HTTP. If kTLS may take over, recv_handshake read the Finished
        record and nothing after it: any application data is still in the socket. If not, the
        record layer has what came behind the Finished (often the first request)."""
        hs = slot.tls
        self.handshakes += 1
        self.resumed += hs.resumed
        # We send nothing after the client's Finished (our session tickets went before it), so
        # its ACK would wait for the delayed-ACK timer, and a client using Nagle holds its first
        # request until then (~40 ms). Ask for the ACK now: one setsockopt per connection, at
        # hand-over time.
        try:
            setsockopt_fd(slot.fd, socket.IPPROTO_TCP, socket.TCP_QUICKACK, ONE)
        except OSError:
            pass  # an ACK that is merely late
        if hs.sni:
            resumed = ", resumed" if hs.resumed else ""
            self.log.info(f"client {slot.peer}: TLS {hs.cipher_suite:#06x} for SNI {hs.sni}"
                          f"{resumed}")
        slot.mode = USERTLS
        if self.tls.ktls_suites and hs.cipher_suite in self.tls.ktls_suites:
            try:
                ktls_enable(slot.fd, hs)
                slot.mode = KTLS
            except OSError as e:
                # The socket may be half-switched to the kernel's TLS: end it; the next
                # connections use the userspace record layer for this cipher suite.
                self.tls.ktls_failed(hs.cipher_suite, e, self.log)
                self.start_close(slot)
                return
        slot.tls = hs.record_layer if slot.mode == USERTLS else \
            KTLSKeys(hs.record_layer, self.now) if self.tls.ktls_rekey else None
        slot.partial = False  # no request byte yet
        slot.rstart = slot.rlen = 0
        slot.deadline = self.now + self.limits.idle_timeout
        if slot.mode == USERTLS and slot.tls.buffered():
            self.on_usertls_recv(slot, 0)  # open() reads the bytes it holds first
        else:
            self.post_recv(slot)

    def send_fatal_alert(self, slot, alert):
        """Send the alert that ends the connection, then linger. No TLS follows a fatal alert,
        so the slot continues as plain bytes: no close_notify after it."""
        slot.mode = PLAIN
        slot.keep_alive = False
        slot.body_pos = slot.body_end = 0
        slot.pending_out = b""
        self.send_bytes(slot, alert, False)

    def on_ktls_recv(self, slot, res):
        """kTLS delivered one record's plaintext; its type is in the control message."""
        off = slot.index * RECV_AREA + RECV_CMSG_OFF
        _, level, ctype = cmsghdr.unpack_from(self.rmsgs, off)
        record_type = self.rmsgs[off + cmsghdr.size] if (level, ctype) == (
            SOL_TLS, TLS_GET_RECORD_TYPE) else _TLS_CT_APPLICATION_DATA
        if record_type == _TLS_CT_APPLICATION_DATA:
            slot.rlen += res
            self.process(slot)
        elif record_type == _TLS_CT_HANDSHAKE and slot.tls is not None:
            self.on_ktls_key_update(slot, res)
        elif record_type == _TLS_CT_ALERT and res == 2 and \
                self.rbuf[slot.rbase + slot.rlen + 1] != _TLS_ALERT_CLOSE_NOTIFY:
            self.start_close(slot)  # a fatal alert: no close_notify back
        else:
            # close_notify, or a post-handshake message (a KeyUpdate) that a kernel without
            # rekey cannot follow: either way the connection ends, cleanly.
            self.linger(slot)

    def on_ktls_key_update(self, slot, res):
        """A handshake record from a kernel that rekeys: a KeyUpdate, the one post-handshake
        message a client sends us (RFC 8446 §4.6.3). The kernel holds the records behind it
        until it has the client's next key: a read fails with EKEYEXPIRED until then, so the
        next recv is posted only after. With update_requested, our KeyUpdate goes out under our
        key of the moment, before any response, and our key moves on behind it."""
        pos = slot.rbase + slot.rlen
        message = self.rbuf[pos:pos + res]
        if message not in _TLS_KEY_UPDATES or not slot.tls.allow(self.now):
            # Not one whole KeyUpdate, or one too many: end cleanly. (With the kernel holding
            # the records, linger's read fails with EKEYEXPIRED and closes.)
            self.linger(slot)
            return
        if not self.ktls_rekey(slot, slot.tls.update_rx):
            return
        if message == _TLS_KEY_UPDATES[1]:
            self.send_key_update(slot)
        else:
            self.post_recv(slot)

    def send_key_update(self, slot):
        """Our KeyUpdate(update_not_requested), a handshake record through kTLS; no recv is in
        flight, nor any other send."""
        slot.send_busy = True
        slot.send_linked = False
        slot.send_ud = slot.ud | UD_KEY_UPDATE
        self.ring.prep_sendmsg(slot.fd, self.key_update[1], MSG_NOSIGNAL, slot.send_ud)

    def on_key_update_sent(self, slot, res):
        """Our KeyUpdate is with the kernel, sealed under our old key: our next key follows it."""
        slot.send_busy = False
        if slot.closing:
            self.maybe_free(slot)
            return
        if res != len(_TLS_KEY_UPDATES[0]):
            self.start_close(slot)
            return
        if not self.ktls_rekey(slot, slot.tls.update_tx):
            return
        if self.stopping and not slot.rlen:
            self.linger(slot)  # stopping began meanwhile, and no request has begun: see begin_stop
        else:
            self.post_recv(slot)

    def ktls_rekey(self, slot, update):
        """Give the kernel one direction's next key (update: slot.tls.update_rx or update_tx);
        False if it refused: the socket's keys are then in doubt, so it ends at once."""
        try:
            update(slot.fd)
        except OSError as e:
            self.log.limited(("ktls rekey", e.errno),
                             f"kTLS rekey failed ({e.strerror}): connection closed")
            self.start_close(slot)
            return False
        return True

    def on_usertls_recv(self, slot, res):
        tls, pos = slot.tls, slot.rbase + slot.rlen
        if tls.buffered():   # these bytes complete a record begun earlier: open() copies
            plain, events, to_send = tls.open(self.rbuf[pos:pos + res])
            slot.spill += plain
            self.take_plaintext(slot)
        else:   # whole records (the usual case) are decrypted where they lie
            end, events, to_send = tls.open_in_place(self.rview, self.rbuf_addr, pos, pos + res)
            slot.rlen = end - slot.rbase
        slot.pending_out += to_send
        if events:
            # close_notify gets ours back; a fatal alert or a record we rejected (our alert is
            # in to_send) ends the connection.
            if "close" in events:
                self.linger(slot)
            elif slot.pending_out:
                self.send_fatal_alert(slot, slot.pending_out)
            else:
                self.start_close(slot)
            return
        if len(slot.pending_out) > TX_OWED_ROOM:
            self.start_close(slot)   # KeyUpdate requests pile up, and no request reads them
            return
        self.process(slot)

    def take_plaintext(self, slot):
        """Move decrypted bytes into the read buffer, as many as fit. A record completed by a
        few new bytes can decrypt to 16 KiB: what does not fit waits in slot.spill."""
        n = min(len(slot.spill), self.rbuf_size - slot.rlen)
        pos = slot.rbase + slot.rlen
        self.rbuf[pos:pos + n] = slot.spill[:n]
        slot.spill = slot.spill[n:]
        slot.rlen += n

    # -- closing -----------------------------------------------------------------------------------

    def linger(self, slot):
        """End a connection gracefully: close_notify on TLS, half-close, then read until the
        client closes too, so unread request bytes cannot turn our close into a reset that
        destroys the response."""
        slot.lingering = True
        slot.deadline = self.now + LINGER_TIMEOUT
        slot.rstart = slot.rlen = 0
        slot.spill = b""
        # Only a failure shows: then the recv at the end of the chain never completes (see
        # on_link_broken).
        link, ud = IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS, slot.ud | UD_LINGER
        if slot.mode == KTLS:
            self.ring.prep_sendmsg(slot.fd, self.close_notify[1], MSG_NOSIGNAL, ud, link)
        elif slot.mode == USERTLS:
            slot.out = slot.pending_out + slot.tls.close_notify()
            if slot.out:
                self.ring.prep_send(slot.fd, bytes_address(slot.out), len(slot.out),
                                    MSG_NOSIGNAL, ud, link)
        self.ring.prep_shutdown(slot.fd, SHUT_WR, ud, link)
        self.post_recv(slot)

    def on_link_broken(self, slot):
        """A request carrying IOSQE_CQE_SKIP_SUCCESS at the head of a link chain failed. The
        kernel then cancels the rest of the chain without posting their completions
        (REQ_F_SKIP_LINK_CQES), so the recv at its end is over too: close."""
        slot.recv_busy = False
        if slot.closing:
            self.maybe_free(slot)
        else:
            self.start_close(slot)

    def start_close(self, slot):
        """Close now: cancel what is in flight; the slot is freed when nothing is left."""
        slot.closing = True
        slot.deadline = self.now + 1.0
        if slot.recv_busy:
            self.ring.prep_cancel64(slot.ud | UD_RECV, 0, UD_IGNORE)
        if slot.send_busy:
            self.ring.prep_cancel64(slot.send_ud, 0, UD_IGNORE)
        self.maybe_free(slot)

    def maybe_free(self, slot):
        if slot.recv_busy or slot.send_busy or slot.fd < 0:
            return
        self.ring.prep_close(slot.fd, UD_IGNORE, IOSQE_CQE_SKIP_SUCCESS)
        slot.fd = -1
        slot.gen = (slot.gen + 1) & GEN_MASK
        slot.out = slot.tls = None
        if slot.site is not self.site:
            self.release(slot.site)
        slot.site = None
        self.release_bulk(slot)
        self.free.append(slot)
        self.active -= 1
        self.closed += 1
        if self.waiting:
            fd, i = self.waiting.popleft()
            self.open_slot(fd, self.listener_tls[i])
        self.resume_accepts()

    # -- a full house ------------------------------------------------------------------------------

    def reap(self):
        """Clients wait for a slot: close connections that are getting nowhere, as nginx does
        with its idle ("reusable") ones (see reap_candidates), as many as clients wait, never one
        with bytes still going out. If a silent one was too young, look again when it is not."""
        self.reap_due = False
        need = len(self.waiting) - sum(1 for s in self.slots if s.fd >= 0 and s.closing)
        candidates, young = self.reap_candidates()
        for _, _, index in sorted(candidates):
            if need <= 0:
                return
            slot = self.slots[index]
            if unsent_bytes(slot.fd) == 0:
                self.reaped += 1
                self.start_close(slot)
                need -= 1
        if need > 0 and young and not self.reap_timer_armed:
            self.reap_timer_armed = True
            self.ring.prep_timeout(buffer_address(self.reap_timespec), 0, 0, UD_REAP)

    def reap_candidates(self):
        """([(rank, since, index)], whether a silent connection was too young). Rank 0: waiting
        for a request with nothing received (fresh, idle keep-alive, TLS handshake not begun)
        for REAP_IDLE_AGE at least, the oldest first; rank 1: a request head or TLS set-up
        incomplete for REAP_MIN_AGE and REAP_MIN_SHARE of its timeout, the oldest first."""
        o, now = self.limits, self.now
        candidates, young = [], False
        for slot in self.slots:
            if slot.fd < 0 or slot.closing or slot.lingering or not slot.recv_busy:
                continue
            if slot.mode == HANDSHAKE or slot.mode == PROXY and slot.tls is not None:
                limit = o.handshake_timeout
            elif slot.partial or slot.mode in (PLAIN, PROXY) and not slot.keep_alive:
                limit = o.header_timeout
            else:
                limit = o.idle_timeout
            since = slot.deadline - limit  # when this wait began
            # Begun, not finished: a request head, a handshake, or a TLS connection's first
            # request (a round trip behind the handshake, which the client has paid for)
            if slot.partial or slot.mode in (KTLS, USERTLS) and not slot.keep_alive:
                if since <= now - max(REAP_MIN_AGE, REAP_MIN_SHARE * limit):
                    candidates.append((1, since, slot.index))
            elif not slot.rlen and not slot.spill:
                if since <= now - REAP_IDLE_AGE:
                    candidates.append((0, since, slot.index))
                else:
                    young = True
        return candidates, young

    # -- timers ------------------------------------------------------------------------------------

    def arm_timer(self):
        self.ring.prep_timeout(buffer_address(self.timespec), 0, 0, UD_TIMER)

    def tick(self):
        """The once-a-second timer: deadlines (on_timer, which arms the next tick), then another
        try for clients waiting for a slot and for listeners an accept error paused."""
        try:
            self.on_timer()
        except Exception:
            self.internal_error(None)
            self.arm_timer()  # whatever failed, the next tick must come
        if self.waiting:
            self.reap()
        self.resume_accepts()

    def on_timer(self):
        now = time.time()
        self.site.tick(now)
        for site in self.retiring:
            site.tick(now)
        for slot in self.slots:
            if slot.fd >= 0 and slot.deadline < self.now:
                if not slot.closing:
                    self.timeouts += 1
                # For a closing slot, cancel again: a cancel finds nothing when it races an
                # operation still queued behind others in a link chain.
                self.start_close(slot)
        if self.access_log:
            self.access_log.flush()
        if self.retiring:
            self.close_idle_retired()
        self.check_archive()
        self.arm_timer()

    def check_archive(self):
        """Once a second, statx the tar through the ring (no syscall of our own): a file
        rewritten in place (`cp new.tar site.tar`) no longer matches the index."""
        if self.statx_busy or self.site.stale:
            return
        self.statx_busy = True
        self.statx_archive = self.site.archive
        # The path is "" (a bytes object's buffer always ends in a NUL): with AT_EMPTY_PATH,
        # statx describes the descriptor itself, the file we mapped, whatever the path is now.
        self.ring.prep_statx(self.statx_archive.fd, bytes_address(b""), AT_EMPTY_PATH,
                             STATX_SIZE | STATX_MTIME, buffer_address(self.statx_buf), UD_STATX)

    def arm_watchdog(self):
        self.ring.prep_timeout(buffer_address(self.notify.watchdog), 0, 0, UD_WATCHDOG)

    def on_watchdog(self):
        """Half of systemd's watchdog interval has passed: WATCHDOG=1, sent through the ring
        (the loop makes no system call of its own; MSG_DONTWAIT: a full queue is an error at
        once, not a send left waiting), then the next wait. Only a failure completes."""
        self.ring.prep_sendmsg(self.notify.fd, self.notify.ping_addr, socket.MSG_DONTWAIT,
                               UD_NOTIFY, IOSQE_CQE_SKIP_SUCCESS)
        self.arm_watchdog()

    def on_statx(self, res):
        self.statx_busy = False
        archive = self.statx_archive
        if res < 0 or archive is not self.site.archive:
            return  # checked again next second; or a reload replaced (and maybe closed) it
        size, sec, nsec = statx_size_mtime.unpack_from(self.statx_buf)
        if (size, sec * 10**9 + nsec) != archive.identity:
            self.site.mark_stale()
            self.log.warn(f"{archive.path} changed on disk while being served (now {size} "
                          f"bytes, was {archive.identity[0]}): answering 500 from now on; "
                          f"publish a new tar by renaming it over the old one, then reload it "
                          f"(SIGHUP)")

    # -- stopping ----------------------------------------------------------------------------------

    def request_stop(self):
        """SIGTERM/SIGINT. A signal handler runs between any two bytecodes of the loop,
        perhaps halfway through writing an SQE: it only sets a flag, which run() reads after
        the batch (the signal interrupts the loop's wait with EINTR, so that is at once)."""
        self.stop_requested = True

    def begin_stop(self, grace):
        """SIGTERM/SIGINT: stop accepting, close idle connections, let the rest finish."""
        self.pause_accepts()
        if self.notify:
            self.notify.send("STOPPING=1", "STATUS=stopping: finishing the responses in flight")
        self.stopping = True
        self.site.draining = True
        self.stop_deadline = time.monotonic() + grace
        while self.waiting:
            self.ring.prep_close(self.waiting.popleft()[0], UD_IGNORE, IOSQE_CQE_SKIP_SUCCESS)
        for slot in self.slots:
            if slot.fd < 0 or slot.closing or slot.lingering:
                continue
            slot.keep_alive = False  # a response under way ends the connection when done
            if slot.recv_busy and slot.mode != HANDSHAKE and slot.rlen == 0:
                # Waiting for a request (perhaps behind a linked send still under way): shut
                # the read side, so the recv ends with 0 once any response is out, and closes.
                self.ring.prep_shutdown(slot.fd, SHUT_RD, UD_IGNORE, IOSQE_CQE_SKIP_SUCCESS)

    def drained(self):
        """Stopping waits for requests and responses in flight, not for connections that are
        only closing: a lingering one has handed its last bytes to the kernel, which still
        delivers them after we exit."""
        busy = sum(1 for s in self.slots if s.fd >= 0 and not s.closing and not s.lingering)
        if busy == 0:
            return True
        if time.monotonic() > self.stop_deadline:
            self.log.warn(f"grace period over, dropping {busy} connection(s) with a request or "
                          f"response in flight")
            return True
        return False

    # -- reloading -------------------------------------------------------------------------------

    def request_reload(self):
        """SIGHUP; only a flag, as request_stop: run() calls begin_reload after the batch."""
        self.reload_requested = True

    def begin_reload(self):
        """Load the files again in a thread while the loop serves on: indexing a tar of 100,000
        members takes seconds of Python, which the loop must not stall for. The thread takes
        the GIL while the loop waits in the kernel, and otherwise for RELOAD_SWITCH at a time;
        the garbage collector waits (one full collection over the new index holds the GIL for
        tens of milliseconds). One load at a time: a SIGHUP during one asks for another after
        it."""
        if self.stopping:
            return
        if self.reload is None:
            self.log.write("SIGHUP: no reload under --secure, whose sandbox forbids opening "
                           "files (and starting the loader): restart the server to serve new files")
            return
        if self.loader is not None:
            self.reload_again = True
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.load_began = time.monotonic()
        self.loader = start_thread(self.load, "reload")
        if self.notify:  # Type=notify-reload: the reload began at this CLOCK_MONOTONIC time
            self.notify.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                             "STATUS=reloading: loading the files")
        gc.disable()
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(RELOAD_SWITCH)
        self.ring.prep_recv(self.wake_r.fileno(), buffer_address(self.wake_buf), 1, 0, UD_LOADED)

    def load(self):
        """The loader thread: self.reload(), its result or error text left in self.loaded; then
        the byte that wakes the loop (on_loaded). It touches nothing the loop uses."""
        try:
            self.loaded = self.reload()
        except StartupError as e:
            self.loaded = str(e)
        except Exception:
            self.loaded = "internal error:\n" + traceback.format_exc()
        finally:
            self.wake_w.send(b"\0")

    def on_loaded(self):
        """The loader is done: swap in what it loaded, or keep everything as it was."""
        self.loader.join()
        self.loader, loaded, self.loaded = None, self.loaded, None
        sys.setswitchinterval(self.switch_interval)
        # What the load made lives on (a load leaves no cyclic garbage): full collections need
        # not walk it again, each a stall of tens of milliseconds for 100,000 entries.
        gc.freeze()
        gc.enable()
        if isinstance(loaded, str):
            self.log.write(f"reload failed, still serving the previous version: {loaded}")
            if self.notify:
                self.notify.send("READY=1", f"STATUS=reload failed: {loaded.splitlines()[0]}")
        elif not self.stopping:
            self.swap(*loaded)
        if self.reload_again:
            self.reload_again = False
            self.begin_reload()

    def swap(self, site, tls_config):
        """New connections get the new site (and certificates, keys, ticket keys); the old
        site answers its connections until they end (retire)."""
        old = self.site
        self.site, self.tar_addr = site, site.archive.address
        if tls_config is not None:
            self.tls.config = tls_config
        self.retire(old)
        files = len(site.archive.files)
        self.log.warn(f"reloaded {site.archive.path}: {files} files, loaded in "
                      f"{time.monotonic() - self.load_began:.1f} s")
        if self.notify:
            self.notify.send("READY=1", f"STATUS=serving {files} files (reloaded)")

    def retire(self, site):
        """A replaced site serves its connections' requests in flight, saying Connection: close
        (draining), and its idle ones close (close_idle_retired, now and every second); by
        --grace the rest are closed. Its tar is unmapped when the last of them is freed."""
        site.draining = True
        users = sum(1 for slot in self.slots if slot.fd >= 0 and slot.site is site)
        if not users:
            self.drop(site)
            return
        self.retiring[site] = [users, self.now + self.limits.grace]
        self.ring.prep_timeout(buffer_address(self.grace_timespec), 0, 0, UD_GRACE)
        self.close_idle_retired()

    def close_idle_retired(self):
        """Close the connections of replaced sites that have waited for a request, with nothing
        received, for RETIRE_IDLE_AGE. Not at once after a response: the client may have sent
        its next request already (a keep-alive client such as wrk sends it at once), and a close
        under it loses that request; such a request is answered, with Connection: close."""
        candidates, _ = self.reap_candidates()
        for rank, since, index in candidates:
            slot = self.slots[index]
            if rank == 0 and since <= self.now - RETIRE_IDLE_AGE and slot.site is not self.site \
                    and unsent_bytes(slot.fd) == 0:
                self.start_close(slot)

    def on_grace_over(self):
        """A replaced site's --grace is over: close its connections still open."""
        over = [site for site, (_, deadline) in self.retiring.items() if deadline <= self.now]
        busy = [slot for slot in self.slots
                if slot.fd >= 0 and slot.site in over and not slot.closing]
        if busy:
            self.log.warn(f"reload: grace period over, closing {len(busy)} connection(s) of the "
                          f"previous version")
        for slot in busy:
            self.start_close(slot)

    def release(self, site):
        """One of a replaced site's connections was freed: the last one unmaps its tar."""
        self.retiring[site][0] -= 1
        if not self.retiring[site][0]:
            del self.retiring[site]
            self.drop(site)

    @staticmethod
    def drop(site):
        """A replaced site is unused: unmap its tar, and free its index in a thread."""
        site.archive.close()
        try:
            start_thread(site.archive.dispose, "dispose")
        except RuntimeError:
            pass  # no thread to be had: the index is freed at once, in the loop

    # -- statistics --------------------------------------------------------------------------------

    def request_stats(self):
        """SIGUSR1; only a flag, as request_stop: run() writes the line, and reopens the access
        log (logrotate's postrotate, as for nginx)."""
        self.stats_requested = True

    def stats_line(self):
        line = (f"stats active={self.active} free={len(self.free)} max={len(self.slots)} "
                f"accepted={self.accepted} requests={self.requests} closed={self.closed} "
                f"timeouts={self.timeouts} reaped={self.reaped} errors={self.errors} "
                f"enters={self.ring.enters}")
        if self.tls is not None:
            line += (f" handshakes={self.handshakes} resumed={self.resumed}"
                     f" tls_failures={self.tls_failures}")
        if self.proxy_protocol:
            line += f" proxy_refused={self.proxy_refused}"
        if self.access_log:
            line += f" log_dropped={self.access_log.dropped}"
        return line

_sockaddr = ctypes.create_string_buffer(SOCKADDR_STORAGE)
_sockaddr_len = ctypes.c_uint32()
_outq = ctypes.c_int()


def peer_name(fd):
    """Client IP for the access log and -v lines (one getpeername per connection, only when
    they are on), read into a buffer made once: no descriptor is needed, so none can be
    lacking."""
    _sockaddr_len.value = SOCKADDR_STORAGE
    if _libc.getpeername(fd, _sockaddr, ctypes.byref(_sockaddr_len)) < 0:
        return "-"
    raw = _sockaddr.raw
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])     # sockaddr_in: port, then address
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])   # port, flowinfo, then address
    return "-"


def unsent_bytes(fd):
    """Bytes the socket has not yet had acknowledged by the client; -1 if it cannot tell."""
    if _libc.ioctl(fd, SIOCOUTQ, ctypes.byref(_outq)) < 0:
        return -1
    return _outq.value


# === 8. CLI =======================================================================================

LOG_INTERVAL = 10.0  # seconds: at most one line per kind of error a client can repeat at will


def silence(stream):
    """The stream's reader is gone: point its descriptor at /dev/null, so that neither later
    lines nor Python's flush at exit fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass  # at the open-file limit, say: later lines fail the same way, and are dropped too


def emit(stream, line):
    """One line out, flushed. A vanished reader costs the line, never the server."""
    try:
        print(line, file=stream, flush=True)
    except (OSError, ValueError):
        silence(stream)


class Log:
    """Diagnostics on stderr; -q silences warnings (and start-up notes), -v adds info lines."""

    def __init__(self, level):
        self.level = level
        self.recent = {}  # kind -> [time of its last line, lines held back since]

    def write(self, msg):
        emit(sys.stderr, f"tarweb.py: {msg}")

    def warn(self, msg):
        if self.level >= 0:
            self.write(msg)

    def info(self, msg):
        if self.level >= 1:
            self.write(msg)

    def limited(self, kind, msg):
        """A warning that a client can cause again and again: one line per kind per
        LOG_INTERVAL, with the number held back before it."""
        held = self._due(kind)
        if held is not None:
            self.warn(msg + (f" ({held} more since the last such line)" if held else ""))

    def bug(self):
        """The exception being handled, with its traceback, rate-limited per place raised."""
        exc = sys.exc_info()[1]
        where = traceback.extract_tb(exc.__traceback__)[-1]
        held = self._due((type(exc), where.filename, where.lineno))
        if held is not None:
            more = f" ({held} more since the last one)" if held else ""
            self.write(f"internal error, connection dropped{more}:\n{traceback.format_exc()}")

    def _due(self, kind):
        """Lines held back since the last line of this kind, or None: hold this one back too."""
        now = time.monotonic()
        last = self.recent.get(kind)
        if last is not None and now - last[0] < LOG_INTERVAL:
            last[1] += 1
            return None
        self.recent[kind] = [now, 0]
        return last[1] if last is not None else 0


def parse_listen(text):
    """'127.0.0.1:8080', '[::1]:8080', 'localhost:8080' -> (family, host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not ADDR:PORT (e.g. 127.0.0.1:8080 or "
                                         f"[::]:8080)")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    if not host:
        return socket.AF_INET6, "::", int(port)
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError(f"'{text}': cannot resolve {host}: {e.strerror}")
    family, _, _, _, addr = info[0]
    return family, addr[0], int(port)


def make_listener(spec):
    family, host, port = spec
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"cannot listen on {where}: {e.strerror}")
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack
        # Accepted sockets inherit TCP_NODELAY from the listener: no per-connection syscall.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((host, port))
        # Clients wait here while every slot is busy: the server accepts no more than it has
        # free slots (see Server.arm_accepts).
        s.listen(4096)
    except OSError as e:
        s.close()
        hint = "; stop the other server or pick another --listen" \
            if e.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {where}: {e.strerror}{hint}")
    return s


# sd_listen_fds(3): systemd (or systemd-socket-activate) passes its sockets from descriptor 3 on.
SD_LISTEN_FDS_START = 3
TLS_FD_NAMES = ("https", "tls")  # LISTEN_FDNAMES that mean --tls-listen (see activated_listeners)
ACTIVATION_FIX = ("tarweb.py takes listening TCP sockets: ListenStream=[ADDR:]PORT in the .socket "
                  "unit, with Accept=no")


def sd_listen_fds():
    """sd_listen_fds(3) with unset_environment: [(fd, name)] of the sockets systemd passed to
    this process (LISTEN_PID is ours: relaunch_through_runpy's execv keeps the pid, the
    environment and these descriptors), made close-on-exec as sd_listen_fds makes them. The
    variables are removed in any case, so that no child takes the sockets for its own."""
    pid, count, names = (os.environ.pop(name, None)
                         for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if count is None or pid != str(os.getpid()):
        return []  # not for us: another process's, or no sockets passed
    if not count.isdigit() or int(count) == 0:
        raise StartupError(f"LISTEN_FDS={log_escape(count)} (socket activation) is not a number "
                           f"of descriptors; {ACTIVATION_FIX}")
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    names = ["unknown"] * len(fds) if names is None else names.split(":")
    if len(names) != len(fds):
        raise StartupError(f"LISTEN_FDNAMES={log_escape(':'.join(names))} names {len(names)} "
                           f"sockets but LISTEN_FDS={count}: give each socket one name")
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise StartupError(f"fd {fd} from socket activation (LISTEN_FDS={count}): "
                               f"{e.strerror}; {ACTIVATION_FIX}")
    return list(zip(fds, names))


def activated_listeners(opts):
    """[(socket, is_tls)] for the sockets systemd passed (sd_listen_fds), which replace --listen
    and --tls-listen. Their names (FileDescriptorName=) choose as those flags would: https or
    tls is a --tls-listen, http is plain, any other name (systemd's default is the unit's name)
    is a --listen: HTTPS when a certificate is given and no socket is named https or tls."""
    passed = sd_listen_fds()
    named_tls = any(name in TLS_FD_NAMES for _, name in passed)
    listeners = []
    for fd, name in passed:
        tls = name in TLS_FD_NAMES or name != "http" and opts.tls and not named_tls
        if tls and not opts.tls:
            raise StartupError(f"fd {fd} from socket activation is named {log_escape(name)}, "
                               f"for HTTPS: give --tls-cert and --tls-key (or --tls-self-signed), "
                               f"or name it http")
        listeners.append((activated_socket(fd, name), tls))
    return listeners


def activated_socket(fd, name):
    """A socket object for a passed descriptor, checked: a listening TCP socket. It gets
    TCP_NODELAY, as make_listener's sockets do, for the connections it accepts to inherit."""
    what = f"fd {fd} from socket activation ({log_escape(name)})"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise StartupError(f"{what} is not a socket ({e.strerror}); {ACTIVATION_FIX}")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise StartupError(f"{what} is not a listening stream socket; {ACTIVATION_FIX}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise StartupError(f"{what} is not a TCP socket; {ACTIVATION_FIX}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sd_notify_socket(log):
    """SdNotify for $NOTIFY_SOCKET, a path or an @abstract name (sd_notify(3)), pinging the
    watchdog when $WATCHDOG_USEC is set and $WATCHDOG_PID is ours or unset (as
    sd_watchdog_enabled(3)); None when no systemd listens. An unusable value is one warning:
    systemd then times the start out, with this line in the journal saying why."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    address = os.fsencode(value)
    if address.startswith(b"@"):
        address = b"\0" + address[1:]
    if not address.startswith((b"/", b"\0")) or len(address) > SUN_PATH_MAX:
        log.warn(f"NOTIFY_SOCKET={log_escape(value)} is not an absolute path or an @name of at "
                 f"most {SUN_PATH_MAX} bytes: systemd will not hear that the server is ready")
        return None
    usec = os.environ.get("WATCHDOG_USEC")
    if os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        usec = None  # the watchdog of another process
    if usec is not None and not usec.isdigit():
        log.warn(f"WATCHDOG_USEC={log_escape(usec)} is not a number of microseconds: no "
                 f"watchdog pings")
        usec = None
    return SdNotify(address, int(usec) if usec else 0, log)


SUN_PATH_MAX = 107  # struct sockaddr_un's sun_path holds 108 bytes, a path's NUL included


def listener_url(sock, tls):
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def tls_groups(text):
    """--tls-groups: comma-separated TLS_GROUP_NAMES -> their codes, in that order."""
    names = [name.strip().lower() for name in text.split(",")]
    unknown = [name for name in names if name not in TLS_GROUP_NAMES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"'{text}': give some of {', '.join(TLS_GROUP_NAMES)}, "
                                         f"each once, comma-separated")
    return tuple(TLS_GROUP_NAMES[name] for name in names)


def ticket_count(text):
    if not text.isdigit() or int(text) > 8:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of tickets from 0 to 8")
    return int(text)


def ticket_lifetime(text):
    if not text.isdigit() or not 0 < int(text) <= TLS_TICKET_LIFETIME_MAX:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds from 1 to "
                                         f"{TLS_TICKET_LIFETIME_MAX} (RFC 8446's 7 days)")
    return int(text)


def positive(kind):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
        return value
    return check


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="tarweb.py", description="Serve a static website out of a tar file, over io_uring.")
    p.add_argument("tar", help="the tar file to serve (uncompressed; ustar, GNU or PAX)")
    p.add_argument("-l", "--listen", action="append", type=parse_listen, metavar="ADDR:PORT",
                   help="address to listen on, repeatable (default [::]:8080, dual-stack); "
                   "HTTPS when a certificate is given and there is no --tls-listen")
    p.add_argument("--tls-listen", action="append", type=parse_listen, metavar="ADDR:PORT",
                   help="address for HTTPS, repeatable; --listen addresses then stay plain HTTP")
    p.add_argument("-C", "--tls-cert", "--cert", action="append", metavar="FILE",
                   help="PEM certificate chain, leaf first (turns TLS on); repeatable with "
                   "--tls-key, in pairs: a client gets the certificate whose subjectAltName "
                   "names its server_name, else the first")
    p.add_argument("-P", "--tls-key", "--key", action="append", metavar="FILE",
                   help="PEM private key of the --tls-cert in the same position")
    p.add_argument("--tls-self-signed", action="store_true",
                   help="TLS with a certificate made at start for localhost (for trying out)")
    p.add_argument("--ktls", choices=("auto", "require", "off"), default="auto",
                   help="kernel TLS for record encryption: auto (fall back to Python if the "
                   "kernel lacks it), require, or off (default auto)")
    p.add_argument("--crypto", choices=("auto", "libcrypto", "python"), default="auto",
                   help="TLS crypto: the host's OpenSSL libcrypto (through ctypes), or pure "
                   "Python (no dependency, slow, not constant-time); auto: libcrypto if it "
                   "loads, else Python with a warning (default auto)")
    p.add_argument("--tls-groups", type=tls_groups, default=_TLS_GROUP_PREFERENCE,
                   metavar="LIST", help="key exchange groups in order of preference, from "
                   f"{', '.join(TLS_GROUP_NAMES)} (default: all four, in that order)")
    p.add_argument("--tls-tickets", type=ticket_count, default=2, metavar="N",
                   help="session tickets sent with a full handshake, for clients to resume "
                   "with (a resumed one gets one; 0 turns resumption off; default 2)")
    p.add_argument("--tls-ticket-key", metavar="FILE",
                   help="ticket keys, one per line, 64 hex digits ('openssl rand -hex 32'): the "
                   "first seals, all open; share the file so that servers resume each other's "
                   "sessions (default: a random key, replaced every 12 h)")
    p.add_argument("--tls-ticket-lifetime", type=ticket_lifetime, default=TLS_TICKET_LIFETIME,
                   metavar="S", help="how long a ticket can be resumed, at most 604800 (7 days; "
                   f"default {TLS_TICKET_LIFETIME})")
    p.add_argument("--handshake-timeout", type=positive(float), default=10.0, metavar="S",
                   help="time allowed for a TLS handshake (default 10)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="every connection, on every listener (systemd's too), starts with a "
                   "PROXY protocol header (v1 or v2) from a load balancer, whose client address "
                   "the logs show; a connection without one is closed unanswered")
    p.add_argument("--prefix", default="", help="serve only members under this prefix, "
                   "with the prefix stripped (e.g. site/)")
    p.add_argument("--fallback", metavar="PATH", help="for single-page apps: the file (e.g. "
                   "/index.html) that answers a request for a missing page, one whose last path "
                   "segment has no extension, from a client that accepts text/html")
    p.add_argument("--max-connections", type=positive(int), default=1024, metavar="N",
                   help="connection slots allocated at start (default 1024)")
    p.add_argument("--idle-timeout", type=positive(float), default=10.0, metavar="S",
                   help="close a keep-alive connection idle this long (default 10)")
    p.add_argument("--header-timeout", type=positive(float), default=10.0, metavar="S",
                   help="time allowed to send a complete request head (default 10)")
    p.add_argument("--max-header-bytes", type=positive(int), default=8192, metavar="N",
                   help="largest request head accepted; larger gets 431 (default 8192)")
    p.add_argument("--cache-control", metavar="VALUE",
                   help="Cache-Control header for files (default: none)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a header line for every response, repeatable; 'NAME:' removes a "
                   "default one (Server, X-Content-Type-Options: nosniff), a NAME given again "
                   "replaces it")
    p.add_argument("--grace", type=positive(float), default=5.0, metavar="S",
                   help="on SIGTERM/SIGINT, time to finish responses in flight; after a reload "
                   "(SIGHUP), for the old version's connections (default 5)")
    p.add_argument("--access-log", metavar="FILE|-", help="Common Log Format access log")
    p.add_argument("--user", metavar="NAME[:GROUP]", help="once the ports are bound and the "
                   "keys, the tar and the logs open, serve as this user (its group, or GROUP; "
                   "its supplementary groups); needed as root on a port below 1024")
    p.add_argument("--secure", action="store_true", help="once started, sandbox the server: "
                   "no_new_privs, no capabilities, landlock (no file access, no TCP bind or "
                   "connect), a seccomp allow-list of system calls, an io_uring limited to the "
                   "operations it uses")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="count", default=0)
    p.add_argument("--version", action="version", version=f"tarweb.py {__version__}")
    opts = p.parse_args(argv)
    if len(opts.tls_cert or ()) != len(opts.tls_key or ()):
        p.error("--tls-cert and --tls-key go together, in pairs: give as many of each")
    if opts.tls_self_signed and opts.tls_cert:
        p.error("--tls-self-signed replaces --tls-cert/--tls-key: give one or the other")
    if opts.cache_control is not None and not HEADER_VALUE.fullmatch(opts.cache_control):
        p.error("--cache-control: give visible ASCII characters and spaces only (it becomes a "
                "header line)")
    try:
        opts.headers = response_headers(opts.header)
    except ValueError as e:
        p.error(f"--header {e}")
    opts.tls = bool(opts.tls_cert or opts.tls_self_signed)
    if opts.tls_listen and not opts.tls:
        p.error("--tls-listen needs --tls-cert and --tls-key (or --tls-self-signed)")
    if not opts.listen and not opts.tls_listen:
        port = 8443 if opts.tls else 8080
        opts.listen = [(socket.AF_INET6, "::", port)] if socket.has_ipv6 else \
            [(socket.AF_INET, "0.0.0.0", port)]
    return opts


def listener_specs(opts):
    """(spec, is_tls) for every listener: with --tls-listen, --listen stays plain HTTP;
    without it a certificate makes --listen HTTPS, as in the Rust tarweb."""
    if opts.tls_listen:
        return [(spec, False) for spec in opts.listen or ()] + \
            [(spec, True) for spec in opts.tls_listen]
    return [(spec, opts.tls) for spec in opts.listen]


def load_tls_identities(opts):
    """[(PrivateKey, [DER certificates])], a pair per --tls-cert/--tls-key, or a fresh
    self-signed pair."""
    if opts.tls_self_signed:
        key, cert = make_self_signed()
        return [(key, [cert])]
    return [load_tls_identity(cert, key) for cert, key in zip(opts.tls_cert, opts.tls_key)]


def load_tls_identity(cert_path, key_path):
    """(PrivateKey, [DER certificates]) from the files; a StartupError naming the one at fault."""
    try:
        with open(key_path, "rb") as f:
            key_pem = f.read()
        with open(cert_path, "rb") as f:
            chain_pem = f.read()
    except OSError as e:
        raise StartupError(f"{e.filename}: cannot read: {e.strerror}")
    try:
        key = load_private_key(key_pem)
    except ValueError as e:
        raise StartupError(f"{key_path}: {e}")
    try:
        chain = load_cert_chain(chain_pem)
        certificate_dns_names(chain[0])   # what the SNI choice reads must be readable
    except ValueError as e:
        raise StartupError(f"{cert_path}: {e}")
    try:
        check_key_matches_cert(key, chain[0])
    except ValueError as e:
        raise StartupError(f"{cert_path} and {key_path}: {e}")
    return key, chain


def load_ticket_keys(opts, crypto, log):
    """TicketKeys for the options, or None when --tls-tickets 0 turns resumption off."""
    if not opts.tls_tickets:
        return None
    ticket_secrets = None
    if opts.tls_ticket_key:
        path = opts.tls_ticket_key
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read().decode("ascii")
            ticket_secrets = parse_ticket_keys(text)
        except OSError as e:
            raise StartupError(f"{path}: cannot read the ticket keys: {e.strerror}")
        except (UnicodeDecodeError, ValueError) as e:
            reason = "not ASCII text" if isinstance(e, UnicodeDecodeError) else e
            raise StartupError(f"{path}: {reason}")
        if mode & 0o077:
            log.warn(f"{path}: ticket keys readable by group or others, who could pose as this "
                     f"server to clients that resume; fix: chmod 600 {path}")
    return TicketKeys(crypto, ticket_secrets, lifetime=opts.tls_ticket_lifetime,
                      count=opts.tls_tickets)


def fallback_entry(opts, archive):
    """The Entry of --fallback, a file in the tar (under --prefix), or None without it."""
    if opts.fallback is None:
        return None
    name = _member_name(opts.fallback, [])
    entry = archive.files.get(name) if name is not None else None
    if entry is None:
        where = f" under --prefix {opts.prefix}" if opts.prefix else ""
        raise StartupError(f"--fallback {log_escape(opts.fallback)}: no such file in "
                           f"{opts.tar}{where}; "
                           f"give the path of a file in it, such as /index.html")
    return entry


def load_site(opts, log):
    """The Site of opts.tar (indexed and mapped) with its --fallback: at start, and at reload."""
    archive = Archive(opts.tar, opts.prefix, log)
    try:
        return Site(archive, opts.cache_control, opts.headers, fallback_entry(opts, archive))
    except BaseException:
        archive.close()  # a reload that fails must not leak the mapping
        raise


def reloader(opts, tls, log):
    """What SIGHUP loads (Server.begin_reload, in a thread): () -> (Site, TLSConfig or None),
    the files named at start read again; a StartupError names the first problem, as at start.
    Certificates and keys first (quick to fail), the tar last. Random ticket keys (no
    --tls-ticket-key) stay, so that clients still resume; a self-signed certificate stays."""
    def load():
        config = None
        if tls is not None:
            identities = tls.identities if opts.tls_self_signed else load_tls_identities(opts)
            tickets = tls.config.tickets
            if opts.tls_ticket_key:
                tickets = load_ticket_keys(opts, tls.crypto, log)
            config = tls.make_config(identities, tickets)
        return load_site(opts, log), config
    return load


def choose_crypto(mode, log):
    """The TLS crypto backend for --crypto (serve names it once start-up has succeeded)."""
    crypto = PYTHON_CRYPTO
    if mode != "python":
        try:
            crypto = LibcryptoCrypto(libcrypto_load())
        except LibcryptoUnavailable as e:
            if mode == "libcrypto":
                raise StartupError(f"--crypto libcrypto: {e}; install OpenSSL's libcrypto "
                                   f"(Debian: libssl3) or choose --crypto python")
            log.warn(f"libcrypto unavailable ({e}): TLS crypto runs in pure Python, slower "
                     f"and not constant-time; fix: install OpenSSL's libcrypto (Debian: "
                     f"libssl3), or say --crypto python")
    return crypto


def open_access_log(name, log):
    if name is None:
        return None
    if name == "-":
        return AccessLog(sys.stdout.fileno(), "on standard output", log)
    try:
        fd = os.open(name, ACCESS_LOG_FLAGS, 0o644)
    except OSError as e:
        raise StartupError(f"cannot open access log {name}: {e.strerror}")
    return AccessLog(fd, name, log, name)


FD_RESERVE = 32  # descriptors besides the slots': stdio, the ring, the tar, log files, spare


def raise_fd_limit(n, listeners, log):
    """Each slot is a socket: make sure the process may hold that many descriptors. Returns the
    number of slots to allocate: fewer than n if the hard limit is lower, so that running out
    of descriptors (EMFILE) is not the normal state of a busy server."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + listeners + FD_RESERVE
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < need:
            slots = max(1, new - listeners - FD_RESERVE)
            log.warn(f"open-file limit {hard} is too low for --max-connections {n}: using "
                     f"{slots} slots; raise it with 'ulimit -n {need}'")
            return slots
    return n


def resolve_user(spec):
    """--user NAME[:GROUP] -> (name, uid, gid), the group GROUP's or else the user's own."""
    name, _, group = spec.partition(":")
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"--user {log_escape(spec)}: no user named '{log_escape(name)}'; "
                           f"name one from /etc/passwd (such as www-data), or create it")
    gid = user.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"--user {log_escape(spec)}: no group named "
                               f"'{log_escape(group)}'; name one from /etc/group")
    return user.pw_name, user.pw_uid, gid


def refuse_root(opts, ports):
    """Root serving the world is one bug away from owning the machine: on a port below 1024
    (which only root binds, so root is likely) say --user, or --user root to mean it."""
    low = sorted(port for port in ports if 0 < port < 1024)  # 0: the kernel picks one above
    if low and os.geteuid() == 0 and opts.user is None:
        raise StartupError(f"running as root on port {low[0]}: add --user NAME (such as "
                           f"www-data) to serve as that user once the port is bound, or "
                           f"--user root to serve as root")


def drop_privileges(spec, name, uid, gid):
    """Become the --user: supplementary groups (the user's, from the group database, as login
    and systemd's User= set them), then the group, then the user - in that order, as only root
    may change groups. /proc/self/status then shows whether all four ids (real, effective,
    saved, filesystem) changed; a server that still holds root must not serve."""
    if (os.getresuid(), os.getresgid()) != ((uid,) * 3, (gid,) * 3):
        try:
            os.initgroups(name, gid)
            os.setgid(gid)
            os.setuid(uid)
        except OSError as e:
            raise StartupError(f"--user {log_escape(spec)}: cannot become uid {uid}, gid {gid}: "
                               f"{e.strerror}; start as root (or as that user)")
    with open("/proc/self/status") as f:
        ids = dict(line.split(":", 1) for line in f if line.startswith(("Uid:", "Gid:")))
    if ids["Uid"].split() != [str(uid)] * 4 or ids["Gid"].split() != [str(gid)] * 4:
        raise StartupError(f"--user {log_escape(spec)}: still Uid {ids['Uid'].split()} Gid "
                           f"{ids['Gid'].split()} after setuid({uid}) and setgid({gid})")


# The seccomp allow-list: the system calls the server still makes once it serves, found with
# strace -f over the test suite and the benchmarks (HTTP, HTTPS with both crypto backends, kTLS in
# the VM, Python 3.9-3.13). Name: (x86_64 number, aarch64 number), # why. Any other: EPERM.
SECCOMP_ALLOW = {
    "io_uring_enter": (426, 426),   # the loop: submit SQEs, wait for completions
    "write": (1, 64),               # stderr lines, the start line, the access log
    "preadv2": (327, 286),          # userspace TLS: a response body from the tar (os.preadv)
    "preadv": (295, 69),            # the same, from a CPython built without preadv2
    "setsockopt": (54, 208),        # kTLS keys and rekeys (TCP_ULP, TLS_TX/RX); TCP_QUICKACK
    "getpeername": (52, 205),       # the client's address, for the access log
    "ioctl": (16, 29),              # SIOCOUTQ only (checked): bytes unsent when closing
    "sendto": (44, 206),            # sd_notify: READY=1, STOPPING=1
    "getrandom": (318, 278),        # os.urandom, secrets, OpenSSL: TLS randoms, keys, tickets
    "getpid": (39, 172),            # OpenSSL: its fork check before it draws random bytes
    "clock_gettime": (228, 113),    # time.monotonic, time.time: where the vDSO cannot answer
    "mmap": (9, 222),               # memory: Python's arenas, glibc malloc's large blocks
    "munmap": (11, 215),            # ... given back
    "brk": (12, 214),               # glibc malloc's heap, grown again after start-up's trim
    "rt_sigreturn": (15, 139),      # the return from a signal (SIGTERM, SIGUSR1, ...)
    "rt_sigaction": (13, 134),      # at exit: CPython puts the default handlers back
    "close": (3, 57),               # at exit: the listeners, the tar, the ring
    "getsockname": (51, 204),       # at exit: a socket's repr, in CPython's unclosed warning
    "futex": (202, 98),             # at exit: glibc wakes a lock's waiters (one thread: none)
    "exit_group": (231, 94),        # the end
}


def sandbox(server):
    """--secure, in a worker that holds every descriptor it will use (a future worker process
    calls it once it is set up): no_new_privs, no capabilities, landlock, seccomp, then a
    self-test. Returns the start-up line's note: what was applied, what the kernel lacks."""
    # What follows needs no_new_privs, and no execve can undo it.
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
        raise StartupError("--secure: PR_SET_NO_NEW_PRIVS failed: "
                           + os.strerror(ctypes.get_errno()) + "; use Linux 5.19 or newer")
    drop_capabilities()
    notify = server.notify
    landlock, lacking = landlock_restrict(notify is None or not notify.address.startswith(b"\0"))
    seccomp_restrict()
    sandbox_self_test("seccomp", errno.EPERM)
    applied = ["no_new_privs", "capabilities cleared", landlock,
               f"seccomp {len(SECCOMP_ALLOW)} syscalls (others EPERM)",
               f"io_uring restricted to {server.ring.allowed_ops} opcodes"]
    return ", ".join(part for part in applied if part) + \
        (f"; this kernel lacks {' and '.join(lacking)}" if lacking else "")


def drop_capabilities():
    """Empty every capability set. The bounding set first, while CAP_SETPCAP may still be held
    (by root only: for another user it stays, and matters only to an execve, which seccomp
    forbids); then effective, permitted and inheritable, which empties the ambient set too."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            break   # EINVAL past the kernel's last capability, EPERM without CAP_SETPCAP
    header = cap_user_header.pack(_LINUX_CAPABILITY_VERSION_3, 0)
    if _libc.capset(header, bytes(CAP_USER_DATA_SIZE)) < 0:
        raise StartupError("--secure: cannot clear the capabilities: "
                           + os.strerror(ctypes.get_errno()))


def landlock_restrict(abstract_scope):
    """Landlock (Linux 5.13+) with every right of the kernel's ABI version handled and no rule
    to allow any: no file may be opened, made, removed or renamed from now on - by a system
    call or by the ring; from ABI 4 (Linux 6.7) no TCP bind or connect; from ABI 6 (6.12) no
    signal and (unless abstract_scope is false: $NOTIFY_SOCKET is an @name) no abstract unix
    socket outside this process. Returns (what was applied, [what this kernel lacks])."""
    abi = _libc.syscall(SYS_landlock_create_ruleset, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 0:   # EPERM: a seccomp profile (a container's) forbids it
        err = ctypes.get_errno()
        why = {errno.ENOSYS: "not built in", errno.EOPNOTSUPP: "not enabled: lsm=...,landlock"}
        return None, [f"landlock ({why.get(err) or os.strerror(err)})"]
    fs = (1 << LANDLOCK_ACCESS_FS_COUNT.get(abi, 16)) - 1
    net = LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP if abi >= 4 else 0
    scoped = LANDLOCK_SCOPE_SIGNAL | (LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET if abstract_scope
                                      else 0) if abi >= 6 else 0
    attr = landlock_ruleset_attr.pack(fs, net, scoped)
    ruleset = _libc.syscall(SYS_landlock_create_ruleset, attr, len(attr), 0)
    if ruleset < 0 or _libc.syscall(SYS_landlock_restrict_self, ruleset, 0) < 0:
        raise StartupError("--secure: landlock refused the ruleset: "
                           + os.strerror(ctypes.get_errno()))
    os.close(ruleset)
    sandbox_self_test("landlock", errno.EACCES, tcp=bool(net))
    lacking = [what for what, version in (("landlock's TCP rules (ABI 4, Linux 6.7)", 4),
                                          ("landlock's scopes (ABI 6, Linux 6.12)", 6))
               if abi < version]
    kinds = ["fs"] + ["tcp"] * bool(net) + ["scopes"] * bool(scoped)
    return f"landlock ABI {abi} ({', '.join(kinds)})", lacking


def seccomp_restrict():
    """Load seccomp_program for this machine (seccomp(2), Linux 3.17+; the log flag 4.14+)."""
    machine = os.uname().machine
    if machine not in AUDIT_ARCH:
        raise StartupError(f"--secure: no system call table for {machine}; it knows x86_64 and "
                           f"aarch64: run without --secure")
    program = ctypes.create_string_buffer(seccomp_program(machine))
    fprog = sock_fprog.pack(len(program) // sock_filter.size, ctypes.addressof(program))
    if _libc.syscall(SYS_seccomp[machine], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG,
                     fprog) < 0:
        raise StartupError("--secure: the kernel refused the seccomp filter: "
                           + os.strerror(ctypes.get_errno())
                           + "; it needs a kernel built with CONFIG_SECCOMP_FILTER")


def seccomp_program(machine):
    """The classic BPF program of SECCOMP_ALLOW for machine (x86_64, aarch64): a system call of
    another architecture, or x86_64's x32 numbering, kills the process (nothing here makes
    one); one in the table goes through (ioctl only for SIOCOUTQ); any other fails with EPERM,
    logged by the kernel (see README "Sandbox" for why not kill)."""
    column = 0 if machine == "x86_64" else 1
    ioctl = SECCOMP_ALLOW["ioctl"][column]
    # In the table's order: io_uring_enter, the call of the loop, is the first compared.
    numbers = [nrs[column] for nrs in SECCOMP_ALLOW.values() if nrs[column] != ioctl]
    n = len(numbers)
    assert n + 3 <= 255, "a jump offset is a u8"
    kill = [_bpf(BPF_RET_K, SECCOMP_RET_KILL_PROCESS)]
    program = [_bpf(BPF_LD_W_ABS, SECCOMP_DATA_ARCH), _bpf(BPF_JEQ_K, AUDIT_ARCH[machine], 1)]
    program += kill + [_bpf(BPF_LD_W_ABS, SECCOMP_DATA_NR)]
    if machine == "x86_64":
        program += [_bpf(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1)] + kill
    # Instruction i of these n jumps to the allow at n + 4 when the number is numbers[i].
    program += [_bpf(BPF_JEQ_K, nr, n + 3 - i) for i, nr in enumerate(numbers)]
    program += [_bpf(BPF_JEQ_K, ioctl, 0, 2),                      # n: ioctl? else deny
                _bpf(BPF_LD_W_ABS, SECCOMP_DATA_ARGS + 8),         # its command (low 32 bits)
                _bpf(BPF_JEQ_K, SIOCOUTQ, 1),                      # SIOCOUTQ: allow
                _bpf(BPF_RET_K, SECCOMP_RET_ERRNO | errno.EPERM),  # n + 3
                _bpf(BPF_RET_K, SECCOMP_RET_ALLOW)]                # n + 4
    return b"".join(program)


def _bpf(code, k, jt=0, jf=0):
    """One struct sock_filter: BPF_STMT(code, k) or BPF_JUMP(code, k, jt, jf)."""
    return sock_filter.pack(code, jt, jf, k)


def sandbox_self_test(layer, err, tcp=True):
    """What the layer forbids must now fail with err: opening /, and (tcp) a TCP connection."""
    attempts = [("opening /", _open_root)] + [("a TCP connection", _connect_tcp)] * tcp
    for what, attempt in attempts:
        try:
            attempt()
        except OSError as e:
            if e.errno == err:
                continue
            raise StartupError(f"--secure: {layer} in place, {what} failed with "
                               f"{errno.errorcode.get(e.errno, e.errno)}, not "
                               f"{errno.errorcode[err]}: the sandbox is not what it should be")
        raise StartupError(f"--secure: {layer} in place, {what} still succeeds: the sandbox "
                           f"does not hold on this kernel")


def _open_root():
    os.close(os.open("/", os.O_RDONLY))


def _connect_tcp():
    """A connection to 127.0.0.1's port 1: refused by the sandbox, or else by the kernel (which
    is not the errno the self-test wants)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("127.0.0.1", 1))


def release_startup_memory():
    """Compiling this file and indexing the tar leave megabytes of freed heap behind; hand them
    back to the kernel so that the resident size reflects the server, not its start-up."""
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def serve(opts, log):
    """Start-up in the order that fails fastest, then run until SIGTERM or SIGINT."""
    activated = activated_listeners(opts)  # first: the variables go at once
    notify = sd_notify_socket(log)
    user = resolve_user(opts.user) if opts.user is not None else None
    specs = [] if activated else listener_specs(opts)
    refuse_root(opts, [sock.getsockname()[1] for sock, _ in activated] or
                [spec[2] for spec, _ in specs])
    identities = load_tls_identities(opts) if opts.tls else None  # keys first, never logged
    crypto = choose_crypto(opts.crypto, log) if identities else None
    tickets = load_ticket_keys(opts, crypto, log) if identities else None
    access_log = open_access_log(opts.access_log, log)
    site = load_site(opts, log)
    archive = site.archive
    tls = TLSContext(identities, opts.tls_groups, opts.ktls, crypto, log, tickets) \
        if identities else None
    limits = Limits(max_connections=raise_fd_limit(opts.max_connections,
                                                   len(activated or specs), log),
                    header_timeout=opts.header_timeout, idle_timeout=opts.idle_timeout,
                    handshake_timeout=opts.handshake_timeout,
                    max_header_bytes=opts.max_header_bytes, grace=opts.grace)
    listeners = activated or [(make_listener(spec), is_tls) for spec, is_tls in specs]
    server = Server(site, listeners, limits, log, tls, access_log, notify, opts.proxy_protocol,
                    None if opts.secure else reloader(opts, tls, log), opts.secure)
    if user:
        drop_privileges(opts.user, *user)
    # Handlers only set a flag (see Server.request_stop): the loop must not be re-entered
    # halfway through writing an SQE, and a write to a stderr that is gone must not raise inside
    # it. They are in place before the URL line, which tells the world the server is up.
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    signal.signal(signal.SIGINT, lambda *_: server.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    signal.signal(signal.SIGUSR1, lambda *_: server.request_stats())
    release_startup_memory()
    # Last: every file, socket and ring the server will use is open by now.
    sandboxed = sandbox(server) if opts.secure else None
    if sandboxed and access_log:
        access_log.path = None  # it cannot be opened again: SIGUSR1 keeps writing to this file
    if tls:   # after every start-up error, so that a failed start prints only its error
        log.warn(f"crypto: {tls.config.crypto.description}")  # a note, not a problem
    if sandboxed:
        log.warn(f"sandbox: {sandboxed}")
    urls = " ".join(listener_url(sock, is_tls) for sock, is_tls in listeners)
    emit(sys.stdout, f"tarweb.py {__version__}: serving {opts.tar} on {urls}")
    if notify:
        notify.send("READY=1", f"STATUS=serving {len(archive.files)} files on {urls}")
    log.info(f"{len(archive.files)} files, {limits.max_connections} slots, io_uring: "
             f"{server.ring.setup_description()}")
    server.run()
    if access_log:
        access_log.flush()  # AccessLog.flush counts a failure; it never raises


def main(argv=None):
    opts = parse_args(argv)
    log = Log(opts.verbose - opts.quiet)
    try:
        serve(opts, log)
    except StartupError as e:
        emit(sys.stderr, f"tarweb.py: error: {e}")
        return 1
    return 0


# Run by relaunch_through_runpy: sys.path[0] becomes the script's directory before anything is
# imported (as for a script; never the current directory, which -c would put there), then runpy
# runs the file as __main__.
_RELAUNCH = ("import sys, os; sys.argv.pop(0); "
             "sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0])); "
             "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")


def relaunch_through_runpy():
    """Run this file again in this process, through runpy rather than as a script.

    CPython keeps a script's syntax tree (~13 MiB for this file) until the script ends, and
    the server runs inside it; runpy compiles the file with compile(), which frees the tree at
    once, halving the server's resident memory.  execv keeps the process id, the descriptors
    (systemd's sockets) and the environment; the interpreter's options are passed on.  If it
    cannot exec, the server runs here."""
    import subprocess   # only for its list of the interpreter's options
    if not sys.executable or not os.path.isfile(sys.argv[0]):
        return
    flags = subprocess._args_from_interpreter_flags()
    try:
        os.execv(sys.executable, [sys.executable, *flags, "-c", _RELAUNCH, *sys.argv])
    except OSError:
        pass


if __name__ == "__main__":
    # Only the interpreter's own file runner keeps the tree: its module frame has no caller,
    # while runpy (the relaunch, python3 -m) and exec have one.
    if sys._getframe().f_back is None:
        relaunch_through_runpy()
    sys.exit(main())
