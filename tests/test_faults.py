"""Faults on real memcached processes under 8 threads of request traffic.

Each test prints one FAULT line with what it measured (run with -s to see).
"""

import time

import pytest
from django.core.cache import caches
from django.test import override_settings

from djmemcache import PoolTimeout

from helpers import Traffic, run_threads, value_for

BACKEND = "djmemcache.backend.PyMemcacheCache"
FAST = {"TIMEOUT": 0.2, "CONNECT_TIMEOUT": 0.2, "BLACKLIST_TIME": 1}

pytestmark = pytest.mark.slow


def _settings(servers, **options):
    return {"default": {"BACKEND": BACKEND, "LOCATION": [s.location for s in servers],
                        "OPTIONS": {**FAST, **options}}}


def _wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _state(index):
    return caches["default"].stats()[index]["state"]


def test_hung_server_is_blacklisted_and_used_again_after_sigcont(memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    with override_settings(CACHES=_settings(servers)):
        traffic = Traffic().start()
        try:
            time.sleep(1.0)
            paused_at = time.monotonic()
            servers[2].pause()
            assert _wait_until(lambda: _state(2) == "blacklisted", 2)
            banned_at = time.monotonic()
            time.sleep(2.0)
            servers[2].resume()
            resumed_at = time.monotonic()
            assert _wait_until(lambda: _state(2) == "up", 3)
            back_at = time.monotonic()
            hits_before = servers[2].stats()["get_hits"]
            time.sleep(0.5)
        finally:
            traffic.stop()
        calls = traffic.since(0)
        after_ban = traffic.since(banned_at)
        assert Traffic.errors(calls) == []
        assert Traffic.wrong(calls) == []
        slow = Traffic.slower_than(after_ban, 0.2)
        assert len(slow) < 0.01 * len(after_ban), (len(slow), len(after_ban))
        assert servers[2].stats()["get_hits"] > hits_before  # it serves its keys again
        print("\nFAULT hung: calls=%d wrong=0 errors=0 blacklisted %.2fs after SIGSTOP; "
              "after that %d of %d calls (%.2f%%) slower than the 0.2s timeout; p99 %.1f ms; "
              "back %.2fs after SIGCONT (BLACKLIST_TIME=1)"
              % (len(calls), banned_at - paused_at, len(slow), len(after_ban),
                 100.0 * len(slow) / len(after_ban), 1000 * Traffic.percentile(after_ban, 0.99),
                 back_at - resumed_at))


def test_killed_server_is_blacklisted_and_calls_stay_fast(memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    with override_settings(CACHES=_settings(servers, BLACKLIST_TIME=60)):
        traffic = Traffic().start()
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            servers[0].kill()
            assert _wait_until(lambda: _state(0) == "blacklisted", 2)
            banned_at = time.monotonic()
            time.sleep(1.5)
        finally:
            traffic.stop()
        calls = traffic.since(0)
        after_ban = traffic.since(banned_at)
        assert Traffic.errors(calls) == [] and Traffic.wrong(calls) == []
        p99 = Traffic.percentile(after_ban, 0.99)
        assert p99 < 0.02
        print("\nFAULT killed: calls=%d wrong=0 errors=0 blacklisted %.3fs after SIGKILL; "
              "after that p99 %.2f ms, max %.1f ms over %d calls"
              % (len(calls), banned_at - killed_at, 1000 * p99,
                 1000 * max(c[1] for c in after_ban), len(after_ban)))


def test_refused_port_in_location_costs_one_call_then_stays_fast(memcached_factory):
    servers = [memcached_factory() for _ in range(2)]
    servers[1].kill()  # its port now refuses
    with override_settings(CACHES=_settings(servers, BLACKLIST_TIME=60)):
        traffic = Traffic().start()
        time.sleep(1.5)
        traffic.stop()
        calls = traffic.since(0)
        assert Traffic.errors(calls) == [] and Traffic.wrong(calls) == []
        p99 = Traffic.percentile(calls, 0.99)
        assert p99 < 0.02
        print("\nFAULT refused: %d calls, p99 %.2f ms" % (len(calls), 1000 * p99))


def test_restart_on_the_same_port_recovers_within_a_second_without_errors(memcached_factory):
    servers = [memcached_factory() for _ in range(3)]
    with override_settings(CACHES=_settings(servers, BLACKLIST_TIME=0.5, IGNORE_EXC=True)):
        traffic = Traffic().start()
        try:
            time.sleep(1.0)
            servers[1].restart()
            back_at = time.monotonic()
            time.sleep(1.0)
            errors_a_second_later = caches["default"].stats()[1]["errors"]
            time.sleep(1.0)
        finally:
            traffic.stop()
        settled = traffic.since(back_at + 1.0)
        assert Traffic.wrong(traffic.since(0)) == []
        assert Traffic.errors(settled) == []
        # Nothing failed (not even silently, under IGNORE_EXC) once the server
        # had been back for a second, and it serves its keys again.
        after = caches["default"].stats()[1]
        assert after["state"] == "up" and after["errors"] == errors_a_second_later
        assert len(settled) > 1000
    # And with errors surfaced: a pool full of dead connections costs callers nothing.
    with override_settings(CACHES=_settings(servers, IGNORE_EXC=False)):
        warm = Traffic().start()
        time.sleep(0.5)
        warm.stop()
        for server in servers:
            server.restart()
        after = Traffic().start()
        time.sleep(1.0)
        after.stop()
        calls = after.since(0)
        assert Traffic.errors(warm.since(0)) == [] and Traffic.errors(calls) == []
        assert Traffic.wrong(calls) == []
        print("\nFAULT restart: %d calls in the second after restarting all 3 servers "
              "under IGNORE_EXC=False: 0 errors, 0 wrong values" % len(calls))


def test_pool_exhaustion_waits_then_times_out_without_leaks(memcached_factory):
    server = memcached_factory()
    options = {"MAX_POOL_SIZE": 2, "POOL_TIMEOUT": 0.001, "IGNORE_EXC": False}
    with override_settings(CACHES=_settings([server], **options)):
        def work(i):
            cache = caches["default"]
            for n in range(100):
                try:
                    cache.set("k%d" % i, n)
                    assert cache.get("k%d" % i) in (n, None)
                except PoolTimeout:
                    pass

        assert run_threads(16, work) == []
        pool = caches["default"].client.pools[0]
        status = pool.status()
        assert status["in_use"] == 0 and status["idle"] <= 2 and pool.opened <= 2
        assert server.stats()["curr_connections"] <= 2 + 2  # + this stats call + the listener
    with override_settings(CACHES=_settings([server], MAX_POOL_SIZE=2, POOL_TIMEOUT=0.001)):
        def ignoring(i):
            cache = caches["default"]
            for n in range(100):
                cache.set("j%d" % i, n)  # a set that timed out on the pool leaves an older value
                value = cache.get("j%d" % i)
                assert value is None or 0 <= value <= n

        assert run_threads(16, ignoring) == []


def test_concurrent_incr_is_exact_and_add_has_one_winner(memcached_factory):
    server = memcached_factory()
    with override_settings(CACHES=_settings([server], TIMEOUT=5, IGNORE_EXC=False)):
        caches["default"].set("counter", 0)

        def incr(i):
            cache = caches["default"]
            for _ in range(500):
                cache.incr("counter")

        assert run_threads(16, incr) == []
        assert caches["default"].get("counter") == 8000
        winners = []

        def add(i):
            if caches["default"].add("lock", i):
                winners.append(i)

        assert run_threads(16, add) == []
        assert len(winners) == 1 and caches["default"].get("lock") == winners[0]


def test_value_for_helper_is_stable():
    assert value_for("k") == "value-of-k"
