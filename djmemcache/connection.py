"""One socket to one memcached server, and the text protocol of the hot commands.

``Connection`` is pymemcache's ``Client`` (its connect, TLS and keepalive
handling, ``stats``, ``version``, ``flush_all`` and exception types) with
the commands a Django cache runs all day written here instead. Why our own:

- speed: pymemcache re-validates and re-encodes every key (the backend has
  already validated it), builds intermediate dicts, and reads replies
  through a generic line reader. For one ``get`` on loopback this layer costs
  about 10 us less per call (see docs/performance.rst).
- pipelining: ``send_*``/``read_*`` split a multi-key command in two, so the
  client sends every server its batch before reading any reply.
- fewer GIL hand-offs: a command is sent without releasing the GIL (see
  ``Connection._send``), so a thread gives up the GIL once per command, while it
  waits for the reply, instead of twice.
- per-item outcomes: a ``set_many`` in which memcached refuses one value
  (``SERVER_ERROR object too large``) reports that key as not stored and
  reads on; pymemcache raises and loses the other keys' outcomes.

Values cross this layer as ``(bytes, flags)``: serializing happens before a
connection is taken, decoding after it is given back.

Every method either returns after reading its complete reply, or raises; a
connection that raised is closed by the pool, never reused.
"""

import ctypes
import select
import socket
import ssl
import struct

from pymemcache.client.base import Client as _PymemcacheClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

RECV_SIZE = 65536

#: Commands up to this size are sent while holding the GIL (``Connection._send``).
SEND_NOW_MAX = 65536
_SEND_NOW_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


def _libc_send():
    """libc's ``send`` called through ``ctypes.PyDLL``, which keeps the GIL.

    Why: ``socket.sendall`` releases the GIL around the syscall, so under
    threads each command costs two GIL hand-offs (send, then recv), each a
    futex wake and often a context switch. Sending a small command to a
    socket with room in its buffer never blocks, so it need not release
    the GIL: measured with 8 threads, this halves the context switches per
    request (20.9 -> 10.6) and system time per request by 30% (see
    docs/performance.rst). None where libc's ``send`` cannot be found.
    """
    try:
        send = ctypes.PyDLL(None).send
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not a POSIX libc
        return None
    # No argtypes: converting through them costs twice the call itself. The
    # arguments are typed at the call instead: ints are C ints (fd, flags),
    # bytes a pointer, and the length a c_size_t object.
    send.restype = ctypes.c_ssize_t
    return send


_send_without_releasing_gil = _libc_send()
_size_t = ctypes.c_size_t


class _RawSerde:
    """pymemcache's own commands (used for stats and the like) see raw items."""

    @staticmethod
    def serialize(key, value):
        return value

    @staticmethod
    def deserialize(key, value, flags):
        return value, flags


_RAW = _RawSerde()


def _raise_error_line(line):
    """Raise the exception a memcached error reply stands for."""
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line[13:])
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line[13:])
    if line.startswith(b"ERROR"):
        raise MemcacheUnknownCommandError(line)
    raise MemcacheUnknownError(line[:64])


def tls_context_for(options):
    """The ``ssl.SSLContext`` of a configuration, or None without TLS.

    Built once per client: hostname (or IP address) checking and certificate
    verification are on unless ``TLS_CHECK_HOSTNAME`` is False.
    """
    if not options.tls:
        return None
    if options.tls_context is not None:
        return options.tls_context
    context = ssl.create_default_context(cafile=options.tls_ca_file)
    if options.tls_cert_file:
        context.load_cert_chain(options.tls_cert_file, options.tls_key_file)
    if not options.tls_check_hostname:
        context.check_hostname = False
    return context


class Connection(_PymemcacheClient):
    """A socket to one server; connected eagerly by the pool."""

    reused = False  # True once it has been back in the pool: a retry is only useful then
    idle_since = 0.0
    pid = None
    hits = 0  # since it was last given back; the pool adds these to its counters
    misses = 0

    def __init__(self, server, options, tls_context=None):
        super().__init__(
            server.address,
            serde=_RAW,
            connect_timeout=options.effective_connect_timeout,
            timeout=options.timeout,
            no_delay=options.no_delay,
            key_prefix=options.key_prefix,
            default_noreply=False,
            allow_unicode_keys=True,
            tls_context=tls_context,
        )
        self._poller = None
        self._send_now = False

    def connect(self):
        self._connect()

    def _connect(self):
        super()._connect()
        if self.timeout is not None and self.tls_context is None:
            self._use_kernel_timeouts(self.timeout)
        self._poller = select.poll()
        self._poller.register(self.sock, select.POLLIN)
        # Not for TLS: the bytes must go through the SSL layer.
        self._send_now = _send_without_releasing_gil is not None and not isinstance(self.sock, ssl.SSLSocket)

    def _send(self, data):
        """Send all of ``data``; small commands without releasing the GIL.

        A non-blocking ``send`` (MSG_DONTWAIT) of a small command, which
        cannot stall the process; whatever it did not send (full socket
        buffer, an error) goes through ``sendall``, which waits with the
        GIL released, and raises the socket's error as usual.
        """
        sock = self.sock
        if self._send_now and len(data) <= SEND_NOW_MAX:
            sent = _send_without_releasing_gil(sock.fileno(), data, _size_t(len(data)), _SEND_NOW_FLAGS)
            if sent == len(data):
                return
            if sent > 0:
                data = data[sent:]
        sock.sendall(data)

    def _use_kernel_timeouts(self, timeout):
        """Enforce TIMEOUT in the kernel (SO_RCVTIMEO/SO_SNDTIMEO) on a
        blocking socket, instead of Python's socket timeout.

        CPython polls before every send and recv on a socket that has a
        timeout: two syscalls and two GIL hand-offs per call instead of one,
        which under threads shows up as context switches. With kernel
        timeouts a timed-out call raises ``BlockingIOError`` (EAGAIN), which
        the client treats as a timeout. Not for TLS, whose socket layer
        reports EAGAIN differently.
        """
        seconds = int(timeout)
        timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock.settimeout(None)

    def is_stale(self):
        """True when an idle connection is unusable: closed, or readable.

        Nothing should arrive on an idle memcached connection, so readable
        means the server closed it (EOF/RST) or sent something we must not
        read as the next reply.
        """
        return self.sock is None or bool(self._poller.poll(0))

    def _wire(self, key):
        return self.key_prefix + key.encode("utf-8")

    # -- reading replies ----------------------------------------------------

    def _recv(self, size=RECV_SIZE):
        data = self.sock.recv(size)
        if not data:
            raise MemcacheUnexpectedCloseError()
        return data

    def _read_lines(self, count):
        """Read exactly ``count`` reply lines (without their CRLF)."""
        buf = self._recv()
        while buf.count(b"\r\n") < count:
            buf += self._recv()
        lines = buf.split(b"\r\n")
        if len(lines) != count + 1 or lines[-1]:
            raise MemcacheUnknownError(b"unexpected data after reply: %r" % buf[-64:])
        return lines[:count]

    def _read_values(self, keys_by_wire, buf=b""):
        """Read ``VALUE`` blocks up to ``END``; map wire keys back to callers' keys."""
        recv = self._recv
        if not buf:
            buf = recv()
        pos = 0
        found = {}
        while True:
            eol = buf.find(b"\r\n", pos)
            while eol < 0:
                buf = buf[pos:] + recv()
                pos = 0
                eol = buf.find(b"\r\n")
            if buf.startswith(b"END", pos) and eol == pos + 3:
                if eol + 2 != len(buf):
                    raise MemcacheUnknownError(b"unexpected data after END")
                self.hits += len(found)
                self.misses += len(keys_by_wire) - len(found)
                return found
            line = buf[pos:eol]
            if not line.startswith(b"VALUE "):
                _raise_error_line(line)
            parts = line.split()
            if len(parts) != 4:
                raise MemcacheUnknownError(line[:64])
            start = eol + 2
            end = start + int(parts[3])
            missing = end + 2 - len(buf)
            if missing > 0:  # a large value: read the rest at once, dropping what was parsed
                chunks = [buf[pos:]]
                while missing > 0:
                    chunk = recv(max(missing, RECV_SIZE))
                    chunks.append(chunk)
                    missing -= len(chunk)
                buf = b"".join(chunks)
                start, end, pos = start - pos, end - pos, 0
            if buf[end:end + 2] != b"\r\n":
                raise MemcacheUnknownError(b"bad data block for " + parts[1])
            key = keys_by_wire.get(parts[1])
            if key is None:
                raise MemcacheUnknownError(b"reply for a key not asked for: " + parts[1])
            found[key] = (buf[start:end], int(parts[2]))
            pos = end + 2

    # -- retrieval ----------------------------------------------------------

    def get(self, key, default=None):
        """``(data, flags)`` or None.

        The hot path of a Django site: a miss, or one small value that
        arrives in one ``recv``, is parsed inline; anything else goes through
        the general reader with what was already read.
        """
        wire = self.key_prefix + key.encode("utf-8")
        self._send(b"get " + wire + b"\r\n")
        buf = self.sock.recv(RECV_SIZE)
        if buf == b"END\r\n":
            self.misses += 1
            return None
        eol = buf.find(b"\r\n")
        header = buf[:eol].split(b" ")
        if len(header) == 4 and header[0] == b"VALUE" and header[1] == wire:
            end = eol + 2 + int(header[3])
            if len(buf) == end + 7 and buf.endswith(b"\r\nEND\r\n"):
                self.hits += 1
                return buf[eol + 2:end], int(header[2])
        if not buf:
            raise MemcacheUnexpectedCloseError()
        return self._read_values({wire: key}, buf).get(key)

    def send_get_many(self, keys):
        wires = {self._wire(key): key for key in keys}
        self._send(b"get " + b" ".join(wires) + b"\r\n")
        return wires

    def read_get_many(self, wires):
        return self._read_values(wires)

    def get_many(self, keys):
        return self.read_get_many(self.send_get_many(keys))

    # -- storage ------------------------------------------------------------

    def send_store(self, command, items, expire):
        """Send one storage command per ``key: (data, flags)`` item."""
        tail = b" %d " % expire
        self._send(b"".join(
            b"%s %s %d%s%d\r\n%s\r\n" % (command, self._wire(key), flags, tail, len(data), data)
            for key, (data, flags) in items.items()
        ))
        return list(items)

    def read_store(self, keys):
        """``{key: None}`` for stored items, ``{key: reason}`` for the others.

        NOT_STORED (``add`` of an existing key) and SERVER_ERROR (a value
        memcached refuses, e.g. too large: it reads and drops the data, so the
        connection stays in step) are per-item outcomes, not errors.
        """
        outcome = {}
        for key, line in zip(keys, self._read_lines(len(keys)), strict=True):
            if line == b"STORED":
                outcome[key] = None
            elif line == b"NOT_STORED" or line.startswith(b"SERVER_ERROR"):
                outcome[key] = line.decode("ascii", "replace")
            else:
                _raise_error_line(line)
        return outcome

    def store_one(self, command, key, item, expire):
        """``None`` when stored, else the reason (NOT_STORED, SERVER_ERROR ...)."""
        data, flags = item
        self._send(b"%s %s %d %d %d\r\n%s\r\n" % (
            command, self.key_prefix + key.encode("utf-8"), flags, expire, len(data), data))
        line = self.sock.recv(RECV_SIZE)
        if line == b"STORED\r\n":
            return None
        if not line:
            raise MemcacheUnexpectedCloseError()
        while not line.endswith(b"\r\n"):
            line += self._recv()
        line = line[:-2]
        if b"\r\n" in line:
            raise MemcacheUnknownError(b"unexpected data after reply: %r" % line[-64:])
        if line == b"NOT_STORED" or line.startswith(b"SERVER_ERROR"):
            return line.decode("ascii", "replace")
        _raise_error_line(line)

    # -- the rest -----------------------------------------------------------

    def send_delete_many(self, keys):
        self._send(b"".join(b"delete " + self._wire(key) + b"\r\n" for key in keys))
        return list(keys)

    def read_delete_many(self, keys):
        """``{key: True if it existed}``."""
        outcome = {}
        for key, line in zip(keys, self._read_lines(len(keys)), strict=True):
            if line == b"DELETED" or line == b"NOT_FOUND":
                outcome[key] = line == b"DELETED"
            else:
                _raise_error_line(line)
        return outcome

    def delete_many(self, keys):
        return self.read_delete_many(self.send_delete_many(keys))

    def delete(self, key, noreply=None):
        return self.delete_many([key])[key]

    def touch(self, key, expire=0, noreply=None):
        self._send(b"touch %s %d\r\n" % (self._wire(key), expire))
        (line,) = self._read_lines(1)
        if line == b"TOUCHED" or line == b"NOT_FOUND":
            return line == b"TOUCHED"
        _raise_error_line(line)

    def incr(self, key, value, noreply=False):
        """New value, or None when the key is missing; ``value`` < 0 decrements."""
        command = b"incr" if value >= 0 else b"decr"
        self._send(b"%s %s %d\r\n" % (command, self._wire(key), abs(value)))
        (line,) = self._read_lines(1)
        if line == b"NOT_FOUND":
            return None
        if line.isdigit():
            return int(line)
        _raise_error_line(line)
