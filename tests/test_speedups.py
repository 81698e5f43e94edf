"""djmemcache._speedups, the optional C round trip: built where the tests run,
switched off by DJMEMCACHE_PURE_PYTHON, and giving what the pure-Python path
gives. The wire-level test modules (hostile servers, deadlines, signals) run
every test on both paths through the ``io_path`` fixture."""

import os
import subprocess
import sys

import pytest

from djmemcache import client as client_module
from djmemcache import connection


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


def test_a_get_many_over_three_servers_waits_for_all_of_them_in_one_call(
        native_only, mc3, make_cache, monkeypatch):
    calls = []
    real = client_module.exchange_many

    def counting(requests, *args):
        calls.append(len(requests))
        return real(requests, *args)

    monkeypatch.setattr(client_module, "exchange_many", counting)
    cache = make_cache(location(mc3))
    keys = ["k%d" % i for i in range(60)]
    cache.set_many({key: key * 3 for key in keys})
    assert cache.get_many(keys) == {key: key * 3 for key in keys}
    assert calls == [3]  # one C call, one request per server


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
