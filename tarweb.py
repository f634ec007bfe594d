#!/usr/bin/env python3
"""tarweb.py: serve a static website straight out of a tar file, over io_uring.

    python3 tarweb.py site.tar            # http://[::]:8080/

One file, Python standard library only. All socket I/O goes through io_uring (driven with ctypes);
response bodies are sent straight from an mmap of the tar; every connection lives in a slot that
was allocated at start-up.

Contents, in layers (a lower layer never calls a higher one):
  1. Kernel ABI ......... syscall numbers, io_uring structs, opcodes and flags
  2. The ring ........... IoUring: setup with the best flags, mmap'd rings, probe, SQEs, CQEs
  3. The archive ........ Archive: tarfile index of the mmap'd tar
  4. HTTP/1.1 ........... Site: request parsing, conditional and range logic, response heads
  7. Connection loop .... Server: fixed slots driven by io_uring completions
  8. CLI ................ argparse, one-line start-up errors, main()
(Layers 5 and 6, the TLS crypto and handshake, come with HTTPS support.)
"""

import argparse
import ctypes
import email.utils
import errno
import mimetypes
import mmap
import os
import re
import signal
import socket
import struct
import sys
import tarfile
import time
from urllib.parse import unquote_to_bytes

__version__ = "0.1.0"
SERVER = "tarweb.py/" + __version__


class StartupError(Exception):
    """A problem that stops start-up; its text is printed as one line."""


# ---------------------------------------------------------------------------------------------
# 1. Kernel ABI (include/uapi/linux/io_uring.h)
# ---------------------------------------------------------------------------------------------

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
assert io_uring_sqe.size == 64 and io_uring_cqe.size == 16

# mmap offsets of the three ring regions
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# io_uring_setup flags
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
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
IO_URING_OP_SUPPORTED = 1

# opcodes this server uses
IORING_OP_SENDMSG = 9
IORING_OP_TIMEOUT = 11
IORING_OP_ACCEPT = 13
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_CLOSE = 19
IORING_OP_RECV = 27
IORING_OP_SHUTDOWN = 34
REQUIRED_OPS = {"SENDMSG": IORING_OP_SENDMSG, "TIMEOUT": IORING_OP_TIMEOUT,
                "ACCEPT": IORING_OP_ACCEPT, "ASYNC_CANCEL": IORING_OP_ASYNC_CANCEL,
                "CLOSE": IORING_OP_CLOSE, "RECV": IORING_OP_RECV, "SHUTDOWN": IORING_OP_SHUTDOWN}

# sqe.flags
IOSQE_IO_LINK = 1 << 2
IOSQE_CQE_SKIP_SUCCESS = 1 << 6

# sqe.ioprio for IORING_OP_ACCEPT (5.19+), and cqe.flags
IORING_ACCEPT_MULTISHOT = 1 << 0
IORING_CQE_F_MORE = 1 << 1

# socket constants the kernel ABI fixes on Linux
MSG_WAITALL = 0x100
MSG_NOSIGNAL = 0x4000
SOCK_CLOEXEC = 0o2000000
SHUT_WR, SHUT_RDWR = 1, 2

# struct __kernel_timespec {s64 tv_sec; s64 tv_nsec}; struct iovec {void *base; size_t len};
# struct msghdr {name, namelen(+pad), iov, iovlen, control, controllen, flags(+pad)} = 56 bytes.
kernel_timespec = struct.Struct("<qq")
iovec2 = struct.Struct("<QQQQ")
msghdr = struct.Struct("<QQQQQQQ")

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


def sys_io_uring_enter(fd, to_submit, min_complete, flags):
    return _libc.syscall(SYS_io_uring_enter, fd, to_submit, min_complete, flags, None, 0)


def buffer_address(buf):
    """Address of a writable buffer (bytearray, mmap) for the kernel to read or write."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


# ---------------------------------------------------------------------------------------------
# 2. The ring
# ---------------------------------------------------------------------------------------------

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


class IoUring:
    """One io_uring instance: SQEs are queued with prep(), submitted and reaped with enter()."""

    def __init__(self, entries):
        self.fd, p = self._setup(entries)
        self.flags, self.features = p.flags, p.features
        if not self.features & IORING_FEAT_NODROP:
            raise StartupError("io_uring without IORING_FEAT_NODROP: use Linux 5.19 or newer")
        self._map_rings(p)
        self.skip_success = IOSQE_CQE_SKIP_SUCCESS if self.features & IORING_FEAT_CQE_SKIP else 0
        self.enters = 0

    @staticmethod
    def _setup(entries):
        for flags in SETUP_FLAG_STEPS:
            p = io_uring_params()
            p.flags = flags | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP
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
        sq_size = sq.array + p.sq_entries * 4
        cq_size = cq.cqes + p.cq_entries * io_uring_cqe.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if self.features & IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        self.sq_ring = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
        if self.features & IORING_FEAT_SINGLE_MMAP:
            self.cq_ring = self.sq_ring
        else:
            self.cq_ring = mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot,
                                     offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(self.fd, p.sq_entries * io_uring_sqe.size, mmap.MAP_SHARED, prot,
                              offset=IORING_OFF_SQES)
        self.sq_entries, self.cq_entries = p.sq_entries, p.cq_entries
        self.sq_mask = struct.unpack_from("<I", self.sq_ring, sq.ring_mask)[0]
        self.cq_mask = struct.unpack_from("<I", self.cq_ring, cq.ring_mask)[0]
        self.sq_tail_off, self.cq_head_off = sq.tail, cq.head
        self.sq_head_off, self.cq_tail_off = sq.head, cq.tail
        self.cqes_off = cq.cqes
        # SQE i always sits in array slot i: the indirection array is written once, here.
        for i in range(p.sq_entries):
            struct.pack_into("<I", self.sq_ring, sq.array + 4 * i, i)
        self.sq_tail = struct.unpack_from("<I", self.sq_ring, sq.tail)[0]
        self.to_submit = 0
        self.cq_view = memoryview(self.cq_ring)

    def supported_ops(self):
        """Opcodes this kernel supports (IORING_REGISTER_PROBE, Linux 5.6+)."""
        nops = 256
        probe = bytearray(16 + 8 * nops)
        addr = buffer_address(probe)
        if _libc.syscall(SYS_io_uring_register, self.fd, IORING_REGISTER_PROBE, ctypes.c_void_p(addr),
                         nops) < 0:
            raise StartupError("IORING_REGISTER_PROBE failed: " + os.strerror(ctypes.get_errno())
                               + "; use Linux 5.19 or newer")
        last_op = probe[0]
        return {op for op in range(min(last_op + 1, nops))
                if struct.unpack_from("<BBH", probe, 16 + 8 * op)[2] & IO_URING_OP_SUPPORTED}

    def prep(self, opcode, fd, addr, length, off, op_flags, user_data, sqe_flags=0, ioprio=0):
        """Write one SQE at the local tail; it reaches the kernel with the next enter()."""
        if self.to_submit == self.sq_entries:
            self.enter(0)
        io_uring_sqe.pack_into(self.sqes, (self.sq_tail & self.sq_mask) * 64, opcode, sqe_flags,
                               ioprio, fd, off, addr, length, op_flags, user_data, 0, 0, 0, 0, 0)
        self.sq_tail = (self.sq_tail + 1) & 0xFFFFFFFF
        self.to_submit += 1

    def enter(self, wait):
        """Publish queued SQEs and, when wait is true, block until at least one CQE is ready."""
        struct.pack_into("<I", self.sq_ring, self.sq_tail_off, self.sq_tail)
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
        head = struct.unpack_from("<I", self.cq_ring, self.cq_head_off)[0]
        tail = struct.unpack_from("<I", self.cq_ring, self.cq_tail_off)[0]
        if head == tail:
            return ()
        start, end = head & self.cq_mask, tail & self.cq_mask
        base = self.cqes_off
        if start < end:
            cqes = list(io_uring_cqe.iter_unpack(self.cq_view[base + 16 * start:base + 16 * end]))
        else:  # the batch wraps around the end of the ring
            cqes = list(io_uring_cqe.iter_unpack(
                self.cq_view[base + 16 * start:base + 16 * self.cq_entries]))
            cqes += io_uring_cqe.iter_unpack(self.cq_view[base:base + 16 * end])
        struct.pack_into("<I", self.cq_ring, self.cq_head_off, tail)
        return cqes


# ---------------------------------------------------------------------------------------------
# 3. The archive
# ---------------------------------------------------------------------------------------------

COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                    (b"\x28\xb5\x2f\xfd", "zstd"))
VARIANT_SUFFIXES = ((".br", "br"), (".zst", "zstd"), (".gz", "gzip"))


class Entry:
    """A servable file: where its bytes are in the tar, and (filled by layer 4) its head."""
    __slots__ = ("name", "offset", "size", "mtime", "encoding", "variants", "head")

    def __init__(self, name, offset, size, mtime, encoding=None):
        self.name, self.offset, self.size, self.mtime = name, offset, size, mtime
        self.encoding = encoding  # Content-Encoding when this is a precompressed variant
        self.variants = ()        # (encoding, Entry) pairs, smallest first
        self.head = b""


class Archive:
    """Index of a tar file mmap'd read-only: URL path (bytes) -> Entry, plus directories."""

    def __init__(self, path, prefix=""):
        self.path = path
        self.files = {}          # '/a/b.html' (UTF-8 bytes) -> Entry
        self.dirs = set()        # '/a', '/a/b' (UTF-8 bytes, no trailing slash)
        self.size = self._check_file(path)
        members = self._read_members(path)
        self._index(members, prefix.lstrip("/"))
        self.address = self._map(path)

    @staticmethod
    def _check_file(path):
        try:
            with open(path, "rb") as f:
                magic = f.read(8)
                size = os.fstat(f.fileno()).st_size
        except IsADirectoryError:
            raise StartupError(f"{path}: is a directory; give a tar file (tar -cf site.tar -C dir .)")
        except OSError as e:
            raise StartupError(f"{path}: cannot open the tar file: {e.strerror}")
        for sig, kind in COMPRESSED_MAGIC:
            if magic.startswith(sig):
                raise StartupError(f"{path}: is {kind}-compressed; serve an uncompressed tar "
                                   f"(decompress it first)")
        if size < 512:
            raise StartupError(f"{path}: not a tar file (only {size} bytes)")
        return size

    def _read_members(self, path):
        try:
            with tarfile.open(path, mode="r:") as tf:
                members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError, UnicodeError) as e:
            raise StartupError(f"{path}: not a readable tar file ({e})")
        for m in members:
            if m.isreg() and m.offset_data + m.size > self.size:
                raise StartupError(f"{path}: truncated: '{m.name}' ends at byte "
                                   f"{m.offset_data + m.size} but the file has {self.size}")
        return members

    def _index(self, members, prefix):
        links = []
        for m in members:
            name = _member_name(m.name, prefix)
            if name is None:
                continue
            if m.isreg() and not m.issparse():
                self.files[name] = Entry(name, m.offset_data, m.size, int(m.mtime))
            elif m.islnk():
                links.append((name, _member_name(m.linkname, prefix)))
            elif m.isdir() and name != b"/":
                self.dirs.add(name.rstrip(b"/"))
        for name, target in links:  # a hard link serves its target's bytes
            if target in self.files:
                t = self.files[target]
                self.files[name] = Entry(name, t.offset, t.size, t.mtime)
        for name in self.files:
            parent = name.rsplit(b"/", 1)[0]
            while parent and parent not in self.dirs:
                self.dirs.add(parent)
                parent = parent.rsplit(b"/", 1)[0]
        self._attach_variants()

    def _attach_variants(self):
        for name, entry in self.files.items():
            found = []
            for suffix, encoding in VARIANT_SUFFIXES:
                v = self.files.get(name + suffix.encode())
                if v is not None:
                    found.append((encoding, Entry(v.name, v.offset, v.size, v.mtime, encoding)))
            entry.variants = tuple(sorted(found, key=lambda ev: ev[1].size))

    def _map(self, path):
        """mmap the tar read-only and return its address, for the kernel to send from."""
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise StartupError(f"{self.path}: mmap failed: {os.strerror(ctypes.get_errno())}")
        return addr

    def lookup(self, path):
        """Entry for a normalised URL path; index.html for directories."""
        if path.endswith(b"/"):
            return self.files.get(path + b"index.html")
        return self.files.get(path)


def _member_name(name, prefix):
    """'./site/a b.html' -> b'/a b.html' after stripping prefix; None if outside prefix."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    if prefix:
        if not name.startswith(prefix):
            return None
        name = name[len(prefix):]
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return ("/" + "/".join(parts)).encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# 4. HTTP/1.1
# ---------------------------------------------------------------------------------------------

MAX_REQUEST_LINE = 8192
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VISIBLE_ASCII = bytes(range(0x21, 0x7F))
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])\r?\n")
# Field values: visible characters, spaces and tabs, obs-text; no CR, LF, NUL or other controls.
FIELD_BLOCK = re.compile(rb"(?:" + TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r?\n)*")
FIELD_PAIRS = re.compile(rb"(" + TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\r?\n")
PERCENT_OK = re.compile(rb"(?:[^%]|%[0-9A-Fa-f]{2})*")
BYTE_RANGE = re.compile(rb"bytes=[ \t]*(\d*)-(\d*)[ \t]*")
TEXT_TYPES = ("application/javascript", "application/json", "application/xml", "image/svg+xml",
              "application/manifest+json")
REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
           400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           414: "URI Too Long", 416: "Range Not Satisfiable",
           431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}
# Fields whose values the responder looks at; all others are checked for syntax and skipped.
INTERESTING = frozenset((b"host", b"connection", b"content-length", b"transfer-encoding",
                         b"range", b"if-range", b"if-none-match", b"if-modified-since",
                         b"accept-encoding"))
SINGLETONS = frozenset((b"host", b"content-length", b"transfer-encoding"))

_mime = mimetypes.MimeTypes()  # built-in table only: the same answer on every host


def content_type(name):
    ctype, encoding = _mime.guess_type(name.decode("utf-8", "replace"))
    if encoding == "gzip":
        return "application/gzip"
    if ctype is None or encoding is not None:
        return "application/octet-stream"
    if ctype.startswith("text/") or ctype in TEXT_TYPES:
        return ctype + "; charset=utf-8"
    return ctype


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
    path = target.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        return None
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


def weak_match(header, etag):
    """If-None-Match: weak comparison against a comma-separated list or '*'."""
    tag = etag.encode()
    for item in header.split(b","):
        item = item.strip()
        if item == b"*" or item == tag or (item.startswith(b"W/") and item[2:] == tag):
            return True
    return False


def parse_range(value, size):
    """A single 'bytes=a-b' range -> (start, end_exclusive); 'unsatisfiable'; or None to ignore."""
    m = BYTE_RANGE.fullmatch(value)
    if m is None:
        return None  # invalid or several ranges: serve the whole body
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    end = int(last) + 1 if last else size
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


def request_line_error(head):
    """Status for a request line that REQUEST_LINE rejected: 414, 505 or 400."""
    line = head.split(b"\n", 1)[0]
    if len(line) > MAX_REQUEST_LINE:
        return 414
    if re.fullmatch(rb"[^ ]+ [^ ]+ HTTP/\d\.\d\r?", line):
        return 505
    return 400


def framing(version, fields):
    """keep_alive for a parsed request; raise HttpError for a Host or Content-Length problem.
    A request with a body is answered and the connection closed: the body is never read, so
    nothing can be smuggled behind it."""
    if version == 11 and b"host" not in fields:
        raise HttpError(400)
    length = fields.get(b"content-length")
    if length is not None and not length.isdigit():
        raise HttpError(400)
    if b"transfer-encoding" in fields or length is not None and int(length) > 0:
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

    def __init__(self, archive, cache_control=None):
        self.archive = archive
        self.cache_control = cache_control
        self.not_found = archive.files.get(b"/404.html")
        for entry in archive.files.values():
            self._prepare(entry)
            for _, variant in entry.variants:
                self._prepare(variant, content_type(entry.name))
        self.tick(time.time())

    def _prepare(self, entry, ctype=None):
        """Precompute the 200 head lines of an entry (everything but status, Date, Connection)."""
        lines = [f"Content-Type: {ctype or content_type(entry.name)}",
                 f"Content-Length: {entry.size}"] + self._validators(entry)
        if entry.encoding:
            lines.append(f"Content-Encoding: {entry.encoding}")
        entry.head = ("\r\n".join(lines) + "\r\nAccept-Ranges: bytes\r\n").encode("latin-1")

    def _validators(self, entry):
        lines = [f"Last-Modified: {http_date(entry.mtime)}", f"ETag: {etag_of(entry)}"]
        if self.cache_control:
            lines.append(f"Cache-Control: {self.cache_control}")
        if entry.variants or entry.encoding:
            lines.append("Vary: Accept-Encoding")
        return lines

    def tick(self, now):
        """Refresh the cached Date line; called once a second, not per request."""
        self.date = http_date(now)
        self.prefix_200 = (f"HTTP/1.1 200 OK\r\nServer: {SERVER}\r\nDate: {self.date}\r\n"
                           ).encode()

    def status_head(self, status, lines=(), close=False, keep_alive_10=False):
        head = [f"HTTP/1.1 {status} {REASONS[status]}", f"Server: {SERVER}", f"Date: {self.date}"]
        head += lines
        if close:
            head.append("Connection: close")
        elif keep_alive_10:
            head.append("Connection: keep-alive")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    def error(self, status, close, extra=()):
        """A short text/plain error response: (status, head+body, 0, 0, keep_alive)."""
        body = f"{status} {REASONS[status]}\n"
        lines = ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
        return status, self.status_head(status, lines + list(extra), close) + body.encode(), 0, 0, \
            not close

    # -- request parsing ------------------------------------------------------------------------

    @staticmethod
    def parse(head):
        """Parse a request head (every line with its newline, without the blank line) into
        (method, target, version 10|11, interesting fields, keep_alive); raise HttpError."""
        m = REQUEST_LINE.match(head)
        if m is None:
            raise HttpError(request_line_error(head))
        pos = m.end()
        if pos > MAX_REQUEST_LINE + 2:
            raise HttpError(414)
        method, target, version = m.groups()
        version = 11 if version == b"1.1" else 10
        if FIELD_BLOCK.fullmatch(head, pos) is None:
            raise HttpError(400)
        fields = {}
        for name, value in FIELD_PAIRS.findall(head, pos):
            name = name.lower()
            if name in INTERESTING:
                if name in fields:
                    if name in SINGLETONS:
                        if name != b"content-length" or fields[name] != value:
                            raise HttpError(400)
                    else:
                        value = fields[name] + b", " + value  # RFC 9110 §5.3 list combining
                fields[name] = value
        return method, target, version, fields, framing(version, fields)

    # -- responses ------------------------------------------------------------------------------

    def respond(self, head):
        """Request head -> (status, response head bytes, body offset, body length, keep_alive)."""
        try:
            method, target, version, fields, keep_alive = self.parse(head)
        except HttpError as e:
            return self.error(e.status, e.close)
        close = not keep_alive
        if method != b"GET" and method != b"HEAD":
            return self.error(405, close, ("Allow: GET, HEAD",))
        if target[0] != 47:  # not '/'
            target = _origin_form(target)
            if target is None:
                return self.error(400, close)
        path = normalise_path(target)
        if path is None:
            return self.error(400, close)
        entry = self.archive.lookup(path)
        if entry is None:
            return self._missing(method, target, version, path, close)
        if len(fields) > 1 or version == 10 or close:
            return self._full(method, version, fields, entry, close)
        # The hot path: a plain keep-alive HTTP/1.1 GET or HEAD with no conditions.
        return 200, self.prefix_200 + entry.head + b"\r\n", entry.offset, \
            (entry.size if method == b"GET" else 0), True

    def _missing(self, method, target, version, path, close):
        if path.rstrip(b"/") in self.archive.dirs and not path.endswith(b"/"):
            query = target.partition(b"?")[2]
            location = path + b"/" + (b"?" + query if query else b"")
            return self.error(301, close, ("Location: " + location.decode("latin-1"),))
        nf = self.not_found
        if nf is None:
            return self.error(404, close)
        lines = [f"Content-Type: {content_type(nf.name)}", f"Content-Length: {nf.size}"]
        head = self.status_head(404, lines, close, version == 10 and not close)
        return 404, head, nf.offset, (0 if method == b"HEAD" else nf.size), not close

    def _full(self, method, version, fields, entry, close):
        """Everything beyond the hot path: content negotiation, If-None-Match or
        If-Modified-Since, Range with If-Range, HTTP/1.0 keep-alive and Connection: close."""
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
                return self.error(416, close, (f"Content-Range: bytes */{entry.size}",))
            if span is not None:
                return self._partial(entry, span, close, ka10)
        head = self.prefix_200 + entry.head + (
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
        lines = self.headers_for_partial(entry, start, end)
        head = self.status_head(206, lines, close, ka10)
        return 206, head, entry.offset + start, end - start, not close

    def headers_for_partial(self, entry, start, end):
        lines = [line for line in entry.head.decode("latin-1").split("\r\n")
                 if line and not line.startswith("Content-Length:")]
        return lines + [f"Content-Length: {end - start}",
                        f"Content-Range: bytes {start}-{end - 1}/{entry.size}"]


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
    i = buf.find(b"\r\n\r\n", start, end)
    if i >= 0:
        j = buf.find(b"\n\n", start, i)
        return (j + 1, j + 2) if j >= 0 else (i + 2, i + 4)
    i = buf.find(b"\n\n", start, end)
    if i >= 0:
        return i + 1, i + 2
    i = buf.find(b"\n\r\n", start, end)
    if i >= 0:
        return i + 1, i + 3
    return None


# ---------------------------------------------------------------------------------------------
# 7. Connection loop
# ---------------------------------------------------------------------------------------------

# user_data: bits 0-31 slot (or listener) index, 32-39 operation, 40-63 slot generation, so a
# completion that arrives after its slot was freed and reused is recognised and dropped.
OP_ACCEPT, OP_RECV, OP_SEND, OP_SEND_LAST, OP_LINGER, OP_TIMER, OP_IGNORE = range(7)
GEN_MASK = (1 << 24) - 1

SEND_CHUNK = 256 * 1024     # a body is sent in pieces this big so slow readers show progress
LINGER_TIMEOUT = 2.0        # how long a closing connection may keep sending us bytes
RBUF_EXTRA = 4096           # read buffer room beyond the largest allowed request head
HBUF_SIZE = 12 * 1024       # response head buffer: fits a 301 with an 8 KiB Location


class Slot:
    """A connection's preallocated state. Buffers are fixed regions of the Server's arrays."""
    __slots__ = ("index", "gen", "fd", "rbase", "haddr", "raddr", "iov_addr", "msg_addr",
                 "rstart", "rlen", "deadline", "partial", "recv_busy", "send_busy", "send_ud",
                 "closing", "lingering", "close_after", "body_pos", "body_end", "keep_alive",
                 "peer", "log")

    def __init__(self, index):
        self.index, self.gen, self.fd = index, 0, -1
        self.peer, self.log = "-", None


class Server:
    """The event loop: listeners, a ring, and max_connections fixed slots."""

    def __init__(self, site, listeners, opts, log):
        self.site, self.listeners, self.opts, self.log = site, listeners, opts, log
        self.access_log = opts.access_log_file
        n = opts.max_connections
        self.ring = IoUring(min(32768, 1 << (2 * n + 64).bit_length()))
        missing = [name for name, op in REQUIRED_OPS.items() if op not in self.ring.supported_ops()]
        if missing:
            raise StartupError("this kernel's io_uring lacks " + ", ".join(missing)
                               + "; use Linux 5.19 or newer")
        self.skip = self.ring.skip_success
        self.rbuf_size = max(opts.max_header_bytes, MAX_REQUEST_LINE) + RBUF_EXTRA
        self._allocate(n)
        self.tar_addr = site.archive.address
        self.accept_armed = [False] * len(listeners)
        self.multishot = True
        self.stopping = False
        self.stop_requested = ()  # set by the CLI to a list that its signal handlers append to
        self.stop_deadline = None
        self.stats = dict(accepted=0, requests=0, closed=0, timeouts=0)
        self.timespec = bytearray(kernel_timespec.pack(1, 0))
        self.now = time.monotonic()

    def _allocate(self, n):
        """Every per-connection byte is allocated here, once. Anonymous mappings rather than
        bytearrays: their pages stay untouched (not resident) until a connection uses them."""
        self.rbuf = mmap.mmap(-1, n * self.rbuf_size)
        self.hbuf = mmap.mmap(-1, n * HBUF_SIZE)
        self.iovs = mmap.mmap(-1, n * iovec2.size)
        self.msgs = mmap.mmap(-1, n * msghdr.size)
        raddr, haddr = buffer_address(self.rbuf), buffer_address(self.hbuf)
        iaddr, maddr = buffer_address(self.iovs), buffer_address(self.msgs)
        self.slots = []
        for i in range(n):
            s = Slot(i)
            s.rbase, s.raddr = i * self.rbuf_size, raddr + i * self.rbuf_size
            s.haddr = haddr + i * HBUF_SIZE
            s.iov_addr, s.msg_addr = iaddr + i * iovec2.size, maddr + i * msghdr.size
            # The msghdr never changes: it always points at this slot's two iovecs.
            msghdr.pack_into(self.msgs, i * msghdr.size, 0, 0, s.iov_addr, 2, 0, 0, 0)
            self.slots.append(s)
        self.free = list(reversed(self.slots))
        self.active = 0

    # -- submission helpers ---------------------------------------------------------------------

    def ud(self, slot, op):
        return slot.index | (op << 32) | (slot.gen << 40)

    def arm_accept(self, i):
        if self.accept_armed[i] or self.stopping:
            return
        ioprio = IORING_ACCEPT_MULTISHOT if self.multishot else 0
        self.ring.prep(IORING_OP_ACCEPT, self.listeners[i].fileno(), 0, 0, 0, SOCK_CLOEXEC,
                       i | (OP_ACCEPT << 32), ioprio=ioprio)
        self.accept_armed[i] = True

    def pause_accepts(self):
        for i, armed in enumerate(self.accept_armed):
            if armed:
                self.ring.prep(IORING_OP_ASYNC_CANCEL, -1, i | (OP_ACCEPT << 32), 0, 0, 0,
                               OP_IGNORE << 32)

    def arm_timer(self):
        self.ring.prep(IORING_OP_TIMEOUT, -1, buffer_address(self.timespec), 1, 0, 0,
                       OP_TIMER << 32)

    def post_recv(self, slot):
        if slot.rstart:
            # Move a partial pipelined request to the front so the buffer has room again.
            self.rbuf.move(slot.rbase, slot.rbase + slot.rstart, slot.rlen - slot.rstart)
            slot.rlen -= slot.rstart
            slot.rstart = 0
        self.ring.prep(IORING_OP_RECV, slot.fd, slot.raddr + slot.rlen, self.rbuf_size - slot.rlen,
                       0, 0, self.ud(slot, OP_RECV))
        slot.recv_busy = True

    # -- connection lifecycle -------------------------------------------------------------------

    def on_accept(self, i, res, flags):
        if not flags & IORING_CQE_F_MORE:
            self.accept_armed[i] = False
        if res < 0:
            if res == -errno.EINVAL and self.multishot:
                self.multishot = False  # kernel older than 5.19: single-shot accepts
            elif res != -errno.ECANCELED:
                self.log.warn(f"accept failed: {os.strerror(-res)}")
        elif not self.free or self.stopping:
            # Only reachable in the instant before a cancel lands; the client may retry.
            self.ring.prep(IORING_OP_CLOSE, res, 0, 0, 0, 0, OP_IGNORE << 32, self.skip)
        else:
            self.open_slot(res)
        if not self.accept_armed[i] and self.free:
            self.arm_accept(i)

    def open_slot(self, fd):
        slot = self.free.pop()
        self.active += 1
        self.stats["accepted"] += 1
        slot.fd = fd
        slot.rstart = slot.rlen = 0
        slot.recv_busy = slot.send_busy = slot.closing = slot.lingering = False
        slot.close_after = False
        slot.partial = False
        slot.deadline = self.now + self.opts.header_timeout
        if self.access_log:
            slot.peer = peer_name(fd)
        self.post_recv(slot)
        if not self.free:
            self.pause_accepts()

    def start_close(self, slot):
        """Close now: cancel what is in flight; the slot is freed when nothing is left."""
        slot.closing = True
        if slot.recv_busy:
            self.ring.prep(IORING_OP_ASYNC_CANCEL, -1, self.ud(slot, OP_RECV), 0, 0, 0,
                           OP_IGNORE << 32)
        if slot.send_busy:
            self.ring.prep(IORING_OP_ASYNC_CANCEL, -1, slot.send_ud, 0, 0, 0, OP_IGNORE << 32)
        self.maybe_free(slot)

    def maybe_free(self, slot):
        if slot.recv_busy or slot.send_busy or slot.fd < 0:
            return
        self.ring.prep(IORING_OP_CLOSE, slot.fd, 0, 0, 0, 0, OP_IGNORE << 32, self.skip)
        slot.fd = -1
        slot.gen = (slot.gen + 1) & GEN_MASK
        self.free.append(slot)
        self.active -= 1
        self.stats["closed"] += 1
        if len(self.free) == 1:
            for i in range(len(self.listeners)):
                self.arm_accept(i)

    def linger(self, slot):
        """Half-close after the last response and read until the client closes too, so that
        unread request bytes cannot turn our close into a reset that destroys the response."""
        slot.lingering = True
        slot.deadline = self.now + LINGER_TIMEOUT
        slot.rstart = slot.rlen = 0
        self.ring.prep(IORING_OP_SHUTDOWN, slot.fd, 0, SHUT_WR, 0, 0, OP_IGNORE << 32,
                       IOSQE_IO_LINK | self.skip)
        self.post_recv(slot)

    # -- completions ----------------------------------------------------------------------------

    def on_recv(self, slot, res):
        slot.recv_busy = False
        slot.send_busy = False  # a recv linked behind a send only runs once the send is done
        if slot.closing:
            self.maybe_free(slot)
        elif res <= 0:
            self.start_close(slot)
        elif slot.lingering:
            slot.rlen = 0
            self.post_recv(slot)
        else:
            slot.rlen += res
            self.process(slot)

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
        if head_end - start > self.opts.max_header_bytes:
            self.send_response(slot, self.site.error(oversize_status(buf, start, end), True), None)
            return
        head = buf[start:head_end]
        slot.rstart = next_start - base
        if slot.rstart == slot.rlen:
            slot.rstart = slot.rlen = 0
        self.stats["requests"] += 1
        self.send_response(slot, self.site.respond(head), head)

    def need_more(self, slot, start, end):
        """No complete head yet: enforce the size limits, start the header clock, read on."""
        if end - start >= self.opts.max_header_bytes or end - start >= self.rbuf_size - 1:
            self.send_response(slot, self.site.error(oversize_status(self.rbuf, start, end), True),
                               None)
            return
        if end > start and not slot.partial:
            slot.partial = True  # first byte of a request: the header deadline starts now
            slot.deadline = self.now + self.opts.header_timeout
        elif end == start:
            slot.rstart = slot.rlen = 0
        self.post_recv(slot)

    def send_response(self, slot, response, request_head):
        status, head, body_off, body_len, keep_alive = response
        if self.stopping:
            keep_alive = False
        if self.access_log:
            self.log_access(slot, request_head, status, body_len)
        n = len(head)
        h = slot.index * HBUF_SIZE
        self.hbuf[h:h + n] = head
        slot.body_pos = self.tar_addr + body_off
        slot.body_end = slot.body_pos + body_len
        slot.keep_alive = keep_alive
        slot.partial = False
        self.send_next(slot, n)

    def send_next(self, slot, head_len=0):
        """Send the head (if any) and the next piece of the body. The last piece of a keep-alive
        response is linked to the next recv and completes silently: one CQE per request."""
        body = min(slot.body_end - slot.body_pos, SEND_CHUNK)
        iovec2.pack_into(self.iovs, slot.index * iovec2.size, slot.haddr, head_len, slot.body_pos,
                         body)
        slot.body_pos += body
        last = slot.body_pos == slot.body_end
        slot.send_busy = True
        slot.deadline = self.now + self.opts.idle_timeout
        flags = MSG_NOSIGNAL | MSG_WAITALL
        if last and slot.keep_alive and slot.rlen == 0 and self.skip:
            slot.send_ud = self.ud(slot, OP_SEND_LAST)
            self.ring.prep(IORING_OP_SENDMSG, slot.fd, slot.msg_addr, 0, 0, flags, slot.send_ud,
                           IOSQE_IO_LINK | self.skip)
            self.post_recv(slot)
        else:
            slot.send_ud = self.ud(slot, OP_SEND)
            self.ring.prep(IORING_OP_SENDMSG, slot.fd, slot.msg_addr, 0, 0, flags, slot.send_ud)

    def on_send(self, slot, res, expected_last):
        slot.send_busy = False
        if slot.closing:
            self.maybe_free(slot)
        elif res < 0 or expected_last:
            # A failed send (or a short one, which MSG_WAITALL only returns on error).
            self.start_close(slot)
        elif slot.body_pos < slot.body_end:
            self.send_next(slot)
        elif not slot.keep_alive:
            self.linger(slot)
        elif slot.rlen:
            self.process(slot)  # a pipelined request is already waiting
        else:
            slot.deadline = self.now + self.opts.idle_timeout
            self.post_recv(slot)

    def on_timer(self):
        now = time.time()
        self.site.tick(now)
        for slot in self.slots:
            if slot.fd >= 0 and not slot.closing and slot.deadline < self.now:
                self.stats["timeouts"] += 1
                self.start_close(slot)
        if self.access_log:
            self.access_log.flush()
        self.arm_timer()

    def log_access(self, slot, request_head, status, body_len):
        line = b"-" if request_head is None else request_head.split(b"\r\n", 1)[0].split(b"\n")[0]
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        req = line.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
        self.access_log.write(f'{slot.peer} - - [{stamp}] "{req}" {status} {body_len}\n')

    # -- the loop -------------------------------------------------------------------------------

    def run(self):
        for i in range(len(self.listeners)):
            self.arm_accept(i)
        self.arm_timer()
        ring, slots = self.ring, self.slots
        while True:
            ring.enter(True)
            self.now = time.monotonic()
            for user_data, res, flags in ring.completions():
                op = (user_data >> 32) & 0xFF
                if op == OP_ACCEPT:
                    self.on_accept(user_data & 0xFFFFFFFF, res, flags)
                    continue
                if op == OP_TIMER:
                    self.on_timer()
                    continue
                if op == OP_IGNORE:
                    continue
                slot = slots[user_data & 0xFFFFFFFF]
                if (user_data >> 40) != slot.gen or slot.fd < 0:
                    continue  # stale: the slot was freed (and maybe reused) since
                if op == OP_RECV:
                    self.on_recv(slot, res)
                else:
                    self.on_send(slot, res, op == OP_SEND_LAST)
            if self.stop_requested and not self.stopping:
                self.begin_stop(self.opts.grace)
            if self.stopping and self.drained():
                return

    def begin_stop(self, grace):
        """SIGTERM/SIGINT: stop accepting, close idle connections, finish the rest."""
        if self.stopping:
            return
        self.pause_accepts()
        self.stopping = True
        self.stop_deadline = time.monotonic() + grace
        for slot in self.slots:
            if slot.fd >= 0 and not slot.closing and not slot.send_busy and slot.rlen == 0:
                self.start_close(slot)

    def drained(self):
        if self.active == 0:
            return True
        if time.monotonic() > self.stop_deadline:
            self.log.warn(f"grace period over, dropping {self.active} connection(s)")
            return True
        return False

    def stats_line(self):
        s = self.stats
        return (f"stats active={self.active} free={len(self.free)} max={len(self.slots)} "
                f"accepted={s['accepted']} requests={s['requests']} closed={s['closed']} "
                f"timeouts={s['timeouts']} enters={self.ring.enters}")


def peer_name(fd):
    """Client address for the access log (one getpeername per connection, only when logging)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        host = s.getpeername()[0]
    except OSError:
        host = "-"
    s.close()
    return host


# ---------------------------------------------------------------------------------------------
# 8. CLI
# ---------------------------------------------------------------------------------------------

class Log:
    """Diagnostics on stderr; -q silences warnings, -v adds info lines."""

    def __init__(self, level):
        self.level = level

    def warn(self, msg):
        if self.level >= 0:
            print(f"tarweb.py: {msg}", file=sys.stderr, flush=True)

    def info(self, msg):
        if self.level >= 1:
            print(f"tarweb.py: {msg}", file=sys.stderr, flush=True)


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
        s.listen(4096)  # a deep backlog holds clients while every slot is busy
    except OSError as e:
        s.close()
        hint = "; stop the other server or pick another --listen" \
            if e.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {where}: {e.strerror}{hint}")
    return s


def listener_url(sock, scheme="http"):
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/"


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
                   help="address to listen on, repeatable (default [::]:8080, dual-stack)")
    p.add_argument("--prefix", default="", help="serve only members under this prefix, "
                   "with the prefix stripped (e.g. site/)")
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
    p.add_argument("--grace", type=positive(float), default=5.0, metavar="S",
                   help="on SIGTERM/SIGINT, time to finish responses in flight (default 5)")
    p.add_argument("--access-log", metavar="FILE|-", help="Common Log Format access log")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="count", default=0)
    p.add_argument("--version", action="version", version=f"tarweb.py {__version__}")
    opts = p.parse_args(argv)
    if not opts.listen:
        opts.listen = [(socket.AF_INET6, "::", 8080)] if socket.has_ipv6 else \
            [(socket.AF_INET, "0.0.0.0", 8080)]
    return opts


def open_access_log(name):
    if name is None:
        return None
    if name == "-":
        return sys.stdout
    try:
        return open(name, "a", encoding="utf-8")
    except OSError as e:
        raise StartupError(f"cannot open access log {name}: {e.strerror}")


def raise_fd_limit(n, log):
    """Each slot is a socket: make sure the process may hold that many descriptors."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 64
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < need:
            log.warn(f"open-file limit {hard} is below --max-connections {n}; "
                     f"raise it with 'ulimit -n {need}'")


def serve(opts, log):
    """Start-up in the order that fails fastest, then run until SIGTERM/SIGINT."""
    opts.access_log_file = open_access_log(opts.access_log)
    archive = Archive(opts.tar, opts.prefix)
    site = Site(archive, opts.cache_control)
    raise_fd_limit(opts.max_connections, log)
    listeners = [make_listener(spec) for spec in opts.listen]
    server = Server(site, listeners, opts, log)
    urls = " ".join(listener_url(s) for s in listeners)
    print(f"tarweb.py {__version__}: serving {opts.tar} on {urls}", flush=True)
    log.info(f"{len(archive.files)} files, {opts.max_connections} slots, ring flags "
             f"{server.ring.flags:#x}, multishot accept")
    stop = []
    # Handlers only set a flag: the loop must not be re-entered halfway through writing an SQE.
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGUSR1, lambda *_: print("tarweb.py: " + server.stats_line(),
                                                   file=sys.stderr, flush=True))
    server.stop_requested = stop
    server.run()
    if opts.access_log_file:
        opts.access_log_file.flush()


def main(argv=None):
    opts = parse_args(argv)
    log = Log(opts.verbose - opts.quiet)
    try:
        serve(opts, log)
    except StartupError as e:
        print(f"tarweb.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
