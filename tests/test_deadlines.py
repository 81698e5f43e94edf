"""TIMEOUT ends a call however the process is interrupted and however much the server sends."""

import contextlib
import ctypes
import signal
import socket
import statistics
import struct
import threading
import time

import pytest
from fakeserver import SILENCE

from djmemcache.connection import BLOCKING_READ_MIN_TIMEOUT, BLOCKING_READ_SLICE

# Every test runs on both I/O paths: djmemcache._speedups (C) and pure Python.
pytestmark = pytest.mark.usefixtures("io_path")

SLACK = 3.0  # a loaded 2-core machine stalls threads for seconds at times


@contextlib.contextmanager
def _alarms(handler, first, every=0.0, restart=False):
    """SIGALRM handled by ``handler`` after ``first`` s, then every ``every`` s
    (``restart``: installed with SA_RESTART, as asyncio and gunicorn do)."""
    previous = signal.signal(signal.SIGALRM, handler)
    if restart:
        signal.siginterrupt(signal.SIGALRM, False)
    signal.setitimer(signal.ITIMER_REAL, first, every)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _slow_hello(line, data):
    time.sleep(0.4)
    return b"VALUE %s 0 5\r\nhello\r\nEND\r\n" % line.split(b" ")[1]


def test_periodic_signals_do_not_restart_the_timeout_of_a_call_to_a_hung_server(
        memcached_factory, make_cache):
    """A profiler's or watchdog's periodic signal used to restart the kernel
    receive timeout each time: a get on a hung server lasted until the signals
    stopped (6.5 s with TIMEOUT 0.5 and a 100 ms timer)."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.5})
    cache.set("k", "v")
    ticks = []
    server.pause()
    try:
        with _alarms(lambda *_: ticks.append(1), 0.05, 0.05):
            started = time.monotonic()
            assert cache.get("k", "missed") == "missed"
            took = time.monotonic() - started
    finally:
        server.resume()
    assert len(ticks) >= 3  # the call was interrupted, repeatedly
    assert took < 0.5 + SLACK


def test_a_signal_during_the_blocking_first_read_runs_its_handler_and_the_reply_is_still_read(
        fake_memcached, make_cache):
    """A one-server command waits for its reply in one blocking recv (bounded
    by a short SO_RCVTIMEO slice). A signal ends that recv early: its handler
    must run, and the call must go on reading the same reply, not call it a miss."""
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 2.0})
    fake_memcached.reply(_slow_hello)
    ticks = []
    with _alarms(lambda *_: ticks.append(1), 0.05, 0.05):
        value = cache.get("k")
    assert len(ticks) >= 2
    assert value == b"hello"
    assert cache.stats()[0]["in_use"] == 0 and cache.stats()[0]["state"] == "up"


def test_a_signal_handler_that_changes_errno_is_not_taken_for_a_socket_error(fake_memcached, make_cache):
    """The handler runs between the interrupted libc recv and the next line of
    Python; a ctypes call in it (here close(-1): EBADF) used to overwrite the
    errno the client then read, and a healthy server's call failed."""
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 2.0, "IGNORE_EXC": False})
    fake_memcached.reply(_slow_hello)
    libc = ctypes.CDLL(None, use_errno=True)
    with _alarms(lambda *_: libc.close(-1), 0.1):
        assert cache.get("k") == b"hello"
    assert cache.stats()[0]["state"] == "up" and cache.stats()[0]["in_use"] == 0


def test_without_timeout_a_restarting_signal_handler_still_runs_during_the_wait(memcached_factory, make_cache):
    """asyncio and gunicorn install handlers with SA_RESTART, which the kernel
    honours by restarting a recv that has no SO_RCVTIMEO: with no TIMEOUT the
    blocking read still has a kernel timeout, so the handler runs at once."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": None})
    cache.set("k", "v")

    class Stop(Exception):
        pass

    def raise_stop(*_):
        raise Stop()

    server.pause()
    resume = threading.Timer(3.0 + SLACK, server.resume)
    resume.start()
    started = time.monotonic()
    try:
        with _alarms(raise_stop, 0.2, restart=True), pytest.raises(Stop):
            cache.get("k")
        assert time.monotonic() - started < 1.0 + SLACK / 2
    finally:
        resume.cancel()
        server.resume()
    assert cache.stats()[0]["in_use"] == 0


def test_without_timeout_a_reply_later_than_the_kernel_slice_is_still_read(memcached_factory, make_cache):
    """No TIMEOUT means wait for the reply: the kernel's slice running out
    (BLOCKING_READ_SLICE) hands the wait to poll, it fails nothing."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": None, "IGNORE_EXC": False})
    cache.set("k", "v")
    server.pause()
    resume = threading.Timer(1.5, server.resume)
    resume.start()
    started = time.monotonic()
    try:
        assert cache.get("k") == "v"
    finally:
        resume.join()
    assert time.monotonic() - started >= 1.4
    assert cache.stats()[0]["state"] == "up"


@pytest.mark.parametrize("timeout", [0.3, 5.0])
def test_timeout_bounds_a_get_on_a_silent_server_to_the_millisecond(fake_memcached, make_cache, timeout):
    """The kernel times a long SO_RCVTIMEO on a coarse timer wheel (a 5 s
    TIMEOUT ran 147 ms over, 12 s 241 ms): the blocking read lasts at most a
    short slice, and poll, exact to the millisecond, waits out the rest."""
    cache = make_cache(fake_memcached.location, {"TIMEOUT": timeout})
    cache.get("warm")
    fake_memcached.reply(SILENCE)
    started = time.monotonic()
    assert cache.get("k", "missed") == "missed"
    took = time.monotonic() - started
    assert timeout - 0.001 <= took < timeout * 1.005 + 0.05  # loose for a loaded machine, not for 147 ms
    assert cache.stats()[0]["in_use"] == 0


def test_a_reset_during_the_first_read_reaches_the_caller_as_the_reset(make_cache):
    """The kernel reports a socket's error once: the read that met it must
    be the one whose error is raised, not a later read that finds only the
    end of the connection (ETIMEDOUT from TCP would lose its meaning)."""
    from djmemcache import DjmemcacheError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.recv(100)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        cache = make_cache("127.0.0.1:%d" % listener.getsockname()[1], {"TIMEOUT": 2.0, "IGNORE_EXC": False})
        with pytest.raises(DjmemcacheError) as raised:
            cache.get("k")
        assert isinstance(raised.value.__cause__, ConnectionResetError), repr(raised.value.__cause__)
    finally:
        thread.join(5)
        listener.close()


def test_a_second_look_at_a_closed_connection_raises_the_socket_error(mc1, make_cache):
    import errno

    cache = make_cache(mc1.location, {"TIMEOUT": 1.0})
    cache.set("k", "v")
    conn = cache.client.pools[0]._idle[-1]
    conn.close()
    with pytest.raises(OSError) as raised:
        conn._second_look(errno.ECONNRESET, 10)
    assert raised.value.errno == errno.ECONNRESET


def _receive_timeout(cache):
    conn = cache.client.pools[0]._idle[-1]
    seconds, micros = struct.unpack("ll", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return conn, seconds + micros / 1e6


@pytest.mark.parametrize("timeout", [0.9999996, 1.0099996, 0.5, 30, None])
def test_the_kernel_receive_timeout_is_a_short_slice_for_any_valid_timeout(mc1, make_cache, timeout):
    """A TIMEOUT whose fraction rounded up to a whole second once made
    setsockopt fail (EDOM) on every connect. The kernel is asked for a short
    slice whatever TIMEOUT is (also without one: a recv with no kernel timeout
    would be restarted after an SA_RESTART signal handler)."""
    cache = make_cache(mc1.location, {"TIMEOUT": timeout, "IGNORE_EXC": False})
    cache.set("k", "v")
    assert cache.get("k") == "v"
    conn, kernel = _receive_timeout(cache)
    assert conn._first_read_blocks
    assert abs(kernel - BLOCKING_READ_SLICE) < 0.005


@pytest.mark.parametrize("timeout", [0.001, 0.01, BLOCKING_READ_MIN_TIMEOUT / 2])
def test_short_timeout_waits_in_poll_not_in_a_kernel_timeout(mc1, make_cache, timeout):
    """The kernel counts SO_RCVTIMEO in clock ticks (4 ms at HZ=250): a 1 ms
    TIMEOUT waited 8 ms. Below BLOCKING_READ_MIN_TIMEOUT the wait is a poll."""
    cache = make_cache(mc1.location, {"TIMEOUT": timeout, "CONNECT_TIMEOUT": 1.0})
    cache.set("k", "v")
    assert cache.get("k") == "v"
    conn, kernel = _receive_timeout(cache)
    assert not conn._first_read_blocks and kernel == 0


def test_a_silent_server_costs_timeout_not_less_and_not_a_tick_more(fake_memcached, make_cache):
    """The blocking read ends a tick early by design; the poll after it must
    wait out the rest, so a call is never cut short."""
    timeout = 0.1
    fake_memcached.reply(*[SILENCE] * 7)
    cache = make_cache(fake_memcached.location, {"TIMEOUT": timeout, "BLACKLIST_TIME": 0})
    took = []
    for _ in range(7):
        started = time.monotonic()
        assert cache.get("k", "missed") == "missed"
        took.append(time.monotonic() - started)
    assert min(took) >= timeout - 0.001
    assert statistics.median(took) < timeout + SLACK / 10


def test_a_reply_flooding_in_ends_at_twice_timeout_without_starving_other_threads(
        fake_memcached, make_cache):
    """A server answering a set_many of 10,000 keys with 40 MB of long lines
    held the call for 104 s (counted again per chunk, deadline unchecked while
    bytes kept coming), and the GIL with it."""
    keys = 10_000
    fake_memcached.reply((b"A" * 4000 + b"\r\n") * (keys - 1), SILENCE)
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 0.5})
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.wait(0.01):
            ticks.append(1)

    thread = threading.Thread(target=ticker)
    thread.start()
    started = time.monotonic()
    try:
        failed = cache.set_many({"k%d" % i: 1 for i in range(keys)})
    finally:
        took = time.monotonic() - started
        stop.set()
        thread.join()
    assert len(failed) == keys
    assert took < 2 * 0.5 + SLACK
    assert len(ticks) >= took * 100 / 4  # the other thread kept running
    assert cache.stats()[0]["in_use"] == 0


def test_a_signal_while_a_long_reply_streams_in_runs_its_handler_long_before_timeout(
        fake_memcached, make_cache):
    """A signal that arrives while the reply is being read, not waited for,
    has no wait to interrupt: the C path used to run its handler only when
    the call ended (at TIMEOUT, or never with a stalled server and no
    TIMEOUT). Every wait is now at most BLOCKING_READ_SLICE long and the
    handlers run between waits."""
    size = 24 * 1024 * 1024
    # The value streams in, then the server stalls before its end.
    fake_memcached.reply((b"VALUE :1:k 0 %d\r\n" % size + b"a" * (size - 1), SILENCE))
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 20, "MAX_VALUE_SIZE": 32 * 1024 * 1024})

    class Stop(Exception):
        pass

    def raise_stop(*_):
        raise Stop()

    started = time.monotonic()
    with _alarms(raise_stop, 0.01), pytest.raises(Stop):
        cache.get("k")
    assert time.monotonic() - started < 1.0 + SLACK
    assert cache.stats()[0]["in_use"] == 0
