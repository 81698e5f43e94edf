"""A server back from a ban never serves a value older than what was
written while it was out: the writes it missed are deleted there first."""

import logging
import threading
import time

import pytest

from djmemcache import servers as servers_module
from djmemcache.client import MISS, Client
from djmemcache.options import parse_options
from tests.test_failover import FakeClock, _keys_owned_by


@pytest.fixture
def cluster(memcached_factory):
    """``cluster(count, **options)``: ``(servers, clock, client)``, a Client on
    a fake clock over ``count`` new memcached; all resumed and closed after."""
    made = []

    def make(count, **options):
        servers = [memcached_factory() for _ in range(count)]
        clock = FakeClock()
        client = _client(servers, clock, **options)
        made.append((servers, client))
        return servers, clock, client

    yield make
    for servers, client in made:
        for server in servers:
            server.resume()
        client.close()


def _client(servers, clock, **options):
    settings = {"TIMEOUT": 0.3, "BLACKLIST_TIME": 30, **options}
    return Client(parse_options([s.location for s in servers], settings, clock=clock))


def _stall_and_ban(client, server, key):
    """SIGSTOP ``server``; a write of ``key`` (its own) times out and bans it."""
    server.pause()
    assert client.set(key, "lost-or-not", 0) is False
    assert client.blacklist.state[1] is not None


def _bring_back(client, clock, server):
    server.resume()
    clock.now = client.blacklist.next_probe
    client.get(":1:anything")  # starts the probe
    client.wait_for_probes()
    assert client.blacklist.state[1] is None, client.status()


def test_single_server_back_from_a_stall_serves_no_value_written_or_deleted_while_it_was_out(
        cluster):
    (server,), clock, client = cluster(1)
    for key in ("a", "b", "c", "d", "counter", "untouched"):
        client.set(key, "old", 0)
    client.set("counter", 5, 0)
    _stall_and_ban(client, server, "a")  # the write that timed out: applied or not, unknown
    # Out: every write is dropped (no server), and named to the blacklist.
    assert client.set("b", "new", 0) is False
    assert client.delete("c") is False
    assert client.set_many({"d": "new"}, 0) == ["d"]
    assert client.incr("counter", 1) is None
    _bring_back(client, clock, server)
    for key in ("a", "b", "c", "d", "counter"):
        assert client.get(key) is MISS, key
    assert client.get("untouched") == "old"  # nothing else was lost
    assert server.stats()["curr_items"] == 1


def test_keys_written_to_other_servers_while_one_was_out_are_deleted_on_it_and_on_them(cluster):
    servers, clock, client = cluster(3)
    keys = _keys_owned_by([s.node for s in client.servers], 0, count=8)
    assert client.set_many({key: "old" for key in keys}, 0) == []
    _stall_and_ban(client, servers[0], keys[0])
    assert client.set(keys[1], "new", 0) is True  # to another server
    assert client.set_many({keys[2]: "new", keys[3]: "new"}, 0) == []
    assert client.delete(keys[4]) is False  # not on the others: nothing there to delete
    client.delete_many([keys[5]])
    assert client.add(keys[6], "new", 0) is True
    assert client.get(keys[1]) == "new"
    _bring_back(client, clock, servers[0])
    for key in keys[:7]:
        assert client.get(key) is MISS, key  # not "old", served by the server back
    assert client.get(keys[7]) == "old"
    # The copies the others took are gone too: a later ban of server 0
    # would send these keys there again, to values older than its own.
    assert servers[1].stats()["curr_items"] + servers[2].stats()["curr_items"] == 0


def test_a_flush_all_a_banned_server_missed_flushes_it_on_its_return(cluster):
    servers, clock, client = cluster(2)
    keys = _keys_owned_by([s.node for s in client.servers], 0, count=3)
    client.set_many({key: "old" for key in keys}, 0)
    _stall_and_ban(client, servers[0], keys[0])
    client.flush_all()  # reaches server 1 only
    _bring_back(client, clock, servers[0])
    assert client.get_many(keys) == {}
    assert servers[0].stats()["curr_items"] == 0


def test_more_missed_keys_than_the_blacklist_names_flush_the_server_on_its_return(
        cluster, monkeypatch, caplog):
    monkeypatch.setattr(servers_module, "MISSED_MAX", 3)
    (server,), clock, client = cluster(1)
    client.set_many({"k%d" % i: "old" for i in range(6)}, 0)
    _stall_and_ban(client, server, "k0")
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        for i in range(1, 5):
            client.set("k%d" % i, "new", 0)
        _bring_back(client, clock, server)
    assert client.get_many(["k%d" % i for i in range(6)]) == {}  # k5 too: flushed
    messages = [r.getMessage() for r in caplog.records]
    assert any("too many keys to name (3 " in m for m in messages)
    assert any("flushed on its return" in m for m in messages)


def test_a_probe_that_fails_during_the_repair_keeps_what_is_left_for_the_next_one(memcached_factory):
    from djmemcache.connection import Connection

    failures = [ConnectionResetError("gone mid-repair")]

    class FailsOnce(Connection):
        def delete_many(self, keys):
            if failures:
                raise failures.pop()
            return super().delete_many(keys)

    server = memcached_factory()
    clock = FakeClock()
    client = Client(parse_options([server.location], {"TIMEOUT": 0.3, "BLACKLIST_TIME": 30}, clock=clock),
                    connection_class=FailsOnce)
    try:
        client.set("k", "old", 0)
        _stall_and_ban(client, server, "k")
        client.set("k", "new", 0)  # dropped
        server.resume()
        clock.now = client.blacklist.next_probe
        client.get("x")
        client.wait_for_probes()
        assert client.blacklist.live == () and failures == []  # still out: the repair failed
        clock.now = client.blacklist.next_probe
        client.get("x")
        client.wait_for_probes()
        assert client.blacklist.live == (0,)
        assert client.get("k") is MISS
    finally:
        server.resume()
        client.close()


def test_writes_during_a_stall_and_the_return_never_leave_an_older_value_readable(make_cache, memcached_factory):
    """Threads each write their own keys with rising numbers and read them
    back, through Django's API with the defaults (one server, TIMEOUT as
    W001 asks), while the server stalls for 1.5 s and comes back: a read
    may miss, never return a number older than the last write."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.3})
    stop = threading.Event()
    older = []
    reads = [0]

    def writer(thread):
        n = 0
        keys = ["t%d-%d" % (thread, i) for i in range(20)]
        while not stop.is_set():
            n += 1
            for key in keys:
                cache.set(key, n)
            for key in keys:
                value = cache.get(key)
                reads[0] += 1
                if value is not None and value < n:
                    older.append((key, value, n))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        server.pause()
        time.sleep(1.5)
        server.resume()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cache.stats()[0]["state"] != "up":
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        server.resume()
        for t in threads:
            t.join()
    assert cache.stats()[0]["state"] == "up"
    assert older == [], older[:5]
    assert reads[0] > 100


def _keys_ranked(nodes, order, count=1, prefix=":1:rk-"):
    """Keys whose placement ranking (server indexes, best first) starts with ``order``."""
    from djmemcache.servers import Rendezvous

    ring = Rendezvous(nodes)
    keys, i = [], 0
    while len(keys) < count:
        key = "%s%d" % (prefix, i)
        i += 1
        remaining, ranking = list(range(len(nodes))), []
        while remaining:
            best = ring._choose(key, tuple(remaining))
            ranking.append(best)
            remaining.remove(best)
        if ranking[:len(order)] == list(order):
            keys.append(key)
    return keys


def _old_value_on_a_banned_server(client, server):
    """A key of server 0 set to "old"; then server 0 stalls, is banned and
    resumes (no probe yet)."""
    key, own = _keys_ranked([s.node for s in client.servers], [0], count=2)
    client.set(key, "old", 0)
    _stall_and_ban(client, server, own)
    server.resume()
    return key


def _probe(client, clock, index):
    clock.now = client.blacklist.report(index)[0]
    client.get(":1:whatever")
    client.wait_for_probes()


def test_a_key_is_named_to_every_banned_server_that_would_serve_it_before_the_one_written(
        cluster):
    """Its server out, a key goes to its second choice; that one out too, to
    the third: the second, back first, must not serve what it took."""
    servers, clock, client = cluster(3)
    nodes = [s.node for s in client.servers]
    (key,) = _keys_ranked(nodes, [0, 1, 2])
    (own0,) = _keys_ranked(nodes, [0], prefix=":1:own0-")
    (own1,) = _keys_ranked(nodes, [1], prefix=":1:own1-")
    client.set(key, "v0", 0)
    _stall_and_ban(client, servers[0], own0)
    assert client.set(key, "v1", 0) is True  # to server 1
    _stall_and_ban(client, servers[1], own1)
    assert client.set(key, "v2", 0) is True  # to server 2
    servers[1].resume()
    _probe(client, clock, 1)  # server 0 is still out
    assert client.blacklist.live == (1, 2)
    assert client.get(key) is MISS
    servers[0].resume()
    _probe(client, clock, 0)
    assert client.get(key) is MISS
    assert sum(s.stats()["curr_items"] for s in servers) == 0


def test_copies_on_a_server_banned_when_the_other_returns_are_deleted_on_its_own_return(cluster):
    servers, clock, client = cluster(3)
    nodes = [s.node for s in client.servers]
    (key,) = _keys_ranked(nodes, [0, 1, 2])
    (own0,) = _keys_ranked(nodes, [0], prefix=":1:own0-")
    (own1,) = _keys_ranked(nodes, [1, 0], prefix=":1:own1-")
    _stall_and_ban(client, servers[0], own0)
    assert client.set(key, "v1", 0) is True  # a copy on server 1
    _stall_and_ban(client, servers[1], own1)
    servers[0].resume()
    _probe(client, clock, 0)  # server 1 is out: its copy cannot be deleted now
    assert client.set(key, "v2", 0) is True  # to server 0
    servers[1].resume()
    _probe(client, clock, 1)
    _stall_and_ban(client, servers[0], own0)  # server 1 serves the key again
    assert client.get(key) is MISS  # not v1


def test_a_write_during_the_last_round_of_a_repair_waits_for_it_and_goes_to_the_server_back(
        cluster):
    servers, clock, client = cluster(2)
    nodes = [s.node for s in client.servers]
    keys = _keys_ranked(nodes, [0], count=2)
    client.set(keys[0], "old", 0)
    _stall_and_ban(client, servers[0], keys[1])
    client.set(keys[0], "new", 0)  # to server 1: named
    servers[0].resume()
    real_repair = client._repair
    writers = []

    def repair(index, conn, missed, strays):
        if client.blacklist._banned[index].closing is not None and not writers:
            writer = threading.Thread(target=client.set, args=(keys[0], "newer", 0))
            writers.append(writer)
            writer.start()
            writer.join(0.2)
            assert writer.is_alive()  # waits for the repair's end
        return real_repair(index, conn, missed, strays)

    client._repair = repair
    _probe(client, clock, 0)
    writers[0].join(5)
    assert client.get(keys[0]) == "newer"
    assert servers[0].command(b"get %s\r\n" % keys[0].encode()).count(b"VALUE") == 1


def test_a_long_repair_keeps_its_probe_claimed(cluster, monkeypatch):
    from djmemcache import client as client_module

    monkeypatch.setattr(client_module, "REPAIR_BATCH", 1)
    servers, clock, client = cluster(2)
    keys = _keys_ranked([s.node for s in client.servers], [0], count=6)
    _stall_and_ban(client, servers[0], keys[0])
    for key in keys[1:]:
        client.set(key, "new", 0)
    servers[0].resume()
    claimed_again = []
    real_hold = client.blacklist.hold

    def hold(index, seconds):
        real_hold(index, seconds)
        clock.now += client._probe_hold * 0.6  # each batch is slow
        claimed_again.extend(client.blacklist.claim_probe(client._probe_hold))

    client.blacklist.hold = hold
    _probe(client, clock, 0)
    assert claimed_again == [] and client.blacklist.live == (0, 1)


def test_a_server_whose_flush_all_failed_is_flushed_on_its_return(cluster):
    servers, clock, client = cluster(2)
    keys = _keys_ranked([s.node for s in client.servers], [0], count=2)
    client.set(keys[0], "old", 0)
    servers[0].pause()
    client.flush_all()  # times out on server 0, which is banned by it
    assert client.blacklist.live == (1,)
    servers[0].resume()
    _probe(client, clock, 0)
    assert client.get(keys[0]) is MISS


def test_a_server_that_refuses_flush_all_comes_back_with_an_error_logged(memcached_factory, caplog):
    servers = [memcached_factory(extra_args=("-F",)) for _ in range(2)]
    clock = FakeClock()
    client = _client(servers, clock)
    keys = _keys_ranked([s.node for s in client.servers], [0], count=1)
    try:
        _stall_and_ban(client, servers[0], keys[0])
        client.flush_all()  # server 1 refuses it as well (logged)
        servers[0].resume()
        with caplog.at_level(logging.ERROR, logger="djmemcache"):
            _probe(client, clock, 0)
        assert client.blacklist.live == (0, 1)
        assert any("refused flush_all" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    finally:
        for s in servers:
            s.resume()
        client.close()


def test_many_threads_writing_new_keys_while_a_server_comes_back_read_nothing_older(cluster):
    servers, clock, client = cluster(2)
    keys = _keys_ranked([s.node for s in client.servers], [0], count=6000)
    older = []
    stop = threading.Event()
    for i in range(0, len(keys), 1000):
        assert client.set_many({k: "old" for k in keys[i:i + 1000]}, 0) == []
    _stall_and_ban(client, servers[0], keys[-1])
    servers[0].resume()

    def writer(t):
        for key in keys[t:-1:6]:
            if stop.is_set():
                return
            if client.set(key, "new", 0):
                got = client.get(key)
                if got not in ("new", MISS):
                    older.append((key, got))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    _probe(client, clock, 0)
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert client.blacklist.live == (0, 1)
    assert older == [], older[:3]


def test_a_server_back_between_a_writes_placement_and_its_naming_makes_it_place_again(cluster):
    servers, clock, client = cluster(2)
    key = _old_value_on_a_banned_server(client, servers[0])
    real_choose = client.rendezvous.choose
    armed = [True]

    def choose(k, live):
        index = real_choose(k, live)  # server 1: server 0 is banned
        if k == key and armed and armed.pop():  # the writer is preempted here; the probe runs
            _probe(client, clock, 0)
        return index

    client.rendezvous.choose = choose
    assert client.set(key, "new", 0) is True
    assert client.get(key) in ("new", MISS)


def test_a_clear_while_a_banned_server_comes_back_flushes_it_too(cluster):
    servers, clock, client = cluster(2)
    key = _old_value_on_a_banned_server(client, servers[0])
    real_call = client._call

    def call(index, command, *args, **kwargs):
        if command == "flush_all" and index == 1:  # server 0 comes back meanwhile
            _probe(client, clock, 0)
        return real_call(index, command, *args, **kwargs)

    client._call = call
    client.flush_all()
    assert client.blacklist.live == (0, 1)
    assert client.get(key) is MISS


def test_the_second_deletion_of_copies_survives_close_after_each_request(cluster):
    """A write placed before the return lands after the copies were deleted:
    deleted again later, even though Django calls close() after every
    request (USE_POOLING off)."""
    servers, clock, client = cluster(2, POOL_TIMEOUT=0.2)
    nodes = [s.node for s in client.servers]
    (key,) = _keys_ranked(nodes, [0])
    own0 = _keys_ranked(nodes, [0], count=2, prefix=":1:own0-")
    client.set(key, "v0", 0)
    _stall_and_ban(client, servers[0], own0[0])
    servers[0].resume()
    real_missed = client.blacklist.missed

    def missed(index, k, written, wait=True):
        named = real_missed(index, k, written, wait)
        if k == key and named is True:  # the writer is preempted; the probe runs to its end
            client.blacklist.missed = real_missed
            _probe(client, clock, 0)
        return named

    client.blacklist.missed = missed
    assert client.set(key, "v1", 0) is True  # lands on server 1 after the copies were deleted
    client.close()
    time.sleep(client._stray_delay + 0.3)
    assert client.set(key, "v2", 0) is True  # to server 0
    clock.now += 100
    _stall_and_ban(client, servers[0], own0[1])
    assert client.get(key) in ("v2", MISS)


def test_a_server_that_hangs_in_the_last_round_of_its_repair_holds_writers_once_at_most(memcached_factory):
    """TIMEOUT None: the probe's commands are bounded anyway (PROBE_TIMEOUT),
    and writers of its keys wait for that round at most about a second,
    once, not every write."""
    servers = [memcached_factory() for _ in range(2)]
    clock = FakeClock()
    client = Client(parse_options([s.location for s in servers], {"CONNECT_TIMEOUT": 0.5, "BLACKLIST_TIME": 30},
                                  clock=clock))
    keys = _keys_ranked([s.node for s in client.servers], [0], count=5)
    try:
        client.blacklist.ban(0, "refused (a restart)")
        client.set(keys[0], "new", 0)  # to server 1, named
        real_close = client.blacklist.close

        def close(*args):
            result = real_close(*args)
            servers[0].pause()  # hangs during the last round
            return result

        client.blacklist.close = close
        clock.now = client.blacklist.report(0)[0]
        client.get(":1:x")  # starts the probe
        time.sleep(0.3)
        took = []
        for key in keys[1:]:
            started = time.monotonic()
            assert client.set(key, "new", 0) is True
            took.append(time.monotonic() - started)
        assert max(took) < 1.2 and sorted(took)[-2] < 0.1, took
        servers[0].resume()
        client.wait_for_probes(10)
        assert client.blacklist.live == (1,)  # that probe failed: still out
    finally:
        for s in servers:
            s.resume()
        client.close()


def _reban_and_read(client, clock, server, key, own):
    clock.now += 3600  # past any settle time
    _stall_and_ban(client, server, own)
    return client.get(key)


def test_copies_written_after_a_missed_flush_all_are_still_deleted(cluster):
    servers, clock, client = cluster(2)
    key, own, own2 = _keys_ranked([s.node for s in client.servers], [0], count=3)
    _stall_and_ban(client, servers[0], own)
    client.flush_all()  # server 0 is flushed on its return
    assert client.set(key, "v1", 0) is True  # a copy on server 1
    servers[0].resume()
    _probe(client, clock, 0)
    assert client.set(key, "v2", 0) is True  # to server 0
    assert _reban_and_read(client, clock, servers[0], key, own2) in (MISS, "v2")


def test_the_copies_other_servers_took_are_deleted_before_the_server_is_back(cluster, monkeypatch):
    """Deleted after its return, a copy was served again when the server was
    banned again first (dead right after its probe): older than a value
    written and read on the server back meanwhile."""
    servers, clock, client = cluster(2)
    key, own, own2 = _keys_ranked([s.node for s in client.servers], [0], count=3)
    assert client.set(key, "v1", 0) is True
    _stall_and_ban(client, servers[0], own)
    assert client.set(key, "v2", 0) is True  # a copy on server 1
    servers[0].resume()
    copies_at_return = []
    real_restore = client.blacklist.restore

    def restore(index):
        copies_at_return.append(servers[1].stats()["curr_items"])
        return real_restore(index)

    monkeypatch.setattr(client.blacklist, "restore", restore)
    _probe(client, clock, 0)
    assert copies_at_return == [0]
    assert client.set(key, "v3", 0) is True and client.get(key) == "v3"  # on server 0
    assert _reban_and_read(client, clock, servers[0], key, own2) in (MISS, "v3")


def test_a_copy_on_a_server_back_since_the_deletion_began_is_deleted_there(cluster):
    """The deletion of the copies read which servers were live, then named
    the copy on one that was not to it: back in between, it was named to
    nobody and never deleted."""
    servers, clock, client = cluster(3)
    key = ":1:copied"
    assert servers[2].command(b"set %s 0 0 2\r\nv2\r\n" % key.encode(), until=b"STORED\r\n")
    # As read at the start: server 2 out. The blacklist, asked after, says it is back.
    client.blacklist.state = ((0, 1), clock.now + 100)
    client._delete_strays(0, {key: 1 << 2})
    assert servers[2].stats()["curr_items"] == 0


def test_writers_waiting_for_a_return_wait_for_the_last_rounds_copies_only_deleted_in_batches(
        cluster, monkeypatch):
    """Each round deletes the copies of its own keys: the last one, which
    writers wait for, deleted every copy of every round. And in batches of
    REPAIR_BATCH, each with its own TIMEOUT: 90,000 in one pipeline outlasted
    a short TIMEOUT and banned the healthy server that held them."""
    from djmemcache import client as client_module

    monkeypatch.setattr(client_module, "REPAIR_BATCH", 3)
    servers, clock, client = cluster(2)
    nodes = [s.node for s in client.servers]
    own = _keys_ranked(nodes, [0], count=1, prefix=":1:own-")[0]
    keys = _keys_ranked(nodes, [0], count=10, prefix=":1:copy-")
    _stall_and_ban(client, servers[0], own)
    assert client.set_many({key: "v" for key in keys}, 0) == []  # copies on server 1
    assert servers[1].stats()["curr_items"] == 10
    servers[0].resume()
    deleted = []  # (copies, while writers wait)
    real_delete, real_pipeline = client._delete_strays, client._pipeline
    sizes = []

    def delete_strays(index, strays, hold=False):
        deleted.append((len(strays), client.blacklist._banned[0].closing is not None))
        return real_delete(index, strays, hold)

    def pipeline(command, groups, *args, **kwargs):
        sizes.extend(len(keys) for keys in groups.values())
        return real_pipeline(command, groups, *args, **kwargs)

    monkeypatch.setattr(client, "_delete_strays", delete_strays)
    monkeypatch.setattr(client, "_pipeline", pipeline)
    _probe(client, clock, 0)
    assert client.blacklist.state[1] is None
    assert servers[1].stats()["curr_items"] == 0
    assert sum(n for n, _waiting in deleted) == 10
    assert sum(n for n, waiting in deleted if waiting) <= 3
    assert sizes and max(sizes) <= 3


def test_a_repair_that_fails_in_its_last_round_gives_back_the_copies_of_the_rounds_before(
        cluster, monkeypatch):
    from djmemcache import client as client_module
    from djmemcache.connection import Connection

    monkeypatch.setattr(client_module, "REPAIR_BATCH", 3)
    servers, clock, client = cluster(2)
    nodes = [s.node for s in client.servers]
    key, own, own2, late = _keys_ranked(nodes, [0], count=4)
    many = _keys_ranked(nodes, [0], count=5, prefix=":1:many-")
    calls = []

    class ResetInTheLastRound(Connection):
        def delete_many(self, keys):
            calls.append(len(keys))
            if len(calls) == 1:
                client.blacklist.missed(0, late, 1, wait=False)  # a write during the first round
            elif client.blacklist._banned[0].closing is not None:
                raise ConnectionResetError(104, "reset")
            return super().delete_many(keys)

    _stall_and_ban(client, servers[0], own)
    client.set_many({m: "x" for m in many}, 0)
    assert client.set(key, "v1", 0) is True  # a copy on server 1, deleted after the first round
    servers[0].resume()
    client.connection_class = ResetInTheLastRound
    _probe(client, clock, 0)
    assert client.blacklist.live == (1,)  # that probe failed
    client.connection_class = Connection
    _probe(client, clock, 0)
    assert client.blacklist.live == (0, 1)
    assert client.set(key, "v2", 0) is True
    assert _reban_and_read(client, clock, servers[0], key, own2) in (MISS, "v2")


def test_get_or_set_reads_during_a_ban_name_no_key(memcached_factory, make_cache):
    servers = [memcached_factory() for _ in range(2)]
    cache = make_cache([s.location for s in servers], {"EARLY_REFRESH": 4, "TIMEOUT": 0.3}, TIMEOUT=600)
    client = cache.client
    names = ["k%d" % i for i in range(200)]
    home = [n for n in names if client.rendezvous._choose(cache.make_and_validate_key(n), (0, 1)) == 0]
    hot, banner = home[:2]
    try:
        servers[0].pause()
        cache.set(banner, "x", 600)  # times out: server 0 banned
        assert client.blacklist.live == (1,)
        client.set(cache.make_and_validate_key(hot), "valid", 600)  # a copy on server 1
        client.blacklist.missed_by(0)  # forget that write: only the read below is left
        assert cache.get_or_set(hot, lambda: "computed", 600) == "valid"  # a hit
        assert client.blacklist.missed_by(0) == {}
    finally:
        servers[0].resume()


def test_a_probe_connect_is_bounded_even_without_timeout(monkeypatch):
    """TIMEOUT None: a host that drops SYNs (a full accept queue here) must
    not hold the probe, and the writers that may wait for its repair."""
    import socket

    from djmemcache import client as client_module

    monkeypatch.setattr(client_module, "PROBE_TIMEOUT", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue: further SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        time.sleep(0.2)
        client = Client(parse_options(["127.0.0.1:%d" % port], {"BLACKLIST_TIME": 30}))
        client.blacklist.ban(0, "test")
        started = time.monotonic()
        client._probe(0)
        assert time.monotonic() - started < 3
        assert client.blacklist.live == ()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_stats_count_the_keys_a_repair_under_way_deletes(memcached_factory):
    from djmemcache.connection import Connection

    gate, entered = threading.Event(), threading.Event()

    class SlowRepair(Connection):
        def delete_many(self, keys):
            entered.set()
            gate.wait(5)
            return super().delete_many(keys)

    servers = [memcached_factory(), memcached_factory()]
    clock = FakeClock()
    client = Client(parse_options([s.location for s in servers], {"TIMEOUT": 0.5, "BLACKLIST_TIME": 30},
                                  clock=clock), connection_class=SlowRepair)
    try:
        client.blacklist.ban(1, "get timed out")
        client.set_many({":1:k%d" % i: i for i in range(40)}, 0)
        before = client.status()[1]
        assert before["missed_keys"] > 0 and before["flush_on_return"] is False
        clock.now = client.blacklist.report(1)[0]
        client.get(":1:whatever")  # starts the probe; its repair waits in delete_many
        assert entered.wait(5)
        during = client.status()[1]
        assert during["state"] == "blacklisted" and during["missed_keys"] == before["missed_keys"]
    finally:
        gate.set()
        client.wait_for_probes()
        client.close()
    assert client.status()[1]["state"] == "up" and client.status()[1]["missed_keys"] == 0
