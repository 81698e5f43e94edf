"""DISTRIBUTION="random" for real: two twemproxy (nutcracker) processes in
front of three memcached servers, where any endpoint serves every key."""

import time

import pytest
from django.core.cache import caches
from django.test import override_settings

from djmemcache import NoServerAvailable

from helpers import Traffic, value_for

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(memcached_factory, twemproxy_factory):
    servers = [memcached_factory() for _ in range(3)]
    proxies = [twemproxy_factory(servers) for _ in range(2)]
    return servers, proxies


def test_key_set_through_one_proxy_is_read_through_the_other(make_cache, fleet):
    servers, proxies = fleet
    writer = make_cache(proxies[0].location, {"DISTRIBUTION": "random", "TIMEOUT": 1, "IGNORE_EXC": False})
    reader = make_cache(proxies[1].location, {"DISTRIBUTION": "random", "TIMEOUT": 1, "IGNORE_EXC": False})
    data = {"key-%d" % i: value_for("key-%d" % i) for i in range(300)}
    assert writer.set_many(data) == []
    assert reader.get_many(list(data)) == data
    assert all(reader.get(k) == v for k, v in list(data.items())[:20])
    assert reader.add("n", 1) is True
    assert reader.incr("n") == 2
    assert writer.get("n") == 2
    # The proxies spread the keys over the servers behind them.
    items = [s.stats()["curr_items"] for s in servers]
    print("items per server behind the proxies:", items)
    assert sum(items) == 301, items


def test_killing_one_proxy_loses_no_request_once_it_is_blacklisted(fleet):
    _servers, proxies = fleet
    settings = {"default": {
        "BACKEND": "djmemcache.backend.PyMemcacheCache",
        "LOCATION": [p.location for p in proxies],
        "OPTIONS": {"DISTRIBUTION": "random", "TIMEOUT": 0.2, "BLACKLIST_TIME": 60, "IGNORE_EXC": False},
    }}
    with override_settings(CACHES=settings):
        traffic = Traffic().start()
        try:
            time.sleep(1.0)
            proxies[0].kill()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and caches["default"].stats()[0]["state"] != "blacklisted":
                time.sleep(0.02)
            banned_at = time.monotonic()
            time.sleep(1.5)
        finally:
            traffic.stop()
        assert caches["default"].stats()[0]["state"] == "blacklisted"
        calls = traffic.since(0)
        after = traffic.since(banned_at)
        assert Traffic.wrong(calls) == []
        assert Traffic.errors(after) == []
        assert len(after) > 1000
        # Before the ban, only calls on connections to the killed proxy failed.
        assert not [e for e in Traffic.errors(calls) if isinstance(e, NoServerAvailable)]
        print("\nFAULT proxy: %d calls after one of two twemproxies was killed and blacklisted: "
              "0 errors, 0 wrong values (%d failed at the moment of the kill)"
              % (len(after), len(Traffic.errors(calls))))
