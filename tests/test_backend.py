"""Django's cache semantics against real memcached, and the process-wide pool."""

import asyncio
import contextvars
import os
import pickle
import threading
import time

import pytest
from django.core.cache import InvalidCacheKey, caches
from django.core.cache.backends.memcached import PyMemcacheCache as DjangoPyMemcacheCache
from django.test import override_settings

from djmemcache.backend import PyMemcacheCache
from djmemcache.client import client_for

from helpers import OLD_013_OPTIONS, raw_command, request, run_threads

BACKEND = "djmemcache.backend.PyMemcacheCache"


def test_djmemcache_013_settings_example_works_verbatim(mc1):
    settings = {"default": {"BACKEND": BACKEND, "LOCATION": mc1.location, "OPTIONS": dict(OLD_013_OPTIONS)}}
    with override_settings(CACHES=settings):
        cache = caches["default"]
        cache.set("greeting", "hello")
        assert cache.get("greeting") == "hello"
        # KEY_PREFIX of OPTIONS is prepended on the wire, before Django's key.
        reply = raw_command(mc1.location, b"get uuboard_prefix:1:greeting\r\n")
        assert reply.startswith(b"VALUE uuboard_prefix:1:greeting 16 5\r\nhello\r\n")


def test_every_thread_shares_one_client_and_close_keeps_connections(mc1):
    settings = {"default": {"BACKEND": BACKEND, "LOCATION": mc1.location}}
    seen = []
    with override_settings(CACHES=settings):
        def work(i):
            for n in range(20):
                def one():
                    cache = caches["default"]
                    seen.append(cache.client)
                    cache.set("k%d" % i, n)
                    assert cache.get("k%d" % i) == n
                request(one)

        before = mc1.stats()["total_connections"]
        assert run_threads(8, work) == []
        opened = mc1.stats()["total_connections"] - before - 1  # minus the stats call's own
    assert len({id(c) for c in seen}) == 1
    # 160 requests in 8 threads: at most one connection per busy thread.
    assert 1 <= opened <= 8


def test_connections_stay_within_max_pool_size_with_32_threads(mc3):
    locations = [m.location for m in mc3]
    settings = {"default": {"BACKEND": BACKEND, "LOCATION": locations,
                            "OPTIONS": {"MAX_POOL_SIZE": 3, "POOL_TIMEOUT": 10, "IGNORE_EXC": False}}}
    with override_settings(CACHES=settings):
        def work(i):
            for n in range(30):
                def one():
                    cache = caches["default"]
                    cache.set("k%d-%d" % (i, n % 5), n)
                    cache.get("k%d-%d" % (i, (n + 1) % 5))
                    cache.get_many(["k%d-%d" % (i, j) for j in range(5)])
                request(one)

        before = [m.stats()["total_connections"] for m in mc3]
        assert run_threads(32, work) == []
        opened = [m.stats()["total_connections"] - b - 1 for m, b in zip(mc3, before, strict=True)]
        pools = caches["default"].client.pools
    assert all(n <= 3 for n in opened), opened
    assert sum(p.opened for p in pools) == sum(opened)  # 960 requests, at most 9 connections


def test_timeout_none_is_forever_zero_expires_now_and_long_is_absolute(make_cache, mc1):
    cache = make_cache(mc1.location)
    cache.set("forever", 1, timeout=None)
    cache.set("now", 1, timeout=0)
    cache.set("long", 1, timeout=60 * 60 * 24 * 31)  # sent as an absolute time
    assert cache.get("forever") == 1
    assert cache.get("now") is None
    assert cache.get("long") == 1
    assert cache.get_backend_timeout(60 * 60 * 24 * 31) > time.time()


def test_versions_and_key_function(make_cache, mc1):
    cache = make_cache(mc1.location, KEY_FUNCTION=lambda key, prefix, version: "custom-%s-%s" % (version, key))
    cache.set("answer", 42, version=2)
    assert cache.get("answer") is None
    assert cache.get("answer", version=2) == 42
    assert raw_command(mc1.location, b"get custom-2-answer\r\n").startswith(b"VALUE custom-2-answer 2 2\r\n42")
    cache.incr_version("answer", version=2)
    assert cache.get("answer", version=3) == 42


def test_full_api_round_trip(make_cache, mc3):
    cache = make_cache([m.location for m in mc3])
    assert cache.add("a", 1) is True and cache.add("a", 2) is False
    assert cache.get("a") == 1 and cache.get("missing", "dflt") == "dflt"
    assert cache.set_many({"b": b"bytes", "c": "text", "d": {"x": [1]}}) == []
    assert cache.get_many(["a", "b", "c", "d", "nope"]) == {"a": 1, "b": b"bytes", "c": "text", "d": {"x": [1]}}
    assert cache.incr("a", 10) == 11 and cache.decr("a", 20) == 0
    assert cache.touch("a", 100) is True and cache.touch("nope") is False
    assert cache.has_key("b") and not cache.has_key("nope")
    assert cache.get_or_set("e", lambda: "made") == "made"
    assert cache.delete("b") is True and cache.delete("b") is False
    cache.delete_many(["c", "d"])
    assert cache.get_many(["c", "d"]) == {}
    cache.clear()
    assert cache.get("a") is None


def test_incr_and_decr_of_missing_key_raise_value_error(make_cache, mc1):
    cache = make_cache(mc1.location)
    with pytest.raises(ValueError):
        cache.incr("nope")
    with pytest.raises(ValueError):
        cache.decr("nope")


@pytest.mark.parametrize("key", ["has space", "crlf\r\nflush_all", "tab\tkey", "nul\x00", "del\x7f", "x" * 251])
def test_invalid_key_raises_and_never_reaches_the_wire(make_cache, mc1, key):
    cache = make_cache(mc1.location)
    cache.set("sentinel", "still here")
    before = mc1.stats()
    for call in (lambda: cache.get(key), lambda: cache.set(key, 1), lambda: cache.delete(key),
                 lambda: cache.get_many(["ok", key]), lambda: cache.set_many({key: 1}),
                 lambda: cache.incr(key), lambda: cache.add(key, 1), lambda: cache.touch(key)):
        with pytest.raises(InvalidCacheKey):
            call()
    after = mc1.stats()
    for stat in ("cmd_get", "cmd_set", "cmd_flush", "cmd_touch", "delete_misses", "delete_hits"):
        assert after[stat] == before[stat], stat
    assert cache.get("sentinel") == "still here"


def test_key_prefix_option_counts_in_the_250_byte_limit(make_cache, mc1):
    cache = make_cache(mc1.location, {"KEY_PREFIX": "p" * 50})
    cache.set("k" * (250 - 50 - 3), 1)  # ":1:" + key + prefix = 250 bytes
    assert cache.get("k" * (250 - 50 - 3)) == 1
    with pytest.raises(InvalidCacheKey, match="longer than 200"):
        cache.get("k" * (250 - 50 - 2))


def test_non_ascii_keys_work_and_are_limited_in_bytes(make_cache, mc1):
    cache = make_cache(mc1.location)
    cache.set("Iñtërnâtiônàlizætiøn", "value")
    assert cache.get("Iñtërnâtiônàlizætiøn") == "value"
    with pytest.raises(InvalidCacheKey):
        cache.get("清" * 83)  # 83 characters, 249 bytes + ":1:"


def test_non_ascii_keys_are_refused_when_unicode_keys_are_off(make_cache, mc1):
    cache = make_cache(mc1.location, {"ALLOW_UNICODE_KEYS": False})
    with pytest.raises(InvalidCacheKey, match="non-ASCII"):
        cache.get("clé")
    cache.set("key", 1)
    assert cache.get("key") == 1


def test_value_too_large_deletes_old_value_and_pool_stays_healthy(make_cache, mc1):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False})
    cache.set("big", "small")
    cache.set("big", "a" * (2 * 1024 * 1024))
    assert cache.get("big") is None
    assert cache.set_many({"ok1": 1, "huge": b"x" * (2 * 1024 * 1024), "ok2": 2}) == ["huge"]
    assert cache.get_many(["ok1", "ok2", "huge"]) == {"ok1": 1, "ok2": 2}
    assert cache.add("big2", "b" * (2 * 1024 * 1024)) is False
    cache.set("after", "works")
    assert cache.get("after") == "works"


def test_unpicklable_value_raises_clearly_and_pool_stays_healthy(make_cache, mc1):
    cache = make_cache(mc1.location, {"IGNORE_EXC": True})
    cache.set("k", 1)
    pool = cache.client.pools[0]
    opened = pool.opened
    for bad in (threading.Lock(), lambda: 1):
        # pickle's own error, unchanged (its wording varies: Python 3.13 says
        # "Can't get local object" for a lambda, 3.11 "Can't pickle").
        with pytest.raises(Exception) as expected:
            pickle.dumps(bad, pickle.HIGHEST_PROTOCOL)
        with pytest.raises(type(expected.value)) as info:
            cache.set("k", bad)
        assert str(info.value) == str(expected.value)
    assert cache.get("k") == 1
    assert pool.opened == opened  # no connection was harmed


def test_placement_is_compatible_with_djangos_pymemcache_backend(make_cache, mc3):
    locations = [m.location for m in mc3]
    django_cache = DjangoPyMemcacheCache(locations, {})
    try:
        django_cache.set_many({"key-%d" % i: {"n": i} for i in range(1000)})
        django_cache.set("text", "Iñtërnâtiônàlizætiøn")
        django_cache.set("number", 7)
    finally:
        django_cache.close()
    ours = make_cache(locations)
    found = ours.get_many(["key-%d" % i for i in range(1000)])
    assert found == {"key-%d" % i: {"n": i} for i in range(1000)}
    assert ours.get("text") == "Iñtërnâtiônàlizætiøn"
    assert ours.incr("number") == 8
    assert all(m.stats()["curr_items"] > 200 for m in mc3)


def test_unix_socket_location(make_cache, unix_memcached):
    cache = make_cache(unix_memcached.location)
    cache.set("k", "over unix")
    assert cache.get("k") == "over unix"


def test_ipv6_location(make_cache, ipv6_memcached):
    assert ipv6_memcached.location.startswith("[::1]:")
    cache = make_cache(ipv6_memcached.location)
    cache.set("k", "over v6")
    assert cache.get("k") == "over v6"


def test_without_pooling_close_drops_the_connection(make_cache, mc1):
    cache = make_cache(mc1.location, {"USE_POOLING": False})
    other = make_cache(mc1.location, {"USE_POOLING": False})
    assert cache.client is not other.client
    cache.set("k", 1)
    assert mc1.stats()["curr_connections"] >= 1
    status = cache.client.pools[0].status()
    assert status["idle"] == 1
    cache.close()
    assert cache.client.pools[0].status()["idle"] == 0


def test_pooled_backends_with_equal_settings_share_a_client(make_cache, mc1):
    a = make_cache(mc1.location, {"TIMEOUT": 1})
    b = make_cache(mc1.location, {"timeout": 1.0})
    c = make_cache(mc1.location, {"TIMEOUT": 2})
    assert a.client is b.client is client_for(a.config)
    assert c.client is not a.client


def test_async_calls_run_concurrently_on_several_connections(make_cache, memcached_factory):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 5, "IGNORE_EXC": False})
    cache.set("k", "v")

    async def main():
        server.pause()
        threading.Timer(0.5, server.resume).start()
        started = time.monotonic()
        values = await asyncio.gather(*[cache.aget("k") for _ in range(4)])
        return values, time.monotonic() - started

    values, elapsed = asyncio.run(main())
    assert values == ["v"] * 4
    assert elapsed < 1.5  # one after another they would take 4 x 0.5 s
    assert cache.client.pools[0].opened >= 4


def test_async_api(make_cache, mc1):
    cache = make_cache(mc1.location)

    async def main():
        await cache.aset("a", 1)
        assert await cache.aadd("a", 2) is False
        await cache.aset_many({"b": 2, "c": 3})
        assert await cache.aget_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
        assert await cache.aincr("a") == 2 and await cache.adecr("a") == 1
        assert await cache.atouch("a") is True
        assert await cache.ahas_key("a") is True
        assert await cache.aget_or_set("d", 4) == 4
        assert await cache.adelete("a") is True
        await cache.adelete_many(["b", "c"])
        assert await cache.aget("b", "gone") == "gone"
        await cache.aclear()
        assert await cache.aget("d") is None

    asyncio.run(main())


TENANT = contextvars.ContextVar("tenant", default="public")


def tenant_key(key, key_prefix, version):
    return "%s:%s:%s:%s" % (TENANT.get(), key_prefix, version, key)


def test_async_calls_see_the_callers_context_variables(make_cache, mc1):
    from django.utils import translation

    cache = make_cache(mc1.location, KEY_FUNCTION=tenant_key)

    async def as_tenant(tenant, call):
        token = TENANT.set(tenant)
        try:
            return await call()
        finally:
            TENANT.reset(token)

    async def main():
        await as_tenant("acme", lambda: cache.aset("profile", "acme-secret"))
        assert await as_tenant("evil", lambda: cache.aget("profile")) is None
        assert await as_tenant("acme", lambda: cache.aget("profile")) == "acme-secret"
        assert await as_tenant("acme", lambda: cache.aget_many(["profile"])) == {"profile": "acme-secret"}
        with translation.override("fr"):
            return await cache.aget_or_set("language", translation.get_language)

    assert asyncio.run(main()) == "fr"
    assert cache.get("language") == "fr"
    assert cache.get("profile") is None  # the "public" tenant's key


def test_async_to_sync_inside_an_async_call_runs_on_the_callers_loop(make_cache, mc1):
    """As under Django's own backends (sync_to_async): a KEY_FUNCTION or a
    default that awaits through async_to_sync reaches the request's loop,
    where its connections and events live, not a loop of its own."""
    from asgiref.sync import async_to_sync

    loops = []

    async def where():
        loops.append(asyncio.get_running_loop())

    def key_function(key, key_prefix, version):
        async_to_sync(where)()
        return "%s:%s:%s" % (key_prefix, version, key)

    cache = make_cache(mc1.location, KEY_FUNCTION=key_function)

    async def main():
        await cache.aset("k", "v")
        assert await cache.aget("k") == "v"
        return asyncio.get_running_loop()

    caller = asyncio.run(main())
    assert loops and all(loop is caller for loop in loops)


def test_backend_is_a_django_memcached_backend():
    from django.core.cache.backends.memcached import BaseMemcachedCache
    assert issubclass(PyMemcacheCache, BaseMemcachedCache)


def test_compression_reads_old_plain_items_and_writes_pymemcache_compressed_flags(make_cache, mc1):
    from pymemcache.client.base import Client as PymemcacheClient
    from pymemcache.serde import CompressedSerde

    plain = make_cache(mc1.location)
    compressing = make_cache(mc1.location, {"COMPRESS_MIN_LENGTH": 100})
    big = {"text": "lorem ipsum " * 500}
    plain.set("old", big)
    assert compressing.get("old") == big  # an item written before compression was on
    compressing.set("new", big)
    compressing.set("small", "tiny")
    header = raw_command(mc1.location, b"get :1:new\r\n").split(b"\r\n")[0].split()
    assert int(header[2]) == 1 | 8 and int(header[3]) < 500  # pickle, compressed, small
    assert plain.get("new") == big and compressing.get("small") == "tiny"
    reader = PymemcacheClient(mc1.location, serde=CompressedSerde())
    try:
        assert reader.get(":1:new") == big  # pymemcache's own compressed serde reads it
    finally:
        reader.close()


def test_get_many_reads_large_values_across_many_receives(make_cache, mc3):
    cache = make_cache([m.location for m in mc3])
    data = {"big-%d" % i: os.urandom(200_000 + i) for i in range(12)}
    data.update({"small-%d" % i: "s%d" % i for i in range(30)})
    assert cache.set_many(data) == []
    assert cache.get_many(list(data) + ["absent"]) == data
    assert cache.get("big-3") == data["big-3"]


def test_incr_refuses_a_non_integer_delta_before_the_wire(make_cache, mc1):
    cache = make_cache(mc1.location)
    cache.set("n", 1)
    for delta in (1.5, "2", None):
        with pytest.raises(TypeError, match="integer"):
            cache.incr("n", delta)
    assert cache.get("n") == 1


def test_get_many_makes_keys_as_get_does_with_a_make_and_validate_key_of_a_subclass(mc1):
    """get_many makes a batch of keys in one pass, but never past a subclass's
    own make_and_validate_key (here one that hashes long keys)."""
    import hashlib

    class Hashing(PyMemcacheCache):
        def make_and_validate_key(self, key, version=None):
            key = self.make_key(key, version=version)
            if len(key) > 200:
                key = hashlib.md5(key.encode()).hexdigest()
            self.validate_key(key)
            return key

    cache = Hashing(mc1.location, {})
    cache.set("x" * 300, 1)
    assert cache.get("x" * 300) == 1
    assert cache.get_many(["x" * 300, "y"]) == {"x" * 300: 1}


def test_get_many_makes_the_key_of_a_str_subclass_with_its_own_str_as_django_does(mc1, make_cache):
    """Django's default_key_func formats a key with %s: for an Enum member that
    is a str, or a str subclass with its own __str__, that is str(key), not its characters."""
    import enum

    class Color(str, enum.Enum):
        RED = "red"

    class Shown(str):
        def __str__(self):
            return "shown"

    cache = make_cache(mc1.location)
    cache.set(Color.RED, 1)
    cache.set(Shown("k"), 2)
    cache.set(7, 3)
    assert cache.get(Color.RED) == 1 and cache.get(Shown("k")) == 2
    assert cache.get_many([Color.RED, Shown("k"), 7]) == {Color.RED: 1, Shown("k"): 2, 7: 3}
    assert DjangoPyMemcacheCache(mc1.location, {}).make_key(Color.RED) == cache.make_and_validate_key(Color.RED)


@pytest.mark.parametrize("path", ["c", "python"])
def test_get_many_makes_every_kind_of_key_alike_in_c_or_python(mc1, make_cache, monkeypatch, path):
    """backend._made_keys makes a batch's keys in C (``_speedups.prefixed``)
    or in Python: the same keys as ``make_and_validate_key``, from any iterable."""
    import enum

    from djmemcache import backend as backend_module

    if path == "python":
        monkeypatch.setattr(backend_module, "_prefixed", None)
    elif backend_module._prefixed is None:
        pytest.skip("djmemcache._speedups is not built")

    class Color(str, enum.Enum):
        RED = "red"

    class Shown(str):
        def __str__(self):
            return "shown"

    keys = ["plain", Color.RED, Shown("k"), 7, 2.5, "ünï", ("t",)]
    cache = make_cache(mc1.location, {"ALLOW_UNICODE_KEYS": True})
    expected = {cache.make_and_validate_key(key, version=3): key for key in keys}
    assert cache._made_keys(keys, 3) == expected
    assert cache._made_keys((key for key in keys), 3) == expected
    assert cache._made_keys([], None) == {}
    cache.set_many({key: str(key) for key in keys})
    assert cache.get_many(iter(keys)) == {key: str(key) for key in keys}
