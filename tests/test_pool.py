"""The per-server pool: bound, LIFO reuse, waiting, discarding, fork."""

import os
import socket
import threading
import time

import pytest

from djmemcache import PoolTimeout, ServerError
from djmemcache import pool as pool_module
from djmemcache.options import parse_options
from djmemcache.pool import HostPool, give_back, take_idle

from helpers import run_threads


def _pool(location, **options):
    opts = parse_options(location, options)
    return HostPool(opts.servers[0], opts)


def test_pool_reuses_the_last_released_connection_first(mc1):
    pool = _pool(mc1.location)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.acquire() is b
    assert pool.acquire() is a
    assert pool.opened == 2
    for conn in (a, b):
        pool.discard(conn)
    assert pool.status() == {"in_use": 0, "idle": 0, "opened": 2}


def test_pool_never_opens_more_than_max_size_under_32_threads(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=2, POOL_TIMEOUT=10)
    busy = []
    peak = []
    lock = threading.Lock()

    def work(i):
        for _ in range(50):
            conn = pool.acquire()
            with lock:
                busy.append(conn)
                peak.append(len(busy))
            conn.get("k")
            with lock:
                busy.remove(conn)
            pool.release(conn)

    assert run_threads(32, work) == []
    assert max(peak) <= 2 and pool.opened <= 2
    pool.clear_idle()


def test_full_pool_waits_then_raises_pool_timeout(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=1, POOL_TIMEOUT=0.2)
    held = pool.acquire()
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="MAX_POOL_SIZE=1"):
        pool.acquire()
    assert 0.15 < time.monotonic() - started < 2
    threading.Timer(0.1, pool.release, args=(held,)).start()
    assert pool.acquire() is held  # a waiter gets the released connection
    pool.discard(held)


def test_pool_timeout_is_a_miss_when_ignoring_errors_logged_once_a_second(make_cache, mc1, caplog):
    import logging

    cache = make_cache(mc1.location, {"MAX_POOL_SIZE": 1, "POOL_TIMEOUT": 0.01})
    cache.set("k", 1)
    held = cache.client.pools[0].acquire()
    try:
        with caplog.at_level(logging.WARNING, logger="djmemcache"):
            for _ in range(5):
                assert cache.get("k", "miss") == "miss"
                assert cache.add("x", 1) is False
    finally:
        cache.client.pools[0].release(held)
    assert len([r for r in caplog.records if "PoolTimeout" in r.getMessage() or "became free" in r.getMessage()]) == 1
    strict = make_cache(mc1.location, {"MAX_POOL_SIZE": 1, "POOL_TIMEOUT": 0.05, "IGNORE_EXC": False})
    held = strict.client.pools[0].acquire()
    try:
        with pytest.raises(PoolTimeout):
            strict.get("k")
    finally:
        strict.client.pools[0].release(held)


def test_pool_limits_at_zero_one_and_two_waiters(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=2, POOL_TIMEOUT=0)
    a = pool.acquire()
    b = pool.acquire()
    with pytest.raises(PoolTimeout):
        pool.acquire()
    pool.release(a)
    assert pool.status()["in_use"] == 1 and pool.status()["idle"] == 1
    pool.discard(b)
    assert pool.status()["in_use"] == 0
    c = pool.acquire()
    d = pool.acquire()
    assert pool.opened == 3
    pool.release(c)
    pool.release(d)
    pool.clear_idle()
    assert pool.status() == {"in_use": 0, "idle": 0, "opened": 3}


def test_connection_that_timed_out_is_never_reused(make_cache, memcached_factory):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.3, "IGNORE_EXC": False, "BLACKLIST_TIME": 0})
    cache.set("first", "first-value")
    cache.set("second", "second-value")
    server.pause()
    try:
        with pytest.raises(ServerError, match="timed out"):
            cache.get("first")  # the request is queued in the stopped server
    finally:
        server.resume()
    pool = cache.client.pools[0]
    assert pool.status()["idle"] == 0  # the timed-out connection was closed
    # The server now answers the old "get first" on the old socket; a reused
    # socket would hand that reply to the next caller.
    for _ in range(20):
        assert cache.get("second") == "second-value"
        assert cache.get("first") == "first-value"


@pytest.mark.parametrize("ignore_exc", [True, False])
def test_callers_waiting_for_a_slot_on_a_server_banned_meanwhile_do_not_wait_timeout_each(
        make_cache, memcached_factory, ignore_exc):
    """MAX_POOL_SIZE 1 and a hung server: the call holding the slot times out
    and bans the server; the five waiting for its slot give up at once,
    instead of each taking the slot and waiting TIMEOUT in turn."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.5, "MAX_POOL_SIZE": 1, "POOL_TIMEOUT": 5,
                                         "IGNORE_EXC": ignore_exc})
    cache.set("k", "v")
    server.pause()
    seen = []

    def call(_):
        started = time.monotonic()
        try:
            outcome = cache.get("k")
        except ServerError as exc:
            outcome = type(exc).__name__
        seen.append((time.monotonic() - started, outcome))

    try:
        assert run_threads(6, call) == []
    finally:
        server.resume()
    assert max(latency for latency, _outcome in seen) < 1.2  # TIMEOUT 0.5; one after another: 3 s
    expected = {None} if ignore_exc else {"ServerError", "NoServerAvailable"}
    assert {outcome for _latency, outcome in seen} <= expected
    status = cache.stats()[0]
    assert status["state"] == "blacklisted" and status["in_use"] == 0


def test_in_random_distribution_callers_waiting_on_a_server_banned_meanwhile_go_to_another(
        make_cache, memcached_factory):
    """Any live server serves any key (a fleet of proxies): a caller whose
    pool wait ended with its server banned goes to another server."""
    hung, healthy = memcached_factory(), memcached_factory()
    cache = make_cache("%s;%s" % (hung.location, healthy.location),
                       {"TIMEOUT": 0.5, "MAX_POOL_SIZE": 1, "POOL_TIMEOUT": 5, "IGNORE_EXC": False,
                        "DISTRIBUTION": "random"})
    hung.pause()
    outcomes = []

    def call(_):
        try:
            outcomes.append(cache.get("k"))
        except ServerError as exc:
            outcomes.append(type(exc).__name__)

    try:
        assert run_threads(12, call) == []
    finally:
        hung.resume()
    assert "NoServerAvailable" not in outcomes  # a live server was there for each
    # Timed out on the hung server: the call holding its slot, and at most one
    # waiter handed the slot between that call's failure and the ban.
    assert outcomes.count("ServerError") <= 2 and outcomes.count(None) == 12 - outcomes.count("ServerError")


def test_idle_connection_closed_by_server_restart_costs_the_caller_nothing(make_cache, memcached_factory):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 1, "IGNORE_EXC": False})
    for i in range(4):
        cache.set("k%d" % i, i)
    server.restart()
    assert cache.get("k0") is None  # a fresh, empty server: a miss, no error
    cache.set("k1", "again")
    assert cache.get("k1") == "again"


def test_server_idle_timeout_does_not_surface_errors(make_cache, memcached_factory):
    server = memcached_factory(extra_args=("-o", "idle_timeout=1"))
    cache = make_cache(server.location, {"TIMEOUT": 1, "IGNORE_EXC": False})
    cache.set("k", "v")
    cache.set("n", 1)
    time.sleep(2.5)  # memcached's idle timeout closes our pooled connection
    assert cache.get("k") == "v"
    time.sleep(2.5)
    assert cache.incr("n") == 2  # incr is never retried, but a stale socket is noticed first


def test_forked_children_never_use_the_parents_sockets(make_cache, mc1):
    cache = make_cache(mc1.location, {"TIMEOUT": 5, "IGNORE_EXC": False})
    cache.set("parent", "p")
    assert cache.client.pools[0].status()["idle"] == 1
    children = []
    for child in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                pool = cache.client.pools[0]
                ok = pool.status() == {"in_use": 0, "idle": 0, "opened": 0}
                for n in range(200):
                    cache.set("child-%d-%d" % (child, n), n)
                    ok = ok and cache.get("child-%d-%d" % (child, n)) == n
                code = 0 if ok and pool.opened == 1 else 1
            finally:
                os._exit(code)
        children.append(pid)
    for n in range(200):
        assert cache.get("parent") == "p"
        cache.set("parent-%d" % n, n)
        assert cache.get("parent-%d" % n) == n
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert statuses == [0, 0, 0, 0]
    assert cache.get("child-3-199") == 199


def test_pool_repr_shows_its_state(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=5)
    conn = pool.acquire()
    assert repr(pool) == "<HostPool %s in_use=1 idle=0 max=5 opened=1>" % mc1.location
    pool.release(conn)
    assert "in_use=0 idle=1" in repr(pool)
    pool.clear_idle()


def test_pool_idle_timeout_replaces_connections_idle_too_long(mc1):
    pool = _pool(mc1.location, POOL_IDLE_TIMEOUT=0.1)
    conn = pool.acquire()
    pool.release(conn)
    assert pool.acquire() is conn  # fresh enough
    old_socket = conn.sock
    pool.release(conn)
    time.sleep(0.2)
    replacement = pool.acquire()  # the same slot, on a new socket
    assert replacement.sock is not old_socket and old_socket.fileno() == -1 and pool.opened == 2
    pool.release(replacement)
    pool.clear_idle()


@pytest.mark.parametrize("no_delay, expected", [(True, 1), (False, 0)])
def test_no_delay_option_sets_tcp_nodelay(mc1, no_delay, expected):
    import socket

    pool = _pool(mc1.location, NO_DELAY=no_delay)
    conn = pool.acquire()
    try:
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == expected
    finally:
        pool.discard(conn)


# -- the common path in C (_speedups.pool_take / pool_give) -----------------

native_pool = pytest.mark.skipif(pool_module._speedups is None, reason="djmemcache._speedups is not built")


def _taken(pool):
    """As the client takes a connection."""
    return take_idle(pool) or pool.acquire()


def _given(pool, conn):
    """As the client gives one back."""
    give_back(pool, conn) or pool.release(conn)


def test_the_clients_way_of_taking_and_giving_back_reuses_lifo_and_counts_like_release(mc1):
    pool = _pool(mc1.location)
    a, b = _taken(pool), _taken(pool)
    assert a.get("k") is None and b.get("k") is None and b.get("k2") is None
    _given(pool, a)
    _given(pool, b)
    assert a.pooled and b.pooled and a.reused and b.reused
    assert (a.hits, a.misses, b.hits, b.misses) == (0, 0, 0, 0)
    assert pool.counters()["misses"] == 3
    assert pool.status() == {"in_use": 0, "idle": 2, "opened": 2}
    assert _taken(pool) is b and not b.pooled
    assert _taken(pool) is a and not a.pooled
    for conn in (a, b):
        pool.discard(conn)
    assert pool.status() == {"in_use": 0, "idle": 0, "opened": 2}


@native_pool
def test_c_common_path_steps_aside_while_any_thread_is_inside_the_pool_lock(mc1):
    pool = _pool(mc1.location)
    conn = pool.acquire()
    with pool._lock:
        assert give_back(pool, conn) is False
        assert not conn.pooled and not pool._idle
    assert give_back(pool, conn) is True and conn.pooled
    with pool._lock:
        assert take_idle(pool) is None
    assert take_idle(pool) is conn and not conn.pooled
    # Another kind of lock (gevent's, a subclass's): always the Python path.
    pool._lock = threading.RLock()
    assert give_back(pool, conn) is False and take_idle(pool) is None
    pool.release(conn)
    assert pool.acquire() is conn
    pool.discard(conn)


@native_pool
def test_c_common_path_leaves_waiters_forked_and_idle_or_closed_connections_to_python(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=1, POOL_TIMEOUT=5)
    conn = pool.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    deadline = time.monotonic() + 5
    while not pool._waiters and time.monotonic() < deadline:
        time.sleep(0.005)
    assert give_back(pool, conn) is False  # someone waits: release() hands it over
    pool.release(conn)
    waiter.join(5)
    assert got == [conn]

    conn.pid = -1  # as if opened before a fork
    assert give_back(pool, conn) is False
    conn.pid = os.getpid()
    assert give_back(pool, conn) is True

    conn.idle_since -= 1.0  # idle a while but still open: C takes it after one look
    assert take_idle(pool) is conn
    pool.release(conn)
    conn.idle_since -= 1.0
    conn.sock.shutdown(socket.SHUT_RD)  # as if the server had closed it: EOF to read
    assert take_idle(pool) is None and conn.pooled
    assert pool.acquire() is conn and conn.sock is not None and pool.opened == 2  # reconnected
    pool.release(conn)
    conn.close()  # closed while idle: acquire() reconnects it
    assert take_idle(pool) is None
    assert pool.acquire() is conn and conn.sock is not None and pool.opened == 3
    pool.discard(conn)


@native_pool
def test_c_common_path_leaves_a_connection_idle_past_pool_idle_timeout_to_python(mc1):
    pool = _pool(mc1.location, POOL_IDLE_TIMEOUT=30)
    conn = pool.acquire()
    pool.release(conn)
    conn.idle_since -= 20.0  # idle, open, within POOL_IDLE_TIMEOUT: taken after one look
    assert take_idle(pool) is conn
    pool.release(conn)
    conn.idle_since -= 40.0  # idle longer than POOL_IDLE_TIMEOUT: replaced by acquire()
    assert take_idle(pool) is None and conn.pooled
    assert pool.acquire() is conn and pool.opened == 2
    pool.discard(conn)


def test_the_clients_way_never_shares_a_connection_or_exceeds_the_bound_under_16_threads(mc1):
    pool = _pool(mc1.location, MAX_POOL_SIZE=3, POOL_TIMEOUT=10)
    busy = set()
    lock = threading.Lock()
    shared = []

    def work(i):
        for n in range(400):
            conn = _taken(pool)
            with lock:
                if id(conn) in busy:
                    shared.append(conn)
                busy.add(id(conn))
                peak = len(busy)
            assert peak <= 3
            conn.get("k")
            with lock:
                busy.discard(id(conn))
            if n % 50 == i % 50:
                pool.discard(conn)  # now and then a connection that failed
            else:
                _given(pool, conn)

    assert run_threads(16, work) == []
    assert shared == []
    status = pool.status()
    assert status["in_use"] == 0 and status["idle"] <= 3
    pool.clear_idle()


def test_a_busy_clients_gets_and_sets_take_the_common_path(make_cache, mc1, monkeypatch):
    cache = make_cache(mc1.location)
    cache.set("k", 1)
    calls = []
    acquire, release = HostPool.acquire, HostPool.release
    monkeypatch.setattr(HostPool, "acquire", lambda self, *a: calls.append("a") or acquire(self, *a))
    monkeypatch.setattr(HostPool, "release", lambda self, c: calls.append("r") or release(self, c))
    for _ in range(200):
        assert cache.get("k") == 1
        cache.set("k", 1)
    assert cache.get_many(["k", "k2"]) == {"k": 1}
    if pool_module._speedups is None:
        assert len(calls) == 2 * 401  # 200 gets, 200 sets, one get_many
    else:
        assert len(calls) < 100  # each a connection idle for a millisecond or more


@native_pool
def test_c_common_path_never_acts_on_subclasses_whose_properties_would_run_python(mc1):
    """A property runs Python code, another thread may run meanwhile, and the
    C path's reasoning (nothing else runs) no longer holds: subclasses of
    HostPool or Connection always take the Python path."""
    from djmemcache.connection import Connection

    class Traced(Connection):
        @property
        def idle_since(self):
            time.sleep(0)  # lets another thread run
            return self.__dict__.get("_since", 0.0)

        @idle_since.setter
        def idle_since(self, value):
            self.__dict__["_since"] = value

    opts = parse_options(mc1.location, {})
    pool = HostPool(opts.servers[0], opts, connection_class=Traced)
    conn = pool.acquire()
    assert give_back(pool, conn) is False
    pool.release(conn)
    assert take_idle(pool) is None and pool.acquire() is conn
    pool.discard(conn)

    class Counting(HostPool):
        def release(self, conn):
            super().release(conn)

    pool = Counting(opts.servers[0], opts)
    conn = pool.acquire()
    assert give_back(pool, conn) is False
    pool.release(conn)
    assert take_idle(pool) is None
    pool.clear_idle()


def test_the_pool_reads_the_clock_the_c_path_stamps_connections_with(mc1):
    import time as time_module

    if pool_module._speedups is None:
        assert pool_module._now is time_module.monotonic
    else:
        assert pool_module._now is pool_module._speedups.monotonic
        assert abs(pool_module._now() - time_module.monotonic()) < 0.01


def test_a_forked_child_closes_its_copies_of_connections_in_use_by_the_parents_other_threads(mc1):
    """The parent's call goes on in the parent only: a copy of its socket
    left open in the child would keep the connection alive after the parent
    resets it (a command given up on), so the rest would still be sent."""
    pool = _pool(mc1.location)
    conn = pool.acquire()  # in use, as by another thread at the fork
    fd = conn.sock.fileno()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            try:
                os.fstat(fd)
            except OSError:
                code = 0  # closed here
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert conn.get("anything") is None  # the parent's connection is untouched
    pool.release(conn)
    assert pool.status() == {"in_use": 0, "idle": 1, "opened": 1}
    pool.clear_idle()


def test_a_used_pooled_connection_keeps_within_cpythons_fast_attribute_layout(mc1):
    """CPython keeps at most 30 instance attributes in its shared-key layout;
    a 31st (two attributes added for large and TLS sends) made every
    attribute read of a pooled connection slower: a ``get`` ran 24.9k
    instructions before, 26.2k after (benchmarks/instructions.py)."""
    pool = _pool(mc1.location)
    conn = pool.acquire()
    conn.store_one(b"set", "k", (b"v", 0), 0)
    assert conn.get("k") == (b"v", 0)
    assert conn.get_many(["k", "nope"]) == {"k": (b"v", 0)}
    pool.release(conn)
    conn = pool.acquire(fresh=True)  # closed and connected again in its slot
    assert len(vars(conn)) <= 30, sorted(vars(conn))
    pool.discard(conn)
