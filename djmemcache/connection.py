"""One socket to one memcached server, and the text protocol of the commands a cache runs.

Why our own rather than pymemcache's ``Client``:

- a deadline for the whole command: OPTIONS ``TIMEOUT`` bounds a command
  from its send to its last byte, however the server dribbles its reply,
  and ``CONNECT_TIMEOUT`` bounds connecting (TLS handshake included).
  pymemcache's timeout bounds each ``recv``: a server sending a byte every
  100 ms held a call for seconds. Under gevent the waits are gevent's own,
  so the deadline holds there too.
- a reply is never trusted: every length and line is checked before it is
  used, a reply line is at most ``MAX_LINE`` bytes, a value at most
  ``MAX_VALUE_SIZE``, and memory grows with the bytes received, never with
  what the server declares. Anything else is a ``ProtocolError``.
- only errors of the socket or the protocol come out of here as such
  (``IOTimeout``, ``ProtocolError``, ``OSError`` with an errno): an exception
  raised by the caller's own code (a signal handler, ``gevent.Timeout``)
  passes through unchanged, so the client never takes it for a server fault.
- speed: the backend has already validated keys, so nothing is re-encoded
  or re-checked; a small reply is parsed inline; small commands are sent
  without releasing the GIL (``Connection._send``).
- pipelining: ``send_*``/``read_*`` split a multi-key command in two, so the
  client sends every server its batch before reading any reply.
- with ``djmemcache._speedups`` (optional C, ``_speedups.c``), ``get``,
  ``get_many``, storage and one-line commands make their whole round trip,
  for every server of a pipeline at once, in one C call with the GIL
  released; the checks, deadlines and exceptions are the same, and the
  Python code here does the rest (gevent, TLS, no compiler).

Values cross this layer as ``(bytes, flags)``. Every method either returns
after reading its complete reply, or raises; a connection that raised is
closed by the pool, never reused.
"""

import collections
import ctypes
import errno
import functools
import logging
import math
import os
import re
import select
import socket
import ssl
import struct
import sys
import time

_logger = logging.getLogger("djmemcache.connection")

RECV_SIZE = 65536
#: Longest reply line accepted ("VALUE <250-byte key> <flags> <length>" is under 300).
MAX_LINE = 4096
#: A large value is read in chunks of at most this many bytes.
BIG_RECV = 262144
#: A one-server command waits for its reply first in one blocking ``recv``
#: of at most this long (SO_RCVTIMEO), then in ``poll`` for the rest of its
#: TIMEOUT (``Connection._recv_first``). Short, because the kernel times it
#: in clock ticks, and a long wait on its coarse timer wheel may fire up to
#: 12% late (a 5 s TIMEOUT ran 147 ms over); under 64 ticks it is exact to
#: the tick at any HZ up to 1000.
BLOCKING_READ_SLICE = 0.040
#: The kernel may end that wait up to about two clock ticks late (4 ms each
#: at HZ=250), so the blocking read is used only with this much time left.
BLOCKING_READ_MIN_TIMEOUT = 0.050
#: Commands up to this size are sent while holding the GIL (``Connection._send``).
SEND_NOW_MAX = 65536
_SEND_NOW_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops what is unsent
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY)

_monotonic = time.monotonic

#: A well-formed VALUE line: key (no space or control byte, at most a reply
#: line long), flags and length in ASCII digits (never a sign, space or "_").
_VALUE_LINE = re.compile(rb"VALUE ([^ \r\n]{1,%d}) (\d{1,20}) (\d{1,20})\r\n" % MAX_LINE)


class IOTimeout(Exception):
    """The server did not answer (or accept the command) before the deadline."""


class ProtocolError(Exception):
    """The reply broke the protocol: malformed, impossible, or not what was asked."""


class ErrorReply(ProtocolError):
    """memcached answered ERROR, CLIENT_ERROR or SERVER_ERROR."""


class ConnectionClosed(ProtocolError):
    """The server closed the connection (a restart, or an idle timeout)."""


def _libc(name, use_errno=False, releasing_gil=False):
    """libc's ``name`` called through ``ctypes.PyDLL``, which keeps the GIL
    (``ctypes.CDLL``, which releases it, with ``releasing_gil``: for the one
    blocking read of a one-server command, ``Connection._recv_first``).

    Why: ``socket.send``/``recv`` release the GIL around the syscall, so
    under threads each costs a GIL hand-off, a futex wake and often a
    context switch. A non-blocking call (``MSG_DONTWAIT``) never waits, so
    it need not release the GIL: for sends, measured with 8 threads, this
    halves the context switches per request (20.9 -> 10.6) and system time
    per request by 30% (see docs/performance.rst). None where libc cannot be
    found.
    """
    try:
        library = ctypes.CDLL if releasing_gil else ctypes.PyDLL
        function = getattr(library(None, use_errno=use_errno), name)
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not a POSIX libc
        return None
    # No argtypes: converting through them costs twice the call itself. The
    # arguments are typed at the call instead: ints are C ints (fd, flags),
    # bytes or a ctypes array a pointer, and the length a c_size_t object.
    function.restype = ctypes.c_ssize_t
    return function


_send_without_releasing_gil = _libc("send")
# recv reports why it failed (errno): nothing there yet, or a real error.
_recv_without_releasing_gil = _libc("recv", use_errno=True)
# The blocking first read of a one-server command waits with the GIL released.
_recv_waiting = _libc("recv", use_errno=True, releasing_gil=True)
_get_errno = ctypes.get_errno
#: A reply already in the socket buffer is read into a per-connection buffer
#: of this size without releasing the GIL (``Connection._recv``).
RECV_NOW_SIZE = 32768
_RECV_NOW_FLAGS = socket.MSG_DONTWAIT
_PEEK_FLAGS = socket.MSG_DONTWAIT | socket.MSG_PEEK
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_size_t = ctypes.c_size_t
# Lengths passed to every libc recv, made once: building a c_size_t per call
# costs more than the rest of the argument passing (timeit: 1.06 -> 0.69 µs
# for a recv that finds nothing).
_RECV_NOW_LEN = _size_t(RECV_NOW_SIZE)
_ONE_BYTE = _size_t(1)


#: The ``API`` of the ``_speedups`` build these sources go with.
SPEEDUPS_API = 5


@functools.cache  # once per process: every module asks
def _load_speedups():
    """``djmemcache._speedups`` (C, built by setup.py when a compiler is there),
    or None: not built, or DJMEMCACHE_PURE_PYTHON set (the test suite runs
    both paths). See ``_speedups.c`` for why it exists."""
    if os.environ.get("DJMEMCACHE_PURE_PYTHON"):
        return None
    try:
        from djmemcache import _speedups
    except ImportError:
        return None
    if getattr(_speedups, "API", None) != SPEEDUPS_API:
        _logger.warning("djmemcache._speedups (%s) was built from other sources than this "
                        "djmemcache's: running in pure Python; rebuild it (pip install .)",
                        _speedups.__file__)
        return None
    return _speedups


_speedups = _load_speedups()


def _gevent_patched():
    """True when gevent has monkey-patched sockets (gunicorn ``-k gevent``):
    the socket is then non-blocking underneath, kernel timeouts do nothing,
    and waits must go through gevent's hub."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def _stdlib_poll():
    """``select.poll`` as the standard library has it, even under gevent
    (used only with a zero timeout, which never blocks)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")
    return select.poll


#: The most plaintext one TLS record holds.
TLS_RECORD_SIZE = 16384


def _tls_records(commands):
    """Lengths of the pieces ``commands`` are sent in over TLS: whole
    commands, as many as one TLS record holds, or one command alone when it
    is larger. So no record holds the end of a data block and the start of
    the next command: memcached (1.6.18 at least) reads the rest of a data
    block with a read of just its length, and what the same record holds
    after it waits in OpenSSL's buffer, which its event loop never looks
    at, until more bytes come (a ``set_many`` of 10 values of 2 KB in one
    write stalled until TIMEOUT). Not a record per command: each write
    gives up the GIL, and 2,000 of them behind a busy thread took seconds."""
    pieces = []
    size = 0
    for command in commands:
        if size and size + len(command) > TLS_RECORD_SIZE:
            pieces.append(size)
            size = 0
        size += len(command)
    pieces.append(size)
    return pieces


def send_unsent(conns, deadline):
    """Finish the deferred sends (``Connection._send``) of ``conns`` by
    ``deadline``, all at once: one ``poll`` waits for room in any of their
    sockets (gevent's under gevent, so other greenlets run meanwhile).
    Returns, for each connection, None once all is sent, else the
    exception of its failure (``IOTimeout`` at the deadline).

    As ``_wait``, past the deadline it looks once more without waiting."""
    failures = [None] * len(conns)
    waiting = {}  # fd -> index, of those with bytes left
    if any(conn._green for conn in conns):
        from gevent.select import poll
    else:
        poll = select.poll
    poller = poll()
    for i, conn in enumerate(conns):
        if conn.unsent:
            waiting[conn._fd] = i
            poller.register(conn._fd, conn.unsent_event)
    while waiting:
        now = _monotonic()
        late = deadline is not None and now >= deadline
        wait_ms = None if deadline is None else 0 if late else math.ceil((deadline - now) * 1000)
        for fd, _events in poller.poll(wait_ms):
            conn = conns[waiting[fd]]
            try:
                while conn.unsent:
                    sent = conn._send_some(conn.unsent)
                    if sent is None:
                        break
                    conn.unsent = conn.unsent[sent:]
            except OSError as exc:
                failures[waiting[fd]] = exc
            else:
                if conn.unsent:  # no room after all, or TLS must read first
                    poller.modify(fd, conn.unsent_event)
                    continue
                conn.unsent = None  # not an empty view that keeps the command alive
            poller.unregister(fd)
            del waiting[fd]
        if late:
            for i in waiting.values():
                failures[i] = IOTimeout("timed out")
            break
    return failures


def _ready(sock, events):
    """True when ``sock`` is ready for ``events`` right now (never waits)."""
    poller = _stdlib_poll()()
    poller.register(sock, events)
    return bool(poller.poll(0))


def _wait(sock, events, deadline, green, poller=None):
    """Wait until ``sock`` is ready for ``events`` or raise ``IOTimeout`` at ``deadline``.

    Past the deadline it still looks once, without waiting, before raising:
    a reply or a connect that is already there was late only because this
    process was (a busy gevent hub, a starved CPU, a slow resolver), and a
    timeout blacklists the server. A server that is really slow is not
    there when we look, so the deadline still bounds the call.

    ``poller``: a ``select.poll`` with ``sock`` registered for ``events``
    already (the connection's own, for input), saving one per wait.
    """
    if deadline is None:
        remaining = None
    else:
        remaining = deadline - _monotonic()
        if remaining <= 0:
            if _ready(sock, events):
                return
            raise IOTimeout("timed out")
    if green:
        from gevent.socket import wait_read, wait_write

        wait = wait_read if events == select.POLLIN else wait_write
        try:
            wait(sock.fileno(), timeout=remaining, timeout_exc=IOTimeout("timed out"))
        except IOTimeout:
            if not _ready(sock, events):  # the hub may run the timer before the I/O event
                raise
        return
    if poller is None:
        poller = select.poll()
        poller.register(sock, events)
    if not poller.poll(None if remaining is None else math.ceil(remaining * 1000)):
        raise IOTimeout("timed out")


def _raise_error_line(line):
    """Raise what a reply line that is not the expected one stands for."""
    if line.startswith((b"SERVER_ERROR", b"CLIENT_ERROR")) or line == b"ERROR":
        raise ErrorReply(line[:200].decode("ascii", "replace"))
    raise ProtocolError("unexpected reply line %r" % line[:64])


def _check_digits(field, what):
    # bytes.isdigit: ASCII digits only, so no sign, space, underscore or
    # "inf" slips through int().
    if not field.isdigit() or len(field) > 20:
        raise ProtocolError("%s is not a number: %r" % (what, field[:32]))
    return int(field)


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


class Connection:
    """A socket to one server; connected by the pool before first use."""

    # Defaults here, set on an instance only on the rare paths that change
    # them (a full socket, TLS): CPython keeps at most 30 instance attributes
    # in its fast shared-key layout, and a 31st made every attribute read of
    # a pooled connection slower (``get``: 24.9k -> 26.2k instructions).
    # tests/test_pool.py counts them.
    unsent_event = select.POLLOUT  # what a deferred send waits for (TLS may have to read first)
    _records = None  # over TLS: lengths of the pieces each TLS record must end (_send_some)

    def __init__(self, server, options, tls_context=None):
        self.server = server
        self.timeout = options.timeout
        self.connect_timeout = options.effective_connect_timeout
        self.no_delay = options.no_delay
        self.key_prefix = options.key_prefix
        self.max_value_size = options.max_value_size
        self.tls_context = tls_context
        self.sock = None
        self._fd = -1  # sock.fileno() while connected; -1 after close, so libc calls fail with EBADF
        self._buf = b""  # bytes read past the line or block asked for
        self._poller = None
        self._send_now = False
        self._recv_now = None  # a ctypes view of the receive buffer, when reads keep the GIL
        self._first_read_blocks = False  # see _recv_first
        self._green = False
        self._tls = False
        self._native = False  # round trips through _speedups (see connect)
        self._native_get = False
        self._read_late_for = None  # the deadline of a command read at twice TIMEOUT (_recv)
        self.unsent = None  # what a deferred send left for send_unsent (a memoryview)
        # The pool's state, all set here: the pool's C path (_speedups.pool_give)
        # then only replaces values, never adds an attribute (which could
        # allocate a dict and run the collector).
        self.reused = False  # True once it has been back in the pool: a retry is only useful then
        self.idle_since = 0.0
        self.pid = None
        self.pooled = False  # in its pool's idle list
        self.hits = self.misses = 0  # since it was last given back; the pool adds these to its counters

    def deadline(self):
        """When a command started now must be over (None: no TIMEOUT)."""
        return None if self.timeout is None else _monotonic() + self.timeout

    # -- connecting -----------------------------------------------------------

    def connect(self):
        """Connect within CONNECT_TIMEOUT (TLS handshake included)."""
        timeout = self.connect_timeout
        deadline = None if timeout is None else _monotonic() + timeout
        green = _gevent_patched()
        address = self.server.address
        if isinstance(address, str):
            family, target = socket.AF_UNIX, address
        else:
            host, port = address
            family, _, _, _, target = socket.getaddrinfo(
                host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)[0]
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(target)
            if err in _IN_PROGRESS:
                _wait(sock, select.POLLOUT, deadline, green)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and err != errno.EISCONN:
                raise self._socket_error(err)
            if family != socket.AF_UNIX and self.no_delay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self._handshake(sock, address[0], deadline, green)
            elif not green:
                sock.setblocking(True)
            else:
                sock.settimeout(None)  # gevent: cooperative; our waits bound it
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.sock = sock
        self._fd = sock.fileno()
        self._green = green
        self._tls = self.tls_context is not None
        self._poller = _stdlib_poll()()
        self._poller.register(sock, select.POLLIN)
        # gevent must wait in its hub, TLS bytes go through the SSL layer.
        self._native = _speedups is not None and not green and not self._tls
        # _speedups.get computes the deadline itself: not for a subclass with its own.
        self._native_get = self._native and type(self).deadline is Connection.deadline
        # Not for TLS: the bytes must go through the SSL layer.
        self._send_now = _send_without_releasing_gil is not None and not self._tls
        if _recv_without_releasing_gil is not None and not self._tls:
            self._rbuf = bytearray(RECV_NOW_SIZE)
            self._rview = memoryview(self._rbuf)
            self._recv_now = (ctypes.c_char * RECV_NOW_SIZE).from_buffer(self._rbuf)
            if _recv_waiting is not None and not green and (
                    self.timeout is None or self.timeout >= BLOCKING_READ_MIN_TIMEOUT):
                # Set even without TIMEOUT: a recv with no kernel timeout is
                # restarted after a handler installed with SA_RESTART (asyncio's,
                # gunicorn's), which would then wait for the reply to run.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                struct.pack("ll", 0, round(BLOCKING_READ_SLICE * 1e6)))
                self._first_read_blocks = True

    def _handshake(self, sock, host, deadline, green):
        # Non-blocking from here on: every TLS read and write waits on the deadline.
        sock = self.tls_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    sock.do_handshake()
                    return sock
                except ssl.SSLWantReadError:
                    _wait(sock, select.POLLIN, deadline, green)
                except ssl.SSLWantWriteError:
                    _wait(sock, select.POLLOUT, deadline, green)
        except BaseException:
            sock.close()
            raise

    def close(self, abort=False):
        """``abort`` (a connection that saw an error or an exception mid-command):
        reset it instead of a clean close, so this side's kernel drops what it
        still holds of a command we gave up on. A server that stalled would
        otherwise run it on its return, after any later write of the same
        keys: a ``set`` of a large value it timed out on, say. What the
        server had already read of it still runs there when it resumes (of a
        ``set_many`` of 3,000 keys cut off by SIGSTOP, about 20 commands ran)."""
        sock, self.sock = self.sock, None
        self._fd = -1
        self._buf = b""
        self.unsent = None  # a failure's traceback may keep the connection, not the command
        if self._records is not None:
            self._records = None
        if sock is not None:
            if abort:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                except OSError:
                    pass
            sock.close()

    def is_stale(self):
        """True when an idle connection is unusable: closed, or readable.

        Nothing should arrive on an idle memcached connection, so readable
        means the server closed it (EOF/RST) or sent something we must not
        read as the next reply.
        """
        if self.sock is None:
            return True
        if self._native:
            return _speedups.stale(self._fd)
        if self._recv_now is not None:
            # A peek that keeps the GIL (``poll`` releases it even with a zero
            # timeout): -1 with EAGAIN is the one answer that means "idle".
            peeked = _recv_without_releasing_gil(
                self._fd, self._recv_now, _ONE_BYTE, _PEEK_FLAGS)
            return peeked >= 0 or _get_errno() not in _WOULD_BLOCK
        return bool(self._poller.poll(0))

    def _wire(self, key):
        return self.key_prefix + key.encode("utf-8")

    # -- the socket, with the deadline ---------------------------------------

    def _send(self, data, deadline=None, defer=False, records=None):
        """Send all of ``data`` by ``deadline`` (default: TIMEOUT from now).

        A small command goes out in one non-blocking ``send`` that keeps the
        GIL (it cannot stall the process); the rest, or a large command,
        waits for room in the socket buffer with the GIL released.

        ``defer`` (a pipeline's sends): send what the socket takes now and
        leave the rest in ``unsent`` for ``send_unsent``, which waits for
        every server at once: a server that stops reading must not hold up
        the sends to the others, each for TIMEOUT.

        ``records`` (over TLS): the lengths of the pieces of ``data`` that
        must each end a TLS record (``_tls_records``).
        """
        if self._send_now and len(data) <= SEND_NOW_MAX:
            sent = _send_without_releasing_gil(self._fd, data, _size_t(len(data)), _SEND_NOW_FLAGS)
            if sent == len(data):
                return
            if sent > 0:
                data = data[sent:]
        view = memoryview(data)
        if self._tls:
            pieces = collections.deque(records) if records is not None and len(records) > 1 else None
            if pieces is not None or self._records is not None:  # else the class default stays
                self._records = pieces
        if defer:
            while view:
                sent = self._send_some(view)
                if sent is None:
                    self.unsent = view
                    return
                view = view[sent:]
            return
        if deadline is None:
            deadline = self.deadline()
        late = False
        while view:
            sent = self._send_some(view)
            if sent is None:
                if late:
                    # poll said ready past the deadline and the send took nothing
                    # (gevent's TLS send hides a read the same way): no late look
                    # again, or this would spin on for as long as that lasts.
                    raise IOTimeout("timed out")
                _wait(self.sock, self.unsent_event, deadline, self._green)
                late = deadline is not None and _monotonic() >= deadline
                continue
            view = view[sent:]

    def _send_some(self, view):
        """One send of ``view`` that never waits: the bytes the socket took,
        or None when it takes none now (``unsent_event`` is then what to wait
        for: room to write or, over TLS, sometimes a read first)."""
        sock = self.sock
        try:
            if not self._tls:
                if self._green:
                    return sock.send(view, _SEND_FLAGS, timeout=0.0)  # gevent's own send would wait
                return sock.send(view, _SEND_FLAGS)
            records = self._records
            if records:
                view = view[:records[0]]  # up to the end of this piece (_tls_records)
            sent = sock.send(view)  # non-blocking since the handshake
            if sent:
                if records:
                    records[0] -= sent
                    if not records[0]:
                        records.popleft()
                return sent
            # gevent's SSL socket returns 0 where the standard library's raises
            # (a caller that sent again at once would spin forever): room to
            # write is what it waits for; a read it may hide (a renegotiation)
            # would make that a busy wait, but one the deadline still ends.
        except ssl.SSLWantReadError:
            self.unsent_event = select.POLLIN
            return None
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        if self.unsent_event != select.POLLOUT:
            self.unsent_event = select.POLLOUT
        return None

    def _recv(self, deadline, size=RECV_SIZE):
        """One ``recv`` of at most ``size`` bytes, waiting no later than ``deadline``.

        On a plain socket, bytes already in the kernel's buffer are read
        without releasing the GIL (a non-blocking libc ``recv``), and only
        when there are none does it wait, in one ``poll`` that releases it:
        after a pipeline's sends, the replies of the servers read last have
        usually arrived while the first was waited for, so a call over
        three servers costs one GIL hand-off instead of six.
        """
        if deadline is not None and self._read_late_for == deadline:
            # The last read of this command came at twice TIMEOUT and the
            # reply was still not whole: whatever the server declares, the
            # call ends (a flood of lines would otherwise hold it, and the
            # GIL). A reply that read completes is taken: it was late only
            # because this process was (as in _speedups).
            raise IOTimeout("reply still arriving at twice TIMEOUT")
        sock = self.sock
        if self._recv_now is not None:
            while True:
                received = _recv_without_releasing_gil(
                    self._fd, self._recv_now,
                    _RECV_NOW_LEN if size >= RECV_NOW_SIZE else _size_t(size), _RECV_NOW_FLAGS)
                if received >= 0:
                    data = self._rview[:received].tobytes()
                    break
                err = _get_errno()
                if err not in _WOULD_BLOCK:
                    data = self._second_look(err, min(size, RECV_NOW_SIZE))
                    if data is not None:
                        break
                    err = errno.EAGAIN
                if err != errno.EINTR:
                    _wait(sock, select.POLLIN, deadline, self._green, self._poller)
        elif self._tls:
            late = False
            while True:
                try:
                    data = sock.recv(size)
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                    if late:  # as in _send: ready past the deadline, and still no data
                        raise IOTimeout("timed out") from None
                    event = select.POLLIN if isinstance(want, ssl.SSLWantReadError) else select.POLLOUT
                    _wait(sock, event, deadline, self._green)
                    late = deadline is not None and _monotonic() >= deadline
        else:
            _wait(sock, select.POLLIN, deadline, self._green)
            data = sock.recv(size)
        if not data:
            raise ConnectionClosed("connection closed by the server")
        if deadline is not None and _monotonic() > deadline + self.timeout:
            self._read_late_for = deadline
        return data

    def _socket_error(self, err):
        """The ``OSError`` (its errno subclass) of ``err``, naming the server."""
        return OSError(err, "%s: %s" % (os.strerror(err), self.server))

    def _second_look(self, err, size):
        """A libc ``recv`` failed with ``err``: bytes, None (nothing yet), or raise.

        ``err`` is ctypes' copy of errno, which a signal handler running
        between the call and the read of it may have changed with ctypes
        calls of its own, so a healthy connection must not be failed on its
        word. Python's own ``recv`` takes a second look: bytes, or nothing
        yet (the connection is fine), or the end of the connection, and
        then the first error was real (the kernel reports a socket's error
        once, so the second read finds only the end): raise that one.
        Under gevent not through its socket: its ``recv`` waits in the hub
        for bytes, with no deadline (our waits bound its timeout-less
        socket), where this look must not wait at all; gevent keeps the
        descriptor non-blocking, so a plain ``read`` of it does not.
        """
        sock = self.sock
        if sock is None:  # closed meanwhile: the error stands
            raise self._socket_error(err)
        try:
            data = os.read(self._fd, size) if self._green else sock.recv(size, _RECV_NOW_FLAGS)
        except BlockingIOError:
            return None
        if not data:
            raise self._socket_error(err)
        return data

    def _recv_first(self, deadline):
        """The first ``recv`` of a one-server command.

        Right after the send the reply is almost never there yet, so it
        waits in one blocking libc ``recv`` that releases the GIL (the one
        hand-off) and is bounded by the kernel's SO_RCVTIMEO, set at connect
        to ``BLOCKING_READ_SLICE``: one syscall where ``poll`` + ``recv`` made
        two, for every reply that comes within the slice.
        Not Python's ``sock.recv``: that restarts itself after every signal,
        and the kernel's timeout restarts with it, so a process receiving
        signals (a profiler's, a watchdog's, SIGSTOP/SIGCONT) waited on a
        hung server until the signals stopped. Here a signal ends the
        ``recv`` (with SO_RCVTIMEO set, even a handler installed with
        SA_RESTART does), its handler runs, and the wait goes on in
        ``_recv``'s ``poll`` with only the time left.

        Only with no TIMEOUT or at least ``BLOCKING_READ_MIN_TIMEOUT`` left
        (the kernel counts in clock ticks); otherwise, and under gevent or
        TLS, ``poll`` then ``recv``.
        """
        if self._first_read_blocks and (
                deadline is None or deadline - _monotonic() >= BLOCKING_READ_MIN_TIMEOUT):
            received = _recv_waiting(self._fd, self._recv_now, _RECV_NOW_LEN, 0)
            if received > 0:
                return self._rview[:received].tobytes()
            if received == 0:
                raise ConnectionClosed("connection closed by the server")
            # A signal (EINTR; its handler has run by now), the slice over
            # (EAGAIN), or an error: _recv waits out the time left.
            err = _get_errno()
            if err not in _WOULD_BLOCK:
                data = self._second_look(err, RECV_NOW_SIZE)
                if data is not None:
                    return data
        elif self._recv_now is not None and not self._green:
            _wait(self.sock, select.POLLIN, deadline, False, self._poller)
        return self._recv(deadline)

    def _exchange_line(self, command, deadline):
        """Send ``command`` and read its one reply line in one ``_speedups``
        call (``get`` has ``_speedups.get``); raise its failure as the Python
        path would."""
        outcome = _speedups.exchange(self._fd, command, _LINES, 1, self._first_read_blocks, deadline,
                                     self.timeout, self.max_value_size, MAX_LINE,
                                     BLOCKING_READ_MIN_TIMEOUT)
        if type(outcome) is not list:
            raise _native_failure(self, outcome)
        return outcome[0]

    def _read_line(self, deadline):
        """One reply line, without its CRLF."""
        buf = self._buf
        start = 0
        while True:
            eol = buf.find(b"\r\n", start)
            if eol >= 0:
                self._buf = buf[eol + 2:]
                if eol > MAX_LINE:
                    raise ProtocolError("reply line longer than %d bytes" % MAX_LINE)
                return buf[:eol]
            if len(buf) > MAX_LINE:
                raise ProtocolError("reply line longer than %d bytes" % MAX_LINE)
            start = max(0, len(buf) - 1)
            buf += self._recv(deadline)
            self._buf = buf

    def _read_block(self, length, deadline):
        """A data block of ``length`` bytes and the CRLF after it."""
        if length < 0 or length > self.max_value_size:
            raise ProtocolError("the server declares a %d-byte value (MAX_VALUE_SIZE is %d)"
                                % (length, self.max_value_size))
        need = length + 2
        buf = self._buf
        if len(buf) < need:
            chunks = [buf]
            have = len(buf)
            while have < need:
                chunk = self._recv(deadline, min(need - have, BIG_RECV))
                chunks.append(chunk)
                have += len(chunk)
            buf = b"".join(chunks)
        if buf[length:need] != b"\r\n":
            raise ProtocolError("data block not followed by CRLF")
        self._buf = buf[need:]
        return buf[:length]

    def _expect_end_of_reply(self):
        if self._buf:
            raise ProtocolError("unexpected data after reply: %r" % self._buf[:64])

    # -- retrieval ----------------------------------------------------------

    def get(self, key, default=None):
        """``(data, flags)`` or None.

        The hot path of a Django site: a miss, or one small value that
        arrives in one ``recv``, is parsed inline; anything else goes through
        the general reader with what was already read.
        """
        if self._native_get:  # all of it in one C call, hit or miss counted
            found = _speedups.get(self, key, MAX_LINE, BLOCKING_READ_MIN_TIMEOUT)
            if found is not None and len(found) == 3:
                raise _native_failure(self, found)
            return found
        wire = self.key_prefix + key.encode("utf-8")
        deadline = self.deadline()
        self._send(b"get " + wire + b"\r\n", deadline)
        buf = self._recv_first(deadline)
        if buf == b"END\r\n":
            self.misses += 1
            return None
        eol = buf.find(b"\r\n")
        header = buf[:eol].split(b" ")
        # Lengths are checked before int(): int() of thousands of digits raises
        # ValueError, which is no protocol error and would reach the caller.
        if len(header) == 4 and header[0] == b"VALUE" and header[1] == wire and (
            header[2].isdigit() and header[3].isdigit() and len(header[2]) <= 20 and len(header[3]) <= 20
        ):
            end = eol + 2 + int(header[3])
            if len(buf) == end + 7 and buf.endswith(b"\r\nEND\r\n") and end - eol - 2 <= self.max_value_size:
                self.hits += 1
                return buf[eol + 2:end], int(header[2])
        return self._read_values({wire: key}, buf, deadline).get(key)

    def _read_values(self, keys_by_wire, buf, deadline):
        """Read ``VALUE`` blocks up to ``END``; map wire keys back to callers' keys."""
        pos = 0
        found = {}
        max_value = self.max_value_size
        while True:
            value_line = _VALUE_LINE.match(buf, pos)
            if value_line is not None:
                # The usual line, checked and split in one C call.
                wire, field, size = value_line.groups()
                start = value_line.end()
            else:
                eol = buf.find(b"\r\n", pos)
                while eol < 0:
                    if len(buf) - pos > MAX_LINE:
                        raise ProtocolError("reply line longer than %d bytes" % MAX_LINE)
                    buf = buf[pos:] + self._recv(deadline)
                    pos = 0
                    eol = buf.find(b"\r\n")
                if eol - pos > MAX_LINE:
                    raise ProtocolError("reply line longer than %d bytes" % MAX_LINE)
                if eol == pos + 3 and buf.startswith(b"END", pos):
                    if eol + 2 != len(buf):
                        raise ProtocolError("unexpected data after END: %r" % buf[eol + 2:eol + 66])
                    self.hits += len(found)
                    self.misses += len(keys_by_wire) - len(found)
                    return found
                line = buf[pos:eol]
                parts = line.split(b" ")
                if parts[0] != b"VALUE":
                    _raise_error_line(line)
                if len(parts) != 4:
                    raise ProtocolError("malformed VALUE line %r" % line[:64])
                _, wire, field, size = parts
                _check_digits(field, "flags")
                _check_digits(size, "value length")
                start = eol + 2
            flags = int(field)
            length = int(size)
            if length > max_value:
                raise ProtocolError("the server declares a %d-byte value (MAX_VALUE_SIZE is %d)"
                                    % (length, max_value))
            key = keys_by_wire.get(wire)
            if key is None or key in found:
                raise ProtocolError("reply for a key not asked for: %r" % wire[:64])
            end = start + length
            if end + 2 > len(buf):
                # A value that has not all arrived: read exactly the rest, in
                # bounded chunks, dropping what was parsed already.
                chunks = [buf[start:]]
                have = len(buf) - start
                while have < length + 2:
                    chunk = self._recv(deadline, min(length + 2 - have, BIG_RECV))
                    chunks.append(chunk)
                    have += len(chunk)
                buf = b"".join(chunks)
                start, end = 0, length
            if buf[end:end + 2] != b"\r\n":
                raise ProtocolError("data block not followed by CRLF for %r" % wire[:64])
            found[key] = (buf[start:end], flags)
            pos = end + 2

    def _wires(self, keys):
        prefix = self.key_prefix
        if prefix:
            return {prefix + key.encode("utf-8"): key for key in keys}
        return {key.encode("utf-8"): key for key in keys}

    def send_get_many(self, keys, deadline=None, defer=False):
        wires = self._wires(keys)
        self._send(b"get " + b" ".join(wires) + b"\r\n", deadline, defer)
        return wires

    def get_many_request(self, keys):
        """This connection's part of a pipelined ``get_many``, as
        ``_speedups.exchange_many`` takes it (no I/O here): C builds the
        command from the keys and puts the values it reads straight into
        the pipeline's dict, keyed by these keys."""
        return self._fd, self.key_prefix, keys, self._first_read_blocks

    def get_many_outcome(self, outcome, keys):
        """``(hits, misses)`` of ``keys`` (the values are in the pipeline's
        dict), or raise the failure (a ``(kind, errno, detail)`` outcome)."""
        if len(outcome) != 2:
            raise _native_failure(self, outcome)
        self.hits += outcome[0]
        self.misses += outcome[1]
        return outcome

    def read_get_many(self, wires, deadline=None):
        if deadline is None:
            deadline = self.deadline()
        return self._read_values(wires, self._recv(deadline), deadline)

    def get_many(self, keys):
        deadline = self.deadline()
        return self.read_get_many(self.send_get_many(keys, deadline), deadline)

    # -- storage ------------------------------------------------------------

    def send_store(self, command, items, expire, deadline=None, defer=False):
        """Send one storage command per ``key: (data, flags)`` item.

        The client has checked every field (expiry, flags, length) against
        what memcached accepts: a field memcached rejects would make it read
        the data block as the next command.
        """
        tail = b" %d " % expire
        commands = [b"%s %s %d%s%d\r\n%s\r\n" % (command, self._wire(key), flags, tail, len(data), data)
                    for key, (data, flags) in items.items()]
        self._send(b"".join(commands), deadline, defer, _tls_records(commands) if self._tls else None)
        return list(items)

    def read_store(self, keys, deadline=None):
        """``{key: None}`` for stored items, ``{key: reason}`` for the others.

        NOT_STORED (``add`` of an existing key) and SERVER_ERROR (a value
        memcached refuses, e.g. too large: it reads and drops the data, so the
        connection stays in step) are per-item outcomes, not errors.
        """
        outcome = {}
        for key, line in zip(keys, self._read_lines(len(keys), deadline), strict=True):
            outcome[key] = _store_outcome(line)
        return outcome

    def store_one(self, command, key, item, expire):
        """``None`` when stored, else the reason (NOT_STORED, SERVER_ERROR ...).

        The reply must be exactly one status line: anything more means the
        server and this client are out of step, and the connection is closed.
        """
        data, flags = item
        deadline = self.deadline()
        request = b"%s %s %d %d %d\r\n%s\r\n" % (
            command, self.key_prefix + key.encode("utf-8"), flags, expire, len(data), data)
        if self._native:
            line = self._exchange_line(request, deadline)
            return None if line == b"STORED" else _store_outcome(line)
        self._send(request, deadline)
        line = self._recv_first(deadline)
        if line == b"STORED\r\n":
            return None
        (line,) = self._read_lines(1, deadline, line)
        return _store_outcome(line)

    def _read_lines(self, count, deadline=None, buf=None):
        """Exactly ``count`` reply lines (without their CRLF), and nothing after them."""
        if buf is None:
            if deadline is None:
                deadline = self.deadline()
            buf = self._recv(deadline)
        seen = buf.count(b"\r\n")
        if seen < count:
            # Count line ends in each new chunk only (a CRLF may straddle two):
            # counting the whole reply again per chunk was quadratic.
            limit = count * MAX_LINE
            chunks = [buf]
            size = len(buf)
            last = buf
            while seen < count:
                if size > limit:
                    raise ProtocolError("reply longer than %d lines allow" % count)
                chunk = self._recv(deadline)
                seen += chunk.count(b"\r\n") + (last[-1:] == b"\r" and chunk[:1] == b"\n")
                chunks.append(chunk)
                size += len(chunk)
                last = chunk
            buf = b"".join(chunks)
        lines = buf.split(b"\r\n")
        if len(lines) != count + 1 or lines[-1]:
            raise ProtocolError("unexpected data after reply: %r" % buf[-64:])
        return lines[:count]

    # -- the rest -----------------------------------------------------------

    def send_delete_many(self, keys, deadline=None, defer=False):
        self._send(b"".join(b"delete " + self._wire(key) + b"\r\n" for key in keys), deadline, defer)
        return list(keys)

    def read_delete_many(self, keys, deadline=None):
        """``{key: True if it existed}``."""
        outcome = {}
        for key, line in zip(keys, self._read_lines(len(keys), deadline), strict=True):
            if line == b"DELETED" or line == b"NOT_FOUND":
                outcome[key] = line == b"DELETED"
            else:
                _raise_error_line(line)
        return outcome

    def delete_many(self, keys):
        deadline = self.deadline()
        return self.read_delete_many(self.send_delete_many(keys, deadline), deadline)

    def delete(self, key):
        return self.delete_many([key])[key]

    def _one_line(self, command):
        deadline = self.deadline()
        if self._native:
            return self._exchange_line(command, deadline)
        self._send(command, deadline)
        (line,) = self._read_lines(1, deadline)
        return line

    def touch(self, key, expire=0):
        line = self._one_line(b"touch %s %d\r\n" % (self._wire(key), expire))
        if line == b"TOUCHED" or line == b"NOT_FOUND":
            return line == b"TOUCHED"
        _raise_error_line(line)

    def incr(self, key, value):
        """New value, or None when the key is missing; ``value`` < 0 decrements."""
        command = b"incr" if value >= 0 else b"decr"
        line = self._one_line(b"%s %s %d\r\n" % (command, self._wire(key), abs(value)))
        if line == b"NOT_FOUND":
            return None
        # memcached's counters are unsigned 64-bit, printed without padding:
        # anything else (21 nines, a leading zero) never came from one.
        if line.isdigit() and len(line) <= 20 and (line[0] != 0x30 or len(line) == 1):
            number = int(line)
            if number < 1 << 64:
                return number
        _raise_error_line(line)

    def flush_all(self):
        line = self._one_line(b"flush_all\r\n")
        if line != b"OK":
            _raise_error_line(line)
        return True

    def version(self):
        line = self._one_line(b"version\r\n")
        if not line.startswith(b"VERSION "):
            _raise_error_line(line)
        return line[8:]

    def stats(self):
        """memcached's ``stats``: ``{name: value}``, numbers as numbers."""
        deadline = self.deadline()
        self._send(b"stats\r\n", deadline)
        result = {}
        for _ in range(10000):
            line = self._read_line(deadline)
            if line == b"END":
                self._expect_end_of_reply()
                return result
            parts = line.split(b" ", 2)
            if len(parts) != 3 or parts[0] != b"STAT":
                _raise_error_line(line)
            name, value = parts[1].decode("ascii", "replace"), parts[2].decode("ascii", "replace")
            if value.isdigit():
                value = int(value)
            else:
                try:
                    value = float(value) if "." in value else value
                except ValueError:
                    pass
            result[name] = value
        raise ProtocolError("stats reply without END")

    # -- meta get (memcached 1.6+): early refresh, see djmemcache/stampede.py --

    def meta_get(self, key, recache):
        """``(data, flags, won, cas, ttl)``, or None on a miss:
        ``mg <key> v f c t R<recache>``.

        ``won`` is memcached's W flag: the item has fewer than ``recache``
        seconds to live and this caller is the one (and only one) told to
        refresh it; the others get the value with Z. ``cas`` is the item's
        CAS value, so that the refresh is stored with ``cas`` and a write
        made meanwhile wins (0 when memcached runs with ``-C``), and ``ttl``
        its seconds left (-1: no expiry); both are None when not ``won`` or
        left out by the server. A server that does not speak meta commands answers
        ERROR (memcached < 1.6: ``ErrorReply``) or closes the connection
        (twemproxy: ``ConnectionClosed``).
        """
        deadline = self.deadline()
        self._send(b"mg %s v f c t R%d\r\n" % (self._wire(key), recache), deadline)
        buf = self._recv_first(deadline)
        if buf == b"EN\r\n":
            self.misses += 1
            return None
        # As ``get``: the whole reply in one recv is parsed here, the rest
        # goes through the general readers.
        eol = buf.find(b"\r\n")
        if eol < 0 or eol > MAX_LINE:
            self._buf = buf
            line = self._read_line(deadline)
        else:
            self._buf = buf[eol + 2:]
            line = buf[:eol]
        if line == b"EN":  # a miss that came in pieces
            self._expect_end_of_reply()
            self.misses += 1
            return None
        usual = _META_LINE.fullmatch(line)
        if usual is not None:  # memcached's own reply, checked and split in one C call
            length, flags, cas, ttl, tail = usual.groups()
            length, flags = int(length), int(flags)
            won = b"W" in tail
            cas, ttl = (int(cas), int(ttl)) if won else (None, None)  # only a refresh needs them
        else:
            length, flags, won, cas, ttl = _meta_fields(line)
        data = self._read_block(length, deadline)
        self._expect_end_of_reply()
        self.hits += 1
        return data, flags, won, cas, ttl

    def add_then_get(self, lock, item, expire, key):
        """``add`` of ``lock``, then ``get`` of ``key``, in one round trip:
        ``(None if stored else why not, (data, flags) of key or None)``."""
        data, flags = item
        wire = self._wire(key)
        deadline = self.deadline()
        add = b"add %s %d %d %d\r\n%s\r\n" % (self._wire(lock), flags, expire, len(data), data)
        get = b"get %s\r\n" % wire
        self._send(add + get, deadline, records=_tls_records((add, get)) if self._tls else None)
        self._buf = self._recv_first(deadline)
        reason = _store_outcome(self._read_line(deadline))
        buf, self._buf = self._buf, b""
        return reason, self._read_values({wire: key}, buf or self._recv(deadline), deadline).get(key)

    def cas(self, key, item, expire, cas):
        """``cas``: store ``item`` only if the key's CAS value is still
        ``cas``. None when stored, else why not: EXISTS (written since),
        NOT_FOUND (deleted or expired since), SERVER_ERROR (too large)."""
        data, flags = item
        return _store_outcome(self._one_line(b"cas %s %d %d %d %d\r\n%s\r\n" % (
            self._wire(key), flags, expire, len(data), cas, data)))


#: memcached's reply line to ``mg <key> v f c t R<n>``: length, flags, CAS
#: value, time to live, then W, Z or X (any order, each at most once).
_LINES = getattr(_speedups, "MODE_LINES", 1)


def exchange_many(requests, deadline, timeout, max_value, into=None):
    """Every request's round trip in one C call (``Client._pipeline``)."""
    return _speedups.exchange_many(requests, deadline, timeout, max_value, MAX_LINE,
                                   BLOCKING_READ_MIN_TIMEOUT, into)


def _native_failure(conn, failure):
    """The exception for a ``(kind, errno, detail)`` failure from ``_speedups``
    (or a reply line it did not expect, as bytes): the same one the Python
    path raises for the same fault."""
    if type(failure) is bytes:
        failure = (_speedups.F_ERROR_LINE, 0, failure)
    kind, err, detail = failure
    if kind == _speedups.F_ERRNO:
        return conn._socket_error(err)
    if kind == _speedups.F_CLOSED:
        return ConnectionClosed("connection closed by the server")
    if kind == _speedups.F_TIMEOUT:
        return IOTimeout("timed out")
    if kind == _speedups.F_NOMEM:  # the caller's trouble, not the server's
        return MemoryError("no memory for the reply of %s" % conn.server)
    if kind == _speedups.F_LATE:
        return IOTimeout("reply still arriving at twice TIMEOUT")
    if kind == _speedups.F_ERROR_LINE:
        try:
            _raise_error_line(detail)
        except ProtocolError as exc:
            return exc
    return ProtocolError(detail)


_META_LINE = re.compile(rb"VA (\d{1,20}) f(\d{1,20}) c(\d{1,20}) t(-1|\d{1,20})((?: [WZX])*)")


def _meta_fields(line):
    """``(length, flags, won, cas, ttl)`` of a meta get reply line in any
    other form (flags in another order, or left out: cas and ttl are then
    None); ``ProtocolError`` for anything not asked for or malformed."""
    parts = line.split(b" ")
    if parts[0] != b"VA" or len(parts) < 3:
        _raise_error_line(line)
    length = _check_digits(parts[1], "value length")
    flags = cas = ttl = None
    won = False
    for token in parts[2:]:
        kind = token[:1]
        if kind == b"f" and flags is None:
            flags = _check_digits(token[1:], "flags")
        elif kind == b"c" and cas is None:
            cas = _check_digits(token[1:], "cas value")
        elif kind == b"t" and ttl is None:
            ttl = -1 if token == b"t-1" else _check_digits(token[1:], "time to live")
        elif token == b"W":
            won = True
        elif token not in (b"Z", b"X"):
            raise ProtocolError("unexpected meta get flag %r" % token[:32])
    if flags is None:
        raise ProtocolError("meta get reply without client flags: %r" % line[:64])
    return length, flags, won, cas, ttl


def _store_outcome(line):
    if line == b"STORED":
        return None
    if line == b"NOT_STORED" or line == b"EXISTS" or line == b"NOT_FOUND" or line.startswith(b"SERVER_ERROR"):
        return line[:200].decode("ascii", "replace")
    _raise_error_line(line)
