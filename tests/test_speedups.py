"""djmemcache._speedups, the optional C round trip: built where the tests run,
switched off by DJMEMCACHE_PURE_PYTHON, and giving what the pure-Python path
gives. The wire-level test modules (hostile servers, deadlines, signals) run
every test on both paths through the ``io_path`` fixture."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from fakeserver import SILENCE

from djmemcache import DjmemcacheError, connection
from djmemcache import client as client_module


def location(servers):
    return [server.location for server in servers]


def test_speedups_are_built_by_the_test_install():
    if os.environ.get("DJMEMCACHE_PURE_PYTHON"):
        pytest.skip("DJMEMCACHE_PURE_PYTHON is set")
    assert connection._speedups is not None, (
        "djmemcache._speedups was not built: setup.py builds it when a C compiler and "
        "Python's headers are there (install gcc and python3-dev, then pip install -e .), "
        "or set DJMEMCACHE_PURE_PYTHON=1 to test the pure-Python path alone"
    )


def test_djmemcache_pure_python_turns_the_extension_off():
    env = dict(os.environ, DJMEMCACHE_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", "from djmemcache import connection; print(connection._speedups)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "None"


@pytest.fixture
def native_only():
    if connection._speedups is None:
        pytest.skip("djmemcache._speedups is not built")


def _count_native_calls(monkeypatch):
    """[(name, servers asked)] of each call of get_many's two C paths."""
    calls = []

    def counting(name, real):
        def call(requests, *args):
            calls.append((name, len(requests) if name == "exchange_many" else len(args[0])))
            return real(requests, *args)
        return call

    for name in ("exchange_many", "get_pooled"):
        monkeypatch.setattr(client_module, name, counting(name, getattr(client_module, name)))
    return calls


def test_a_get_many_over_three_servers_waits_for_all_of_them_in_one_call(
        native_only, mc3, make_cache, monkeypatch):
    calls = _count_native_calls(monkeypatch)
    cache = make_cache(location(mc3))
    keys = ["k%d" % i for i in range(60)]
    cache.set_many({key: key * 3 for key in keys})
    assert cache.get_many(keys) == {key: key * 3 for key in keys}
    # one C call, one request per server, connections from the pools and back
    assert calls == [("get_pooled", 3)]
    assert [len(pool._idle) for pool in cache.client.pools] == [1, 1, 1]


def test_a_get_many_with_a_pool_out_of_idle_connections_takes_the_pipeline_with_nothing_taken(
        native_only, mc3, make_cache, monkeypatch):
    cache = make_cache(location(mc3))
    keys = ["k%d" % i for i in range(60)]
    cache.set_many({key: key for key in keys})
    pools = cache.client.pools
    busy = pools[1].acquire()  # another caller's: pool 1 has no idle connection
    idle = [list(pool._idle) for pool in pools]
    groups = cache.client._group(keys)
    into = {}
    assert connection._speedups.get_pooled(pools, groups, connection.MAX_LINE, 0.05, into) is None
    assert into == {}
    assert [list(pool._idle) for pool in pools] == idle  # nothing taken, same order
    assert all(conn.pooled for conns in idle for conn in conns)
    calls = _count_native_calls(monkeypatch)
    assert cache.get_many(keys) == {key: key for key in keys}
    assert calls == [("get_pooled", 3), ("exchange_many", 3)]
    pools[1].release(busy)
    assert [pool.status()["in_use"] for pool in pools] == [0, 0, 0]


@pytest.mark.parametrize("prefix", ["", "p:", b"bytes:"])
def test_both_io_paths_read_the_same_values(mc3, make_cache, monkeypatch, prefix):
    values = {
        "empty": b"",
        "small": "short str",
        "unicode-ключ-\u00e9": {"nested": [1, 2.5, None]},
        "crlf": b"a\r\nEND\r\nVALUE x 0 1\r\n",  # protocol words inside a value
        "int": 12345678901234567890,
        "big": os.urandom(300_000),  # many reads, and the buffer grows
        "near-limit": b"x" * (1024 * 1024 - 2048),
    }
    missing = ["missing-%d" % i for i in range(5)]
    options = {"KEY_PREFIX": prefix} if prefix else {}
    cache = make_cache(location(mc3), options)
    cache.set_many(values)

    def read():
        return ({key: cache.get(key) for key in list(values) + missing},
                cache.get_many(list(values) + missing))

    native = read()
    monkeypatch.setattr(connection, "_speedups", None)
    client_module.reset_registry()
    python = read()
    assert native == python
    singles, many = native
    assert many == values
    assert singles == {**values, **dict.fromkeys(missing)}


def test_a_get_many_of_long_keys_some_twice_reads_each_key_once(io_path, mc3, make_cache):
    """The C path builds the get command from the keys (its buffer grows for
    long ones) and asks for a key given twice once: memcached would answer
    it twice, and the second VALUE would be refused as a key not asked for."""
    cache = make_cache(location(mc3), {"KEY_PREFIX": "prefix:" * 5})
    keys = ["L" * 200 + str(i) for i in range(20)]
    cache.set_many({key: key for key in keys})
    made = [cache.make_and_validate_key(key) for key in keys]
    assert cache.client.get_many(made + made[:5] + made[-2:] + ["absent"] * 2) == dict(
        zip(made, keys, strict=True))
    stats = cache.stats()
    assert all(entry["in_use"] == 0 and entry["errors"] == 0 for entry in stats)
    # Each key counted once: 20 hits, and the absent key once.
    assert (sum(e["hits"] for e in stats), sum(e["misses"] for e in stats)) == (20, 1)


def test_a_get_of_keys_is_refused_before_anything_is_sent_when_its_arguments_are_wrong(native_only):
    """The (fd, prefix, keys, blocks) request: str keys, at least one, and a
    dict for the values."""
    speedups = connection._speedups
    args = (None, None, 2**20, connection.MAX_LINE, 0.05)
    with pytest.raises(TypeError):
        speedups.exchange_many([(-1, b"", ["k"], False)], *args)  # nowhere to put values
    for keys in ([b"k"], "k", [1]):
        with pytest.raises(TypeError):
            speedups.exchange_many([(-1, b"", keys, False)], *args, {})
    with pytest.raises(ValueError):
        speedups.exchange_many([(-1, b"", [], False)], *args, {})


def test_a_store_incr_touch_and_delete_round_trip_on_the_c_path(native_only, mc3, make_cache):
    cache = make_cache(location(mc3))
    assert cache.add("n", 1)
    assert not cache.add("n", 2)
    assert cache.incr("n", 41) == 42
    assert cache.touch("n", 60)
    assert cache.delete("n")
    assert not cache.delete("n")
    with pytest.raises(ValueError):
        cache.incr("n")
    pool = cache._client.pools[cache._client.index_for(cache.make_and_validate_key("n"))]
    assert pool.status()["in_use"] == 0


def test_a_slow_server_does_not_keep_a_fast_servers_large_reply_unread_until_timeout(
        native_only, make_cache):
    """Server A answers just inside TIMEOUT, server B at once with more than
    the socket buffers hold: B's reply is read while A is waited for (one
    poll for both), so B is neither timed out nor blacklisted."""
    from fakeserver import FakeMemcached

    timeout = 1.0
    value = b"v" * 300_000

    def slow_miss(line, data):
        time.sleep(timeout - 0.3)
        return b"END\r\n"

    def every_key(line, data):
        keys = line.split(b" ")[1:]
        return b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(value), value) for key in keys) + b"END\r\n"

    servers = [FakeMemcached(), FakeMemcached()]
    try:
        cache = make_cache([s.location for s in servers], {"TIMEOUT": timeout, "IGNORE_EXC": False})
        keys = ["key%d" % i for i in range(60)]
        client = cache._client if cache._client is not None else cache.client
        placed = {i: [k for k in keys if client.index_for(cache.make_and_validate_key(k)) == i]
                  for i in range(2)}
        assert placed[0] and placed[1]
        servers[0].reply(slow_miss)
        servers[1].reply(every_key)
        found = cache.get_many(placed[0] + placed[1])
        assert found == dict.fromkeys(placed[1], value)
        assert [s["errors"] for s in cache.stats()] == [0, 0]
    finally:
        for s in servers:
            s.stop()


@contextlib.contextmanager
def _streaming_server(header, body):
    """A server that answers one command with ``header`` then ``body`` as fast
    as the client reads (no send timeout, unlike fakeserver), then stalls."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            try:
                conn.sendall(header)
                conn.sendall(body)
            except OSError:
                return
            done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1:%d" % listener.getsockname()[1]
    finally:
        done.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("pure", [False, True], ids=["native", "python"])
def test_running_out_of_memory_for_a_reply_is_a_memory_error_not_a_server_fault(pure):
    """Under RLIMIT_AS the receive buffer cannot grow: that is the caller's
    trouble (MemoryError), not the server's, so the server is not counted
    as failing and IGNORE_EXC does not turn it into a silent miss."""
    if not pure and connection._speedups is None:
        pytest.skip("djmemcache._speedups is not built")
    script = """
import resource, sys, django
from django.conf import settings
settings.configure(CACHES={}, USE_TZ=True)
django.setup()
from djmemcache.backend import PyMemcacheCache
cache = PyMemcacheCache(sys.argv[1], {"OPTIONS": {"IGNORE_EXC": True, "TIMEOUT": 20, "MAX_VALUE_SIZE": 2**31 - 3}})
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 100 * 1024 * 1024, resource.RLIM_INFINITY))
try:
    cache.get("k")
except MemoryError:
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    stats = cache.stats()[0]
    print("MemoryError", stats["errors"], stats["in_use"])
"""
    env = dict(os.environ)
    env.pop("DJMEMCACHE_PURE_PYTHON", None)
    if pure:
        env["DJMEMCACHE_PURE_PYTHON"] = "1"
    with _streaming_server(b"VALUE :1:k 0 %d\r\n" % (400 << 20), b"a" * (256 << 20)) as where:
        out = subprocess.run([sys.executable, "-c", script, where], env=env, capture_output=True,
                             text=True, timeout=60)
    assert out.stdout.split() == ["MemoryError", "0", "0"], out.stderr[-2000:]


def test_a_socket_that_does_not_block_is_waited_for_in_poll_not_spun_on(native_only, fake_memcached):
    """``blocks`` says the socket has SO_RCVTIMEO; if a caller gets that wrong
    (a non-blocking socket), the blocking read returns at once every time:
    poll takes over instead of a busy loop until the deadline."""
    import resource
    import socket

    fake_memcached.reply(SILENCE)
    host, port = fake_memcached.location.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    try:
        before = resource.getrusage(resource.RUSAGE_THREAD)
        outcome = connection._speedups.exchange(
            sock.fileno(), b"get k\r\n", connection._speedups.MODE_GET, 1, True, time.monotonic() + 0.5, 0.5,
            2**20, connection.MAX_LINE, connection.BLOCKING_READ_MIN_TIMEOUT)
        after = resource.getrusage(resource.RUSAGE_THREAD)
    finally:
        sock.close()
    assert outcome[0] == connection._speedups.F_TIMEOUT
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 0.2


def test_a_signal_another_thread_receives_runs_its_handler_while_the_main_thread_waits(
        native_only, fake_memcached, make_cache):
    """The kernel may deliver a process's signal to any thread; Python runs
    the handler in the main thread, whose wait that signal did not
    interrupt. The C path looks for pending handlers at least every
    BLOCKING_READ_SLICE, so the handler runs while a stalled server is
    still waited for, long before TIMEOUT (it used to wait for TIMEOUT, or
    with no TIMEOUT for the stall's end)."""
    import signal

    fake_memcached.reply(SILENCE)
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 10})

    class Stop(Exception):
        pass

    def raise_stop(*_):
        raise Stop()

    previous = signal.signal(signal.SIGALRM, raise_stop)
    sender = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGALRM))
    sender.start()  # before the mask below: the sender's thread can receive it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    started = time.monotonic()
    try:
        with pytest.raises(Stop):
            cache.get("k")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        signal.signal(signal.SIGALRM, previous)
        sender.cancel()
    assert time.monotonic() - started < 2.0
    assert cache.stats()[0]["in_use"] == 0


def test_a_count_that_does_not_match_the_command_is_refused_before_anything_is_sent(native_only):
    """``count`` sizes the table of keys: a count the command cannot hold
    (once large enough to wrap the allocation) is a ValueError, as is a
    request that is not a tuple."""
    speedups = connection._speedups
    for count in (2, 2**58 + 1, 2**62):
        with pytest.raises(ValueError):
            speedups.exchange(-1, b"get k\r\n", connection._speedups.MODE_GET, count, False, None, None,
                              2**20, connection.MAX_LINE, 0.05)
    with pytest.raises(TypeError):
        speedups.exchange_many([[-1, b"get k\r\n", connection._speedups.MODE_GET, 1, False]], None, None,
                               2**20, connection.MAX_LINE, 0.05)
    for max_value, max_line in ((2**20, 0), (-1, 4096)):  # max_line divides
        with pytest.raises(ValueError):
            speedups.exchange(-1, b"touch k 0\r\n", connection._LINES, 1, False, None, None,
                              max_value, max_line, 0.05)
        with pytest.raises(ValueError):
            speedups.exchange_many([], None, None, max_value, max_line, 0.05)
    # A huge line count is only a wait (here: a closed fd, at once).
    outcome = speedups.exchange(-1, b"touch k 0\r\n", connection._LINES, 2**62, False, None,
                                None, 2**20, connection.MAX_LINE, 0.05)
    assert outcome[0] == speedups.F_ERRNO


def test_a_build_from_other_sources_is_not_used_and_says_so(native_only, monkeypatch, caplog):
    """Sources updated without rebuilding the extension: pure Python, and a
    warning that says to rebuild, not an AttributeError at import."""
    import logging

    monkeypatch.setattr(connection._speedups, "API", connection.SPEEDUPS_API - 1)
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        assert connection._load_speedups.__wrapped__() is None
    assert "rebuild" in caplog.text


def test_making_keys_in_c_survives_a_key_whose_str_changes_the_list(native_only):
    """str() of a key runs Python code: here it empties the caller's list
    while C walks it (it walks a copy)."""
    from djmemcache import backend

    keys = []

    class Shrinks:
        def __str__(self):
            keys.clear()
            return "shrinks"

    keys.extend([Shrinks(), "a", "b", "c"])
    made = backend._prefixed(":1:", keys)
    assert sorted(made) == [":1:a", ":1:b", ":1:c", ":1:shrinks"]


@pytest.mark.parametrize("timeout", [None, 2])
def test_one_get_in_c_counts_its_hit_or_miss_with_or_without_timeout(native_only, mc1, make_cache, timeout):
    """``_speedups.get`` is Connection.get's whole round trip: command,
    deadline (none without TIMEOUT), the key replied checked, hit or miss counted."""
    cache = make_cache(mc1.location, {"TIMEOUT": timeout, "KEY_PREFIX": "p\u00e9:"})
    cache.set("k\u00e9", "v")
    for _ in range(3):
        assert cache.get("k\u00e9") == "v"
        assert cache.get("nope") is None
    stats = cache.stats()[0]
    assert (stats["hits"], stats["misses"], stats["errors"]) == (3, 3, 0)
    conn = cache.client.pools[0].acquire()
    try:
        with pytest.raises(UnicodeEncodeError):
            conn.get("\ud800")  # never sent: the backend refuses such keys first
        assert conn.get("nope") is None  # the connection is still in step
    finally:
        cache.client.pools[0].release(conn)


def test_a_connection_class_with_its_own_deadline_keeps_it_for_a_get(native_only, fake_memcached):
    """_speedups.get computes the deadline from TIMEOUT itself; a subclass
    that decides its own deadline gets the Python get, which asks it."""
    from djmemcache.options import parse_options

    class Impatient(connection.Connection):
        def deadline(self):
            return time.monotonic() + 0.2

    fake_memcached.reply(SILENCE)
    opts = parse_options(fake_memcached.location, {"TIMEOUT": 3})
    conn = Impatient(opts.servers[0], opts)
    conn.connect()
    try:
        assert conn._native and not conn._native_get
        started = time.monotonic()
        with pytest.raises(connection.IOTimeout):
            conn.get("k")
        assert time.monotonic() - started < 1.5
    finally:
        conn.close()


def _three_servers_warm(memcached_factory, make_cache, options=None):
    servers = [memcached_factory() for _ in range(3)]
    cache = make_cache([s.location for s in servers], {"TIMEOUT": 2, **(options or {})})
    keys = ["k%d" % i for i in range(60)]
    cache.set_many({key: key for key in keys})  # one idle, reused connection per pool
    made = {cache.make_key(key): key for key in keys}
    groups = {index: [made[m] for m in batch] for index, batch in cache.client._group(list(made)).items()}
    assert sorted(groups) == [0, 1, 2]
    return servers, cache, keys, groups


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def _alarm_in(seconds):
    """Raise _Alarm from a SIGALRM handler ``seconds`` from now, inside the block."""
    def on_alarm(signum, frame):
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        with pytest.raises(_Alarm):
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_signal_handlers_exception_in_get_pooled_discards_every_connection_it_took(
        native_only, memcached_factory, make_cache, monkeypatch):
    servers, cache, keys, _groups = _three_servers_warm(memcached_factory, make_cache)
    calls = _count_native_calls(monkeypatch)
    servers[1].pause()  # no reply: the call is waiting when the alarm strikes
    try:
        with _alarm_in(0.2):
            cache.get_many(keys)
    finally:
        servers[1].resume()
    assert calls == [("get_pooled", 3)]
    status = [pool.status() for pool in cache.client.pools]
    # The two that answered saw the exception too: closed, not given back.
    assert [(s["in_use"], s["idle"]) for s in status] == [(0, 0)] * 3
    assert [s["state"] for s in cache.stats()] == ["up", "up", "up"]
    assert cache.get_many(keys) == {key: key for key in keys}


def test_a_server_restarted_under_get_pooled_costs_no_miss(native_only, memcached_factory, make_cache):
    servers, cache, keys, groups = _three_servers_warm(memcached_factory, make_cache)
    servers[2].restart()  # closes the pooled connection, and its items are gone
    other = make_cache([s.location for s in servers], {"TIMEOUT": 3})  # pools of its own
    assert other.set_many({key: key for key in groups[2]}) == []
    # The stale connection fails in the C path; the batch is retried once on a fresh one.
    assert cache.get_many(keys) == {key: key for key in keys}
    assert [pool.status()["in_use"] for pool in cache.client.pools] == [0, 0, 0]
    assert [s["state"] for s in cache.stats()] == ["up", "up", "up"]


def test_a_dead_server_under_get_pooled_loses_only_its_keys(native_only, memcached_factory, make_cache, caplog):
    servers, cache, keys, groups = _three_servers_warm(memcached_factory, make_cache)
    servers[0].kill()
    found = cache.get_many(keys)
    assert found == {key: key for key in keys if key not in groups[0]}
    status = [pool.status() for pool in cache.client.pools]
    assert [s["in_use"] for s in status] == [0, 0, 0]
    assert [s["idle"] for s in status] == [0, 1, 1]
    assert [s["state"] for s in cache.stats()][1:] == ["up", "up"]
    assert cache.stats()[0]["state"] != "up"


def _count_one_key_calls(monkeypatch):
    """Names of the one-key C paths called, in order."""
    calls = []

    def counting(name, real):
        def call(*args):
            calls.append(name)
            return real(*args)
        return call

    for name in ("get_placed", "store_placed"):
        monkeypatch.setattr(client_module, name, counting(name, getattr(client_module, name)))
    return calls


def test_get_and_set_are_one_c_call_each_from_placement_to_giving_back(native_only, mc3, make_cache, monkeypatch):
    cache = make_cache(location(mc3))
    cache.set("warm", 1)  # a connection to each server is opened on first use, in Python
    cache.get_many(["a%d" % i for i in range(30)])
    calls = _count_one_key_calls(monkeypatch)
    for i in range(30):
        cache.set("k%d" % i, {"n": i})
    assert [cache.get("k%d" % i) for i in range(30)] == [{"n": i} for i in range(30)]
    assert cache.get("missing") is None
    assert calls == ["store_placed"] * 30 + ["get_placed"] * 31
    assert [pool.status()["in_use"] for pool in cache.client.pools] == [0, 0, 0]
    assert sum(pool.counters()["hits"] for pool in cache.client.pools) >= 30


def test_a_one_key_c_path_with_a_busy_pool_places_the_key_and_takes_nothing(native_only, mc3, make_cache):
    cache = make_cache(location(mc3))
    cache.set("k", "v")
    client = cache.client
    key = cache.make_key("k")
    index = client._index_for(key)
    busy = client.pools[index].acquire()  # another caller's: no idle connection there
    scored = client.rendezvous.scored(client.blacklist.state[0])
    args = (connection.MAX_LINE, 0.05)
    assert connection._speedups.get_placed(client.pools, scored, key, *args) == index
    assert connection._speedups.store_placed(client.pools, scored, b"set", key, b"x", 0, 0, *args) == index
    assert cache.get("k") == "v"  # through the pool's Python path
    client.pools[index].release(busy)
    assert [pool.status()["in_use"] for pool in client.pools] == [0, 0, 0]


def test_store_placed_refuses_fields_memcached_would_misread_before_taking_anything(native_only, mc3, make_cache):
    cache = make_cache(location(mc3))
    cache.set("k", "v")
    client = cache.client
    scored = client.rendezvous.scored(client.blacklist.state[0])
    idle = [list(pool._idle) for pool in client.pools]
    for command, flags, expire in ((b"set", 2**32, 0), (b"set", -1, 0), (b"set", 2**64 + 5, 0),
                                   (b"set", -(2**64) + 7, 0), (b"set", 0, 2**31), (b"set", 0, -(2**31) - 1),
                                   (b"set x 0 0 1\r\nz\r\nset", 0, 0), (b"md k\r\n", 0, 0), (b"cas", 0, 0),
                                   (b"get", 0, 0)):
        with pytest.raises((ValueError, OverflowError)):
            connection._speedups.store_placed(client.pools, scored, command, ":1:k", b"v", flags, expire,
                                              connection.MAX_LINE, 0.05)
    with pytest.raises(TypeError):  # a list could lose a pool while the GIL is released
        connection._speedups.store_placed(list(client.pools), scored, b"set", ":1:k", b"v", 0, 0,
                                          connection.MAX_LINE, 0.05)
    assert [list(pool._idle) for pool in client.pools] == idle
    assert cache.get("k") == "v"


def test_the_one_key_c_paths_hand_back_a_failed_connection_already_discarded(
        native_only, memcached_factory, make_cache):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 2})
    cache.set("k", "v")
    client = cache.client
    scored = client.rendezvous.scored(client.blacklist.state[0])
    pool = client.pools[0]
    two = [pool.acquire(), pool.acquire()]
    for conn in two:
        pool.release(conn)
    server.kill()  # both pooled connections now lead nowhere
    args = (connection.MAX_LINE, 0.05)
    for call in (lambda: connection._speedups.get_placed(client.pools, scored, ":1:k", *args),
                 lambda: connection._speedups.store_placed(client.pools, scored, b"set", ":1:k", b"v", 0, 0,
                                                           *args)):
        pool._idle[-1].idle_since = time.monotonic()  # just used: taken without a look
        index, conn, failure = call()
        assert index == 0 and isinstance(failure, tuple)
        # Closed, its slot freed, before Python sees it: nothing raised in
        # between (a signal handler's exception) can keep it.
        assert conn.sock is None and conn in two
    assert pool.status()["in_use"] == 0


@pytest.mark.parametrize("reply, stored, closed", [
    (b"NOT_STORED\r\n", False, False),
    (b"SERVER_ERROR object too large for cache\r\n", False, False),
    (b"CLIENT_ERROR bad data chunk\r\n", False, True),
    (b"STORED\r\nSTORED\r\n", False, True),  # more than was asked: out of step
    (b"VALUE k 0 1\r\n", False, True),
])
def test_store_placed_gives_back_a_connection_only_after_an_outcome_line(
        native_only, fake_memcached, make_cache, reply, stored, closed):
    cache = make_cache(fake_memcached.location, {"IGNORE_EXC": True})
    cache.set("warm", 1)  # the connection is opened and pooled
    fake_memcached.reply(reply)
    assert cache.add("k", "v") is stored
    pool = cache.client.pools[0]
    assert pool.status()["in_use"] == 0
    assert pool.status()["idle"] == (0 if closed else 1)
    assert cache.add("k2", "v") is True  # the pool is healthy either way


def test_a_signal_handlers_exception_in_get_placed_discards_its_connection(
        native_only, memcached_factory, make_cache):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 2})
    cache.set("k", "v")  # pooled, idle
    server.pause()
    try:
        with _alarm_in(0.2):
            cache.get("k")
    finally:
        server.resume()
    status = cache.client.pools[0].status()
    assert (status["in_use"], status["idle"]) == (0, 0)  # closed, its slot freed
    assert cache.stats()[0]["state"] == "up"  # the caller's exception bans nothing
    assert cache.get("k") == "v"


def test_a_restart_under_the_one_key_c_paths_costs_no_miss(native_only, memcached_factory, make_cache):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 2})
    cache.set("warm", 1)
    server.restart()  # the pooled connection is closed by the server
    cache.client.pools[0]._idle[-1].idle_since = time.monotonic()  # and looks just used: no peek
    assert cache.set("k", "v") is None  # retried once on a fresh connection
    assert cache.client.pools[0].opened == 2
    server.restart()
    cache.client.pools[0]._idle[-1].idle_since = time.monotonic()
    assert cache.get("k") is None and cache.client.pools[0].opened == 3  # a miss: memcached lost it
    cache.set("k", "v")
    server.restart()
    cache.client.pools[0]._idle[-1].idle_since = time.monotonic()
    cache.client.pools[0].status()
    assert cache.add("k", "w") is False  # add is never retried: the failure is a miss
    assert cache.stats()[0]["state"] == "up"
    assert [pool.status()["in_use"] for pool in cache.client.pools] == [0]


def test_get_pooled_discards_a_failed_servers_connection_when_a_later_give_back_raises(
        native_only, make_cache, monkeypatch):
    from fakeserver import FakeMemcached

    from djmemcache import pool as pool_module

    servers = [FakeMemcached(), FakeMemcached()]
    try:
        cache = make_cache([s.location for s in servers], {"TIMEOUT": 0.2, "IGNORE_EXC": True})
        keys = ["key%d" % i for i in range(12)]
        cache.get_many(keys)  # one idle connection per server
        client = cache.client
        first, second = list(client._group([cache.make_key(k) for k in keys]))  # get_pooled's order
        servers[first].reply(SILENCE)  # times out: a failure set aside for the caller
        failed = client.pools[first]._idle[-1]

        class Interrupted(BaseException):
            pass

        real_release = pool_module.HostPool.release

        def release(pool, conn):  # a signal handler raising as release() returns
            real_release(pool, conn)
            if pool is client.pools[second]:
                raise Interrupted()

        monkeypatch.setattr(pool_module.HostPool, "release", release)
        waiter = pool_module._Waiter()
        client.pools[second]._waiters.append(waiter)  # someone waits: release() runs, hands it over
        with pytest.raises(Interrupted):
            cache.get_many(keys)
        assert waiter.conn is not None
        real_release(client.pools[second], waiter.conn)
        assert failed.sock is None  # closed, and its slot freed
        assert client.pools[first].status()["in_use"] == 0
    finally:
        for server in servers:
            server.stop()


def test_get_pooled_reports_failed_servers_in_server_order_as_the_pipeline_does(
        native_only, memcached_factory, make_cache):
    servers, cache, keys, _groups = _three_servers_warm(memcached_factory, make_cache, {"IGNORE_EXC": False})
    servers[2].kill()
    servers[0].kill()
    with pytest.raises(DjmemcacheError) as raised:
        cache.get_many(keys)
    assert servers[0].location in str(raised.value)
    assert [pool.status()["in_use"] for pool in cache.client.pools] == [0, 0, 0]
