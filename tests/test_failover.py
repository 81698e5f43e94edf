"""Blacklisting servers that time out or refuse, and bringing them back."""

import logging
import socket
import time

import pytest
from test_security import tls_files  # noqa: F401 - a fixture

from djmemcache import NoServerAvailable, ServerError
from djmemcache.client import MISS, Client
from djmemcache.options import parse_options
from djmemcache.servers import Rendezvous


class FakeClock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


def _keys_owned_by(nodes, index, count=20):
    ring = Rendezvous(nodes)
    everyone = tuple(range(len(nodes)))
    keys = []
    i = 0
    while len(keys) < count:
        key = ":1:key-%d" % i
        if ring.choose(key, everyone) == index:
            keys.append(key)
        i += 1
    return keys


def test_refused_server_is_blacklisted_and_its_keys_go_to_the_others(memcached_factory, caplog):
    servers = [memcached_factory() for _ in range(3)]
    servers[1].kill()  # nothing listens on its port now
    options = parse_options([s.location for s in servers], {"TIMEOUT": 0.5, "BLACKLIST_TIME": 60})
    client = Client(options)
    try:
        nodes = [s.node for s in options.servers]
        keys = _keys_owned_by(nodes, 1)
        with caplog.at_level(logging.WARNING, logger="djmemcache"):
            for key in keys:
                assert client.set(key, "v", 0) in (True, False)  # the first one meets the refusal
            for key in keys:
                client.set(key, key, 0)
                assert client.get(key) == key
        assert [e["state"] for e in client.status()] == ["up", "blacklisted", "up"]
        banned = [r.getMessage() for r in caplog.records if "blacklisted" in r.getMessage()]
        assert len(banned) == 1 and "connection refused" in banned[0]
        # Once blacklisted, calls are fast: no connect attempts at all.
        started = time.monotonic()
        for key in keys:
            client.get(key)
        assert time.monotonic() - started < 0.5
    finally:
        client.close()


def test_blacklisted_server_comes_back_after_one_successful_probe_off_the_request_path(memcached_factory):
    clock = FakeClock()
    servers = [memcached_factory() for _ in range(2)]
    options = parse_options([s.location for s in servers],
                            {"TIMEOUT": 0.5, "BLACKLIST_TIME": 30, "IGNORE_EXC": True}, clock=clock)
    client = Client(options)
    try:
        keys = _keys_owned_by([s.node for s in options.servers], 0)
        servers[0].kill()
        client.get(keys[0])  # refused: blacklisted
        assert client.blacklist.live == (1,)
        servers[0].restart()
        clock.now += 0.9
        client.get(keys[1])
        client.wait_for_probes()
        assert client.blacklist.live == (1,)  # not due: nobody probes
        clock.now += 0.1
        client.set(keys[2], "elsewhere", 0)  # starts the probe, and does not wait for it
        client.wait_for_probes()
        assert client.blacklist.live == (0, 1)
        client.set(keys[3], "back", 0)
        assert servers[0].stats()["curr_items"] == 1
    finally:
        client.close()


def test_failed_probe_doubles_the_wait_for_the_next_one(memcached_factory):
    clock = FakeClock()
    servers = [memcached_factory() for _ in range(2)]
    options = parse_options([s.location for s in servers], {"TIMEOUT": 0.5, "BLACKLIST_TIME": 30}, clock=clock)
    client = Client(options)
    try:
        servers[0].kill()
        client.flush_all()
        assert client.blacklist.live == (1,)
        clock.now += 1
        client.get(":1:any")  # starts a probe: still refused
        client.wait_for_probes()
        assert client.blacklist.live == (1,)
        assert client.blacklist.report(0)[0] == clock.now + 2
    finally:
        client.close()


def test_all_servers_down_gives_fast_misses_when_ignoring_errors(make_cache, memcached_factory):
    servers = [memcached_factory() for _ in range(2)]
    cache = make_cache([s.location for s in servers], {"TIMEOUT": 0.5})
    for s in servers:
        s.kill()
    cache.get("a")
    cache.get("b")
    cache.get("c")
    started = time.monotonic()
    assert cache.get("k", "default") == "default"
    assert cache.get_many(["a", "b"]) == {}
    assert cache.add("k", 1) is False and cache.delete("k") is False and cache.touch("k") is False
    assert cache.set_many({"a": 1, "b": 2}) == ["a", "b"]
    assert cache.has_key("k") is False
    with pytest.raises(ValueError):
        cache.incr("k")
    cache.set("k", 1)
    cache.clear()
    assert time.monotonic() - started < 0.2


def test_server_errors_name_the_server_when_not_ignored(make_cache, memcached_factory):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.5, "IGNORE_EXC": False})
    server.kill()
    with pytest.raises(ServerError) as info:
        cache.get("k")
    assert server.location in str(info.value) and "connection refused" in str(info.value)
    assert info.value.server == server.location
    with pytest.raises(NoServerAvailable, match=server.location):
        cache.get("k")


def test_hung_server_is_blacklisted_after_its_first_timeout(make_cache, memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    cache = make_cache([s.location for s in servers], {"TIMEOUT": 0.2, "BLACKLIST_TIME": 60})
    keys = ["key-%d" % i for i in range(60)]
    cache.set_many({k: k for k in keys})
    servers[2].pause()
    try:
        slow = 0
        for key in keys:
            started = time.monotonic()
            value = cache.get(key)
            if time.monotonic() - started > 0.15:
                slow += 1
            assert value in (key, None)
        assert slow == 1
        assert [e["state"] for e in cache.stats()] == ["up", "up", "blacklisted"]
    finally:
        servers[2].resume()


def test_random_distribution_uses_every_live_server(memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    options = parse_options([s.location for s in servers], {"DISTRIBUTION": "random", "TIMEOUT": 0.5})
    client = Client(options)
    try:
        conns = [client._acquire(client._index_for(None), True) for _ in range(30)]
        used = {index for index, _conn in conns}
        for index, conn in conns:
            client.pools[index].release(conn)
        assert used == {0, 1, 2}
        servers[0].kill()
        for _ in range(10):
            client.get(":1:x")  # reused idle connections to the dead server fail or are stale
        assert client.get(":1:x") is MISS
    finally:
        client.close()


def test_pipelined_many_ops_keep_the_healthy_servers_answers(make_cache, memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    cache = make_cache([s.location for s in servers], {"TIMEOUT": 0.5})
    data = {"key-%d" % i: i for i in range(60)}
    assert cache.set_many(data) == []
    servers[1].kill()
    found = cache.get_many(list(data))
    assert 0 < len(found) < 60 and all(data[k] == v for k, v in found.items())
    # The dead server's keys now go to the others: a set_many stores everything.
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data
    cache.delete_many(list(data))
    assert cache.get_many(list(data)) == {}
    strict = make_cache([s.location for s in servers], {"TIMEOUT": 0.5, "IGNORE_EXC": False, "BLACKLIST_TIME": 0})
    with pytest.raises(ServerError):
        strict.get_many(list(data))


def test_errors_pickle_with_their_details():
    import pickle

    from djmemcache import PoolTimeout

    error = pickle.loads(pickle.dumps(ServerError("down", server="a:1", command="get")))
    assert (str(error), error.server, error.command) == ("down", "a:1", "get")
    timeout = pickle.loads(pickle.dumps(PoolTimeout("full", server="a:1")))
    assert (str(timeout), timeout.server) == ("full", "a:1")
    assert isinstance(pickle.loads(pickle.dumps(NoServerAvailable("none"))), ServerError)


def test_no_retry_goes_to_a_server_another_caller_banned_meanwhile(memcached_factory):
    """A reused connection turns out closed (a retry would follow) while
    another caller's timeout has banned its server, which hangs: the call
    fails at once instead of waiting TIMEOUT for the retry."""
    import errno

    from djmemcache.connection import Connection

    server = memcached_factory()
    armed = [True]

    class ClosedAfterTheBan(Connection):
        def delete_many(self, keys):
            if armed and armed.pop():
                client.blacklist.ban(0, "get timed out (another caller)")
                server.pause()
                raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
            return super().delete_many(keys)

    options = parse_options([server.location], {"TIMEOUT": 0.5, "BLACKLIST_TIME": 30})
    client = Client(options, connection_class=ClosedAfterTheBan)
    try:
        client.set(":1:k", "v", 0)  # the connection is pooled, reused from now on
        started = time.monotonic()
        assert client.delete(":1:k") is False
        assert time.monotonic() - started < 0.25
    finally:
        server.resume()
        client.close()


@pytest.fixture
def hanging_connect(request, memcached_factory, tls_files):  # noqa: F811 - the fixture
    """A server whose connect hangs until CONNECT_TIMEOUT: a TLS memcached
    stopped with SIGSTOP (the handshake needs it to run), or, for plain
    TCP, a listener whose accept queue is full (further SYNs are dropped).
    Its location and the client OPTIONS it needs."""
    if request.param == "TLS":
        server = memcached_factory(extra_args=(
            "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (tls_files["chain"], tls_files["key"])))
        server.pause()
        yield server.location, {"TLS_CA_FILE": tls_files["ca"]}
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(listener.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.2)
    try:
        yield "127.0.0.1:%d" % listener.getsockname()[1], {}
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("hanging_connect", ["plain", "TLS"], indirect=True)
def test_a_connect_that_hangs_in_a_set_many_costs_the_healthy_server_nothing(
        make_cache, memcached_factory, tls_files, hanging_connect):  # noqa: F811
    """TIMEOUT runs from when the pipeline holds every connection: the
    healthy server's batch, larger than its socket takes at once, is sent
    in full after the other server's connect has used up CONNECT_TIMEOUT,
    and the healthy server is neither failed nor blacklisted."""
    location, options = hanging_connect
    tls = bool(options)
    healthy = memcached_factory(extra_args=(
        "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (tls_files["chain"], tls_files["key"]))) if tls \
        else memcached_factory()
    cache = make_cache([healthy.location, location], {"TIMEOUT": 1.0, "IGNORE_EXC": True, **options})
    client = cache.client
    keys = {0: [], 1: []}
    number = 0
    while len(keys[0]) < 30 or not keys[1]:
        key = "big%d" % number
        number += 1
        keys[client.index_for(cache.make_key(key), write=False)].append(key)
    del keys[0][30:]
    value = b"v" * (900 * 1024)
    assert cache.get(keys[0][0]) is None  # a pooled connection to the healthy server
    started = time.monotonic()
    failed = cache.set_many({key: value for key in keys[0] + keys[1]})
    elapsed = time.monotonic() - started
    assert sorted(failed) == sorted(keys[1])
    assert [s["state"] for s in cache.stats()] == ["up", "blacklisted"]
    assert cache.get_many(keys[0]) == {key: value for key in keys[0]}
    assert elapsed < 2 * 1.0 + 1.0  # CONNECT_TIMEOUT, then TIMEOUT at most for the rest
