"""Django settings for the test run, and fixtures giving real memcached processes."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py, tests/memcached.py

from memcached import MemcachedProcess, Twemproxy, ipv6_loopback_available  # noqa: E402


def pytest_configure(config):
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="djmemcache-tests-" + "x" * 40,
            INSTALLED_APPS=[
                "django.contrib.contenttypes",
                "django.contrib.auth",
                "django.contrib.sessions",
                "djmemcache",
            ],
            CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            USE_TZ=True,
        )
        django.setup()


@pytest.fixture(autouse=True)
def _fresh_pools():
    """Each test starts with no process-wide pools, and leaves none open."""
    from djmemcache.client import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture(params=["native", "python"])
def io_path(request, monkeypatch):
    """Run a test on both I/O paths: through ``djmemcache._speedups`` (C) and
    in pure Python (what runs without a compiler, under gevent, over TLS).
    Modules that test the wire use it with ``pytestmark``."""
    from djmemcache import backend, client, connection, serializer

    if request.param == "python":
        monkeypatch.setattr(connection, "_speedups", None)
        # and the rest of _speedups: the pool's common path, decoding, key making
        monkeypatch.setattr(client, "take_idle", lambda pool: None)
        monkeypatch.setattr(client, "give_back", lambda pool, conn: False)
        monkeypatch.setattr(client, "get_pooled", None)
        monkeypatch.setattr(client, "get_placed", None)
        monkeypatch.setattr(client, "store_placed", None)
        monkeypatch.setattr(serializer, "_decode_many", None)
        monkeypatch.setattr(backend, "_prefixed", None)
    elif connection._speedups is None:
        pytest.skip("djmemcache._speedups is not built (see tests/test_speedups.py)")
    return request.param


@pytest.fixture(scope="session")
def _shared_servers():
    servers = [MemcachedProcess().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.kill()  # SIGTERM would cost memcached up to a second each


@pytest.fixture
def mc3(_shared_servers):
    """Three memcached servers, flushed; restarted or resumed if a test broke one."""
    for server in _shared_servers:
        if not server.running:
            server.restart()
        server.resume()
        server.flush()
    return _shared_servers


@pytest.fixture
def mc1(mc3):
    return mc3[0]


@pytest.fixture
def memcached_factory():
    """Start dedicated servers (for tests that kill, stop or restart them)."""
    started = []

    def start(**kwargs):
        server = MemcachedProcess(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()  # SIGTERM would cost memcached up to a second each


@pytest.fixture
def unix_memcached(tmp_path):
    server = MemcachedProcess(unix_path=str(tmp_path / "memcached.sock")).start()
    yield server
    server.kill()


@pytest.fixture
def ipv6_memcached():
    if not ipv6_loopback_available():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    server = MemcachedProcess(host="::1").start()
    yield server
    server.kill()


@pytest.fixture
def fake_memcached():
    """A scripted hostile stand-in for memcached (tests/fakeserver.py)."""
    from fakeserver import FakeMemcached

    server = FakeMemcached()
    yield server
    server.stop()


@pytest.fixture
def twemproxy_factory():
    started = []

    def start(servers):
        proxy = Twemproxy(servers).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def make_cache():
    """Build backends directly: ``make_cache(location, options, **params)``."""
    from djmemcache.backend import PyMemcacheCache

    made = []

    def make(location, options=None, **params):
        cache = PyMemcacheCache(location, {"OPTIONS": dict(options or {}), **params})
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()
        if cache._client is not None:
            cache._client.close()
