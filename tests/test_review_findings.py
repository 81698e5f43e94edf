"""Behaviours pinned after a hostile review of main (findings 5, 8, 10, 11)."""

import logging
import pickle

import pytest

from djmemcache.serializer import FLAG_INTEGER, FLAG_SIGNED, CorruptValue, Serializer

from helpers import raw_command


def _raw_set(location, key, flags, data):
    command = b"set %s %d 0 %d\r\n%s\r\n" % (key.encode(), flags, len(data), data)
    assert raw_command(location, command, until=b"\r\n") == b"STORED\r\n"


def _errors(cache):
    return sum(server["errors"] for server in cache.stats())


# -- finding 5: SIGN_VALUES and incr/decr ------------------------------------

@pytest.mark.parametrize("ignore_exc", [True, False])
def test_incr_and_decr_work_on_integers_under_sign_values(make_cache, mc1, caplog, ignore_exc):
    cache = make_cache(mc1.location, {"SIGN_VALUES": True, "TIMEOUT": 1, "IGNORE_EXC": ignore_exc})
    cache.set("n", 1)
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        assert cache.incr("n") == 2
        assert cache.incr("n", 8) == 10
        assert cache.decr("n") == 9  # memcached pads "9 " in place
        assert cache.get("n") == 9
        assert cache.incr("n", 2**64 - 10) == 2**64 - 1
    assert caplog.records == []
    assert _errors(cache) == 0
    cache.set("big", 2**64)  # past a counter: signed like any other value
    assert cache.get("big") == 2**64
    cache.set("neg", -5)
    assert cache.get("neg") == -5


def test_unsigned_integer_items_are_only_ever_parsed_as_counters(make_cache, mc1, tmp_path):
    cache = make_cache(mc1.location, {"SIGN_VALUES": True, "TIMEOUT": 1})
    _raw_set(mc1.location, ":1:n", FLAG_INTEGER, b"41")
    assert cache.get("n") == 41  # a forged counter is a counter: no code runs
    for data in (pickle.dumps(object()), b"4_1", b"-3", b"\xd9\xa1", b"1" * 21, b""):
        _raw_set(mc1.location, ":1:n", FLAG_INTEGER, data)
        assert cache.get("n", "miss") == "miss"


def test_signed_serializer_stores_counters_as_plain_digits():
    signed = Serializer(signing_keys=["secret"])
    assert signed.dumps("k", 7) == (b"7", FLAG_INTEGER)
    assert signed.loads("k", b"7  ", FLAG_INTEGER) == 7
    data, flags = signed.dumps("k", True)  # bool is not an int here: pickled and signed
    assert flags & FLAG_SIGNED and signed.loads("k", data, flags) is True
    with pytest.raises(CorruptValue):
        signed.loads("k", b"1e3", FLAG_INTEGER)


# -- finding 11a: incr/decr of a value that is not a number --------------------

@pytest.mark.parametrize("ignore_exc", [True, False])
def test_incr_of_a_non_numeric_value_is_the_callers_error_not_the_servers(make_cache, mc1, caplog,
                                                                          ignore_exc):
    from pymemcache.exceptions import MemcacheClientError

    from djmemcache import NonNumericValue

    cache = make_cache(mc1.location, {"TIMEOUT": 1, "IGNORE_EXC": ignore_exc})
    cache.set("text", "abc")
    cache.set("pickled", [1, 2])
    cache.set("negative", -1)
    opened = cache.stats()[0]["opened"]
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        for key in ("text", "pickled", "negative"):
            for call in (cache.incr, cache.decr):
                with pytest.raises(NonNumericValue, match="memcached holds a value that is not") as info:
                    call(key)
                assert isinstance(info.value, ValueError)  # Django's incr contract
                assert isinstance(info.value, MemcacheClientError)  # Django's PyMemcacheCache's
    assert caplog.records == []
    assert cache.get_many(["text", "pickled", "negative"]) == {"text": "abc", "pickled": [1, 2],
                                                              "negative": -1}
    stats = cache.stats()[0]
    assert stats["state"] == "up" and stats["errors"] == 0 and stats["opened"] == opened
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")


# -- finding 11b: keys that have no UTF-8 form ------------------------------------

def _command_counts(location):
    stats = raw_command(location, b"stats\r\n").decode().split("\r\n")
    names = ("cmd_get", "cmd_set", "cmd_touch", "delete_misses", "delete_hits", "incr_misses",
             "decr_misses")  # not curr_connections: pools of earlier tests close on their own time
    return {line.split()[1]: line.split()[2] for line in stats if line.split()[1:2] and line.split()[1] in names}


@pytest.mark.parametrize("key", ["\ud800", "a\udfffb", "é\ud83d"])
@pytest.mark.parametrize("server", ["memcached", "fake"])
def test_key_with_a_lone_surrogate_is_an_invalid_cache_key_and_nothing_is_sent(make_cache, mc1, fake_memcached,
                                                                                server, key):
    from django.core.cache.backends.base import InvalidCacheKey

    location = mc1.location if server == "memcached" else fake_memcached.location
    before = _command_counts(mc1.location)
    cache = make_cache(location, {"TIMEOUT": 1})
    calls = [
        lambda: cache.get(key), lambda: cache.set(key, 1), lambda: cache.add(key, 1),
        lambda: cache.get_many(["ok", key]), lambda: cache.set_many({"ok": 1, key: 2}),
        lambda: cache.delete(key), lambda: cache.delete_many(["ok", key]),
        lambda: cache.touch(key), lambda: cache.incr(key), lambda: cache.has_key(key),
        lambda: cache.get_or_set(key, lambda: 1),
    ]
    for call in calls:
        with pytest.raises(InvalidCacheKey, match="lone surrogate"):
            call()
    assert fake_memcached.received == []
    assert _command_counts(mc1.location) == before


# -- finding 11c: LOCATION entries only int() or the resolver would take -----------

@pytest.mark.parametrize("location, message", [
    ("host:1_1211", "port is not a number"),
    ("host:１１２１１", "port is not a number"),
    ("host:+11211", "port is not a number"),
    ("host: 11211", "port is not a number"),
    ("h ost:11211", "host name may only have"),
    ("hôst:11211", "host name may only have"),
    ("host\t1:11211", "host name may only have"),
    ("[::1 ]:11211", "host name may only have"),
    ("[::1]11211", "expected ':port'"),
    ("unix:/tmp/a\x00b", "control character"),
])
def test_location_with_a_port_or_host_int_or_dns_would_bend_is_refused_naming_location(
        make_cache, location, message):
    from django.core.exceptions import ImproperlyConfigured

    from djmemcache.options import parse_options

    with pytest.raises(ImproperlyConfigured, match="LOCATION entry .*" + message):
        parse_options(location)
    cache = make_cache(location)
    with pytest.raises(ImproperlyConfigured, match="LOCATION entry"):
        cache.get("k")


def test_plain_location_forms_still_reach_memcached(make_cache, mc1):
    port = mc1.location.rpartition(":")[2]
    for location in ("127.0.0.1:" + port, "localhost:" + port, " 127.0.0.1:%s\n" % port):
        cache = make_cache(location, {"TIMEOUT": 1})
        cache.set("k", location)
        assert cache.get("k") == location


# -- finding 8: seconds options that reach poll or the kernel ------------------------

@pytest.mark.parametrize("name, value", [
    ("TIMEOUT", 1e10), ("TIMEOUT", 3e6), ("TIMEOUT", 86400.5), ("TIMEOUT", 1e-7), ("TIMEOUT", 0.0009),
    ("CONNECT_TIMEOUT", 1e7), ("CONNECT_TIMEOUT", 1e-9),
    ("POOL_TIMEOUT", 1e12), ("POOL_TIMEOUT", -0.1),
    ("BLACKLIST_TIME", 1e300), ("POOL_IDLE_TIMEOUT", 1e300),
    ("STAMPEDE_WAIT", 1e-9), ("STAMPEDE_WAIT", 3601),
    ("USE_POOLING", 1.0), ("IGNORE_EXC", 0.0), ("MAX_POOL_SIZE", 2**70),
])
def test_seconds_options_out_of_range_are_refused_naming_the_option(make_cache, mc1, name, value):
    from django.core.exceptions import ImproperlyConfigured

    cache = make_cache(mc1.location, {name: value})
    with pytest.raises(ImproperlyConfigured, match="OPTIONS\\[%r\\] = " % name):
        cache.get("k")


@pytest.mark.parametrize("options", [
    {"TIMEOUT": 86400, "CONNECT_TIMEOUT": 86400, "POOL_TIMEOUT": 86400, "BLACKLIST_TIME": 86400},
    {"TIMEOUT": 0.001, "CONNECT_TIMEOUT": 0.001, "POOL_TIMEOUT": 0, "BLACKLIST_TIME": 0},
    {"TIMEOUT": None, "CONNECT_TIMEOUT": None, "POOL_TIMEOUT": None, "POOL_IDLE_TIMEOUT": 86400},
])
def test_seconds_options_at_the_ends_of_their_range_work_on_memcached(make_cache, mc1, options):
    cache = make_cache(mc1.location, options)
    # A 1 ms TIMEOUT is met on loopback, except when a loaded machine stalls
    # this thread: then that call is a miss (BLACKLIST_TIME 0: nothing is
    # banned), and a later try goes through.
    for _ in range(50):
        cache.set("k", "v")
        if cache.get("k") == "v" and cache.get_many(["k"]) == {"k": "v"}:
            break
    else:
        pytest.fail("no set/get round trip in 50 tries with %r" % options)


def test_shortest_timeout_still_times_out_a_stopped_server(make_cache, memcached_factory):
    import threading

    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.001, "CONNECT_TIMEOUT": 1})
    cache.set("k", "v")
    server.pause()
    try:
        result = []
        thread = threading.Thread(target=lambda: result.append(cache.get("k", "miss")), daemon=True)
        thread.start()
        thread.join(30)  # far more than a millisecond: SO_RCVTIMEO 0 would wait forever
        assert result == ["miss"]
    finally:
        server.resume()


# -- finding 10: a server that passes the probe and fails every call -----------------

def _answers_version_only(line, data):
    from fakeserver import SILENCE

    return b"VERSION 1.6.0-flapping\r\n" if line == b"version" else SILENCE


def test_server_that_passes_probes_but_times_out_every_call_is_probed_ever_later(mc1, fake_memcached):
    from djmemcache.client import MISS, Client
    from djmemcache.options import parse_options
    from djmemcache.servers import Rendezvous

    clock = type("Clock", (), {"now": 5000.0, "__call__": lambda self: self.now})()
    fake_memcached.reply(*[_answers_version_only] * 50)
    options = parse_options([mc1.location, fake_memcached.location],
                            {"TIMEOUT": 0.2, "BLACKLIST_TIME": 30}, clock=clock)
    client = Client(options)
    ring = Rendezvous([s.node for s in options.servers])
    keys = {0: [], 1: []}
    for i in range(100):
        keys[ring.choose(":1:k%d" % i, (0, 1))].append(":1:k%d" % i)
    try:
        client.set(keys[0][0], "healthy", 0)
        delays = []
        for key in keys[1][:7]:
            assert client.get(key) is MISS  # timed out: banned
            assert client.blacklist.live == (0,)
            delays.append(client.blacklist.report(1)[0] - clock.now)
            clock.now = client.blacklist.next_probe
            assert client.get(keys[0][0]) == "healthy"  # starts the probe, which passes
            client.wait_for_probes()
            assert client.blacklist.live == (0, 1)
            clock.now += 0.5  # the next call that reaches it times out again
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # not a ban every second
        assert client.status()[1]["blacklistings"] == 7
        assert client.status()[0]["errors"] == 0
    finally:
        client.close()
