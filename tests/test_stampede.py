"""get_or_set without a stampede, with real memcached and real processes:
one computation across processes and threads, a winner that raises or
dies, early refresh of a hot key, twemproxy, and a server that dies."""

import asyncio
import gc
import multiprocessing
import os
import random
import signal
import threading
import time
import traceback

import pytest
from django.core.cache.backends.memcached import PyMemcacheCache as DjangosPyMemcacheCache
from django.core.exceptions import ImproperlyConfigured

from djmemcache import DjmemcacheError, ServerError, stampede
from djmemcache.options import parse_options

from helpers import raw_command, run_threads

FORK = multiprocessing.get_context("fork")
COMPUTE_SECONDS = 0.2


def _crowd_member(location, options, key, threads, go, computations, results, compute=None):
    """A process of ``threads`` threads calling get_or_set on ``key`` at ``go``."""
    from djmemcache.backend import PyMemcacheCache

    cache = PyMemcacheCache(location, {"OPTIONS": options})

    def default():
        with computations.get_lock():
            computations.value += 1
        time.sleep(COMPUTE_SECONDS)
        return "value-from-%d" % os.getpid()

    seen = []

    def call(_):
        go.wait()
        started = time.monotonic()
        try:
            value = cache.get_or_set(key, compute or default, timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            value = "raised %r" % exc
        seen.append((time.monotonic() - started, value))

    run_threads(threads, call)
    results.put(seen)


def crowd(location, options, key, processes=4, threads=50, compute=None):
    """``processes`` x ``threads`` callers at once: (computations, [(latency, value)])."""
    go = FORK.Event()
    computations = FORK.Value("i", 0)
    results = FORK.Queue()
    members = [FORK.Process(target=_crowd_member,
                            args=(location, options, key, threads, go, computations, results, compute))
               for _ in range(processes)]
    for member in members:
        member.start()
    time.sleep(0.5)  # every thread of every process waiting on ``go``
    go.set()
    seen = [call for _ in members for call in results.get(timeout=60)]
    for member in members:
        member.join(10)
    return computations.value, seen


def counted(value):
    """A 200 ms computation of ``value`` and the list it appends each run to."""
    computations = []

    def default():
        computations.append(1)
        time.sleep(COMPUTE_SECONDS)
        return value

    return computations, default


# -- one computation ----------------------------------------------------------

def test_missing_key_is_computed_once_by_200_callers_in_4_processes(mc1):
    computations, seen = crowd(mc1.location, {}, "popular")
    values = {value for _latency, value in seen}
    slowest = max(latency for latency, _value in seen)
    misses = len([value for _latency, value in seen if not value.startswith("value-from-")])
    print("\nSTAMPEDE 4 processes x 50 threads, 200 ms computation: %d computation(s), "
          "slowest caller %.0f ms, %d misses" % (computations, slowest * 1000, misses))
    assert len(seen) == 200
    assert computations == 1
    assert len(values) == 1 and values.pop().startswith("value-from-")
    assert slowest < 5.0  # STAMPEDE_WAIT: nobody gave up waiting (in practice ~0.3 s)


def test_caller_whose_miss_is_answered_before_it_takes_the_lock_does_not_compute(mc1, make_cache, monkeypatch):
    """A late caller (a loaded machine) whose first get missed, while the
    winner stored the value and released the lock before this caller's add
    of the lock: the add carries a get of the key, so it takes the value
    instead of computing it a second time (seen in the 200-caller crowd)."""
    from djmemcache.client import MISS, Client

    cache = make_cache(mc1.location)
    cache.set("k", "stored meanwhile")
    real_get = Client.get
    calls = []

    def late_get(client, key):
        calls.append(key)
        return MISS if len(calls) == 1 else real_get(client, key)

    monkeypatch.setattr(Client, "get", late_get)
    computations, default = counted("computed again")
    assert cache.get_or_set("k", default) == "stored meanwhile"
    assert computations == []
    monkeypatch.undo()
    assert cache.get("k" + stampede.LOCK_SUFFIX) is None  # the lock taken is released


def test_djangos_own_get_or_set_computes_once_per_caller(mc1):
    """The behaviour this replaces, measured the same way: what STAMPEDE_PROTECTION=False keeps."""
    computations, seen = crowd(mc1.location, {"STAMPEDE_PROTECTION": False}, "popular",
                               processes=2, threads=10)
    assert len(seen) == 20
    assert computations > 1


def test_threads_of_one_process_share_one_poller(mc1, make_cache):
    cache = make_cache(mc1.location)
    computations, default = counted("v")

    before = mc1.stats()["cmd_get"]
    seen = []
    errors = run_threads(30, lambda _: seen.append(cache.get_or_set("k", default)))
    assert errors == [] and seen == ["v"] * 30 and len(computations) == 1
    # At most: 30 first gets, the winner's get sent with its lock's add and its
    # get after its add, a get each for the 29 others (a copy of their own): no
    # polls at all, since the one poller was the winner. Fewer when a late
    # thread's first get already hits (loaded machine).
    assert mc1.stats()["cmd_get"] - before <= 30 + 2 + 29


@pytest.mark.parametrize("options", [{"USE_POOLING": False}, {}], ids=["pooling off", "two aliases"])
def test_threads_with_backends_of_their_own_compute_once(mc1, make_cache, options):
    """Django builds a backend per thread: with USE_POOLING off each has a
    Client (and a Guard) of its own, as have two aliases of one cache whose
    OPTIONS differ. None may take another's live lock for abandoned."""
    computations, default = counted("v")
    caches = [make_cache(mc1.location, dict(options, POOL_TIMEOUT=1 + n % 2)) for n in range(20)]
    seen = []
    assert run_threads(20, lambda n: seen.append(caches[n].get_or_set("k", default))) == []
    assert seen == ["v"] * 20
    assert len(computations) == 1


def test_callers_that_took_the_lock_in_turn_leave_no_token_on_the_books(mc1, make_cache):
    """Each thread with a Guard of its own (USE_POOLING off) polls the lock and
    takes it in turn as computations fail: every token it made is dropped."""
    caches = [make_cache(mc1.location, {"USE_POOLING": False, "STAMPEDE_WAIT": 10}) for _ in range(10)]

    def failing():
        time.sleep(0.02)
        raise RuntimeError("database gone")

    def call(n):
        with pytest.raises(RuntimeError):
            caches[n].get_or_set("down", failing)

    before = set(stampede._takers)  # what earlier tests' cut-short calls left
    assert run_threads(10, call) == []
    assert set(stampede._takers) <= before


# -- a winner that fails ------------------------------------------------------

def test_winner_that_raises_hands_over_to_the_next_caller_at_once(mc1):
    attempts = FORK.Value("i", 0)

    def flaky():
        with attempts.get_lock():
            attempts.value += 1
            first = attempts.value == 1
        time.sleep(COMPUTE_SECONDS)
        if first:
            raise RuntimeError("database gone")
        return "second try"

    started = time.monotonic()
    _computations, seen = crowd(mc1.location, {"STAMPEDE_WAIT": 10}, "flaky", processes=2, threads=10,
                                compute=flaky)
    elapsed = time.monotonic() - started
    values = [value for _latency, value in seen]
    assert values.count("raised RuntimeError('database gone')") == 1
    assert values.count("second try") == 19
    assert attempts.value == 2
    assert elapsed < 0.5 + 5  # far from STAMPEDE_WAIT (10 s): the lock was deleted


class Unavailable(Exception):
    """An exception whose ``__init__`` takes other arguments than its ``args``."""

    made = 0

    def __init__(self, status):
        Unavailable.made += 1
        self.status = status
        super().__init__("database gone (%d)" % status)


def test_a_computation_that_keeps_raising_costs_the_waiters_two_computations_not_stampede_wait(
        mc1, make_cache):
    """The database is down: the winner raises, one waiter tries again and
    raises too, and the others raise that exception, at once: a copy each
    (one shared exception would gather every waiter's frames, and their
    locals, in one traceback), built without running its __init__ again."""
    cache = make_cache(mc1.location, {"STAMPEDE_WAIT": 10})
    attempts = []
    Unavailable.made = 0

    def failing():
        attempts.append(1)
        time.sleep(COMPUTE_SECONDS)
        raise Unavailable(503)

    seen, errors = [], []

    def call(_):
        started = time.monotonic()
        try:
            cache.get_or_set("down", failing)
        except Unavailable as exc:
            seen.append((time.monotonic() - started, str(exc), exc.status))
            errors.append(exc)

    assert run_threads(30, call) == []
    assert [(message, status) for _latency, message, status in seen] == [("database gone (503)", 503)] * 30
    assert len(attempts) == 2 and Unavailable.made == 2
    assert max(latency for latency, _message, _status in seen) < 2 * COMPUTE_SECONDS + 1.0  # not 10 s
    assert len({id(exc) for exc in errors}) == 30
    assert max(len(traceback.extract_tb(exc.__traceback__)) for exc in errors) < 20
    assert cache.get("down" + stampede.LOCK_SUFFIX) is None  # no lock left behind


def _hang_holding_the_lock(location, options, key, ready):
    from djmemcache.backend import PyMemcacheCache

    cache = PyMemcacheCache(location, {"OPTIONS": options})

    def forever():
        ready.set()
        time.sleep(3600)

    cache.get_or_set(key, forever)


def test_winner_killed_mid_computation_blocks_others_no_longer_than_stampede_wait(mc1, make_cache):
    options = {"STAMPEDE_WAIT": 2}
    ready = FORK.Event()
    winner = FORK.Process(target=_hang_holding_the_lock, args=(mc1.location, options, "orphan", ready))
    winner.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        computations, seen = crowd(mc1.location, options, "orphan", processes=2, threads=10)
    finally:
        os.kill(winner.pid, signal.SIGKILL)
        winner.join()
    latencies = [latency for latency, _value in seen]
    assert all(value.startswith("value-from-") for _latency, value in seen)
    assert max(latencies) < 2 + COMPUTE_SECONDS + 3, latencies
    assert time.monotonic() - started < 2 + 10
    print("\nSTAMPEDE winner killed: 20 others done in %.2f s max (STAMPEDE_WAIT 2), %d computations"
          % (max(latencies), computations))


# -- early refresh ------------------------------------------------------------

def test_hot_key_is_refreshed_once_before_each_expiry_and_never_misses(mc1, make_cache):
    # memcached's clock ticks in whole seconds, and late under load: a window of
    # 3 ticks (refresh when 3, 2 or 1 s are left) is never skipped.
    cache = make_cache(mc1.location, {"EARLY_REFRESH": 4})
    generations = []
    computing = []

    def default():
        computing.append(1)
        assert len(computing) == 1, "two computations at once"
        time.sleep(COMPUTE_SECONDS)
        generations.append(time.monotonic())
        computing.pop()
        return len(generations)

    assert cache.get_or_set("hot", default, timeout=6) == 1
    misses_before = mc1.stats()["get_misses"]
    stop = time.monotonic() + 10
    seen = []

    def reader(_):
        while time.monotonic() < stop:
            seen.append(cache.get_or_set("hot", default, timeout=6))
            time.sleep(0.005)

    assert run_threads(8, reader) == []
    misses = mc1.stats()["get_misses"] - misses_before
    print("\nEARLY_REFRESH hot key, 8 threads, 10 s, timeout 6 s, EARLY_REFRESH 4: %d computations, "
          "%d misses in %d reads" % (len(generations), misses, len(seen)))
    assert misses == 0
    assert None not in seen
    # Refreshed every 2 to 3 s (when fewer than 4 s are left of 6), each generation computed
    # once and read (a second computation of one generation would make a value nobody read).
    assert 3 <= len(generations) <= 7
    assert sorted(set(seen)) == list(range(1, len(generations) + 1))


def test_early_refresh_that_raises_keeps_the_current_value(mc1, make_cache, caplog):
    cache = make_cache(mc1.location, {"EARLY_REFRESH": 3})
    cache.set("k", "current", timeout=4)

    def broken():
        raise RuntimeError("no")

    seen = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            seen.append(cache.get_or_set("k", broken, timeout=4))
        except RuntimeError:
            break  # the value expired: the miss path computes, and raises as Django would
        time.sleep(0.05)
    assert "early refresh of key ':1:k' failed" in caplog.text
    assert len(seen) > 5 and set(seen) == {"current"}
    assert cache.get("k") is None


def test_refresh_outlived_by_its_value_makes_missing_callers_wait_for_it(mc1, make_cache):
    """The refresh winner holds the lock too: when the value expires before
    the fresh one is set (here a computation longer than the time left),
    callers who miss wait for that computation instead of starting another."""
    cache = make_cache(mc1.location, {"EARLY_REFRESH": 2, "STAMPEDE_WAIT": 10})
    cache.set("k", "old", timeout=3)
    refreshing = threading.Event()
    computations = []

    def slow():
        computations.append(1)
        refreshing.set()
        time.sleep(2.5)  # more than the at most 1 s left when the refresh is won
        return "fresh"

    seen = []

    def reader():
        while not refreshing.is_set():
            seen.append(cache.get_or_set("k", slow, timeout=3))
            time.sleep(0.02)

    refresher = threading.Thread(target=reader)
    refresher.start()
    assert refreshing.wait(5)
    time.sleep(1.2)  # the old value has expired by now
    assert cache.get("k") is None
    late = cache.get_or_set("k", lambda: computations.append(1) or "another")
    refresher.join(10)
    assert late == "fresh" and seen[-1] == "fresh"
    assert set(seen[:-1]) == {"old"} and len(computations) == 1


def _refresh_racing(cache, write):
    """get_or_set wins the refresh of "page" (v1, 3 s left, EARLY_REFRESH 4),
    and ``write()`` runs while it computes from v1: what it returns."""
    database = {"page": "v1"}
    computing, written = threading.Event(), threading.Event()

    def render():
        snapshot = database["page"]  # read the database
        computing.set()
        assert written.wait(5)
        return snapshot

    cache.set("page", "v1", timeout=30)
    cache.touch("page", 3)  # under EARLY_REFRESH's 4 s: the next reader refreshes
    seen = []
    refresher = threading.Thread(target=lambda: seen.append(cache.get_or_set("page", render, timeout=30)))
    refresher.start()
    assert computing.wait(5)
    database["page"] = "v2"
    write()
    written.set()
    refresher.join(10)
    return seen


def test_early_refresh_never_overwrites_a_write_made_while_it_computed(mc1, make_cache):
    cache = make_cache(mc1.location, {"EARLY_REFRESH": 4})
    seen = _refresh_racing(cache, lambda: cache.set("page", "v2", timeout=30))
    assert cache.get("page") == "v2"  # not the v1 the refresh computed, for a whole timeout
    assert seen == ["v2"]  # what the cache holds, as Django's get_or_set returns


def test_early_refresh_does_not_bring_back_a_key_deleted_while_it_computed(mc1, make_cache):
    cache = make_cache(mc1.location, {"EARLY_REFRESH": 4})
    seen = _refresh_racing(cache, lambda: cache.delete("page"))
    assert cache.get("page") is None
    assert seen == ["v1"]  # the caller still gets the value it computed


def test_early_refresh_is_off_where_memcached_gives_no_cas_values(memcached_factory, make_cache, caplog):
    server = memcached_factory(extra_args=["-C"])
    cache = make_cache(server.location, {"EARLY_REFRESH": 4})
    computations, default = counted("fresh")
    cache.set("k", "current", timeout=30)
    cache.touch("k", 3)
    # Won the refresh, but could store it only blind: it keeps the current value.
    assert cache.get_or_set("k", default, timeout=30) == "current"
    assert computations == [] and cache.get("k") == "current"
    assert caplog.text.count("gives no CAS values") == 1


# -- values that cannot be read or stored -------------------------------------------

def test_unreadable_item_is_replaced_by_the_one_computation(mc1):
    """An item no reader can use (djmemcache 0.13's flags, a rotated
    SIGNING_KEY) is a miss, and add() never replaces it: the winner sets its
    value over it, so the next round hits instead of computing again, one
    process after another behind the lock."""
    assert raw_command(mc1.location, b"set :1:report 99 3600 3\r\nold\r\n", until=b"\r\n") == b"STORED\r\n"
    first, seen = crowd(mc1.location, {"STAMPEDE_WAIT": 10}, "report", processes=3, threads=10)
    again, seen_again = crowd(mc1.location, {"STAMPEDE_WAIT": 10}, "report", processes=3, threads=10)
    assert (first, again) == (1, 0)
    values = {value for _latency, value in seen + seen_again}
    assert len(values) == 1 and values.pop().startswith("value-from-")


def test_value_too_large_to_store_is_computed_at_once_by_the_others(mc1, make_cache):
    """The winner's value cannot be stored: it leaves word in the lock, and
    the other processes compute theirs together instead of taking the lock
    one after another (each computation here takes 1 s: one after another,
    never two at once)."""
    running, most = FORK.Value("i", 0), FORK.Value("i", 0)

    def too_large():
        with running.get_lock():
            running.value += 1
            most.value = max(most.value, running.value)
        time.sleep(1)
        with running.get_lock():
            running.value -= 1
        return "x" * (2 * 1024 * 1024)

    computations, seen = crowd(mc1.location, {"STAMPEDE_WAIT": 30}, "huge", processes=4, threads=5,
                               compute=too_large)
    assert [len(value) for _latency, value in seen] == [2 * 1024 * 1024] * 20
    assert most.value >= 2  # the others did not wait their turns
    cache = make_cache(mc1.location)
    assert cache.get("huge") is None
    lock = raw_command(mc1.location, b"get :1:huge" + stampede.LOCK_SUFFIX.encode() + b"\r\n")
    assert stampede.UNSTORABLE in lock


def test_a_server_that_stalls_mid_computation_leaves_no_word_that_values_cannot_be_stored(
        memcached_factory, make_cache):
    """The winner's add fails because its server stalled (SIGSTOP), not
    because memcached refused the value: once the server is back, the next
    crowd computes once, not once per process for the lock's lifetime."""
    server = memcached_factory()
    options = {"TIMEOUT": 0.5, "STAMPEDE_WAIT": 30}
    computations = FORK.Value("i", 0)

    def slow():
        with computations.get_lock():
            computations.value += 1
        time.sleep(1)
        return "v"

    fault = [threading.Timer(0.8, server.pause), threading.Timer(2.3, server.resume)]
    for timer in fault:  # crowd() starts its callers at 0.5 s
        timer.start()
    _, seen = crowd(server.location, options, "k", processes=4, threads=5, compute=slow)
    for timer in fault:
        timer.join()
    assert {value for _latency, value in seen} == {"v"}
    lock = raw_command(server.location, b"get :1:k" + stampede.LOCK_SUFFIX.encode() + b"\r\n")
    assert stampede.UNSTORABLE not in lock
    make_cache(server.location).delete("k")
    computations.value = 0
    _, seen = crowd(server.location, options, "k", processes=4, threads=5, compute=slow)
    assert {value for _latency, value in seen} == {"v"}
    assert computations.value == 1


# -- Django's semantics, and what is stored -------------------------------------

def test_values_keep_djangos_flags_both_ways(mc1, make_cache):
    ours = make_cache(mc1.location, {"EARLY_REFRESH": 2})
    djangos = DjangosPyMemcacheCache(mc1.location, {})
    try:
        for i, value in enumerate(("text", 42, {"a": [1, 2]}, b"bytes", None)):
            key = "k-%d" % i
            assert ours.get_or_set(key, lambda: value) == value
            assert djangos.get(key, "missing") == value
            djangos.set(key + "-django", value)
            assert ours.get_or_set(key + "-django", lambda: "recomputed") == value
    finally:
        djangos.close()


def test_non_callable_default_and_zero_timeout_keep_djangos_behaviour(mc1, make_cache):
    cache = make_cache(mc1.location)
    assert cache.get_or_set("plain", "given") == "given"
    assert cache.get("plain") == "given"
    assert cache.get_or_set("gone", lambda: "x", timeout=0) == "x"
    assert cache.get("gone") is None
    cache.set("none", None)
    assert cache.get_or_set("none", lambda: "recomputed") is None  # a stored None is a hit
    assert cache.get_or_set("versioned", lambda: 1, version=2) == 1
    assert cache.get("versioned", version=2) == 1 and cache.get("versioned") is None


def test_aget_or_set_computes_once_for_concurrent_awaits(mc1, make_cache):
    cache = make_cache(mc1.location)
    computations, default = counted("v")

    async def main():
        return await asyncio.gather(*(cache.aget_or_set("a", default) for _ in range(5)))

    assert asyncio.run(main()) == ["v"] * 5
    assert len(computations) == 1


def test_threads_waiting_in_process_get_a_copy_of_their_own(mc1, make_cache):
    cache = make_cache(mc1.location)
    computations, default = counted(["shared?"])
    seen = []
    assert run_threads(5, lambda _: seen.append(cache.get_or_set("k", default))) == []
    assert len(computations) == 1 and seen == [["shared?"]] * 5
    assert len({id(value) for value in seen}) == 5


def test_threads_waiting_in_process_get_a_copy_of_their_own_of_a_value_too_large_to_store(mc1, make_cache):
    cache = make_cache(mc1.location)
    computations, default = counted(["x" * (2 * 1024 * 1024)])
    seen = []
    assert run_threads(5, lambda _: seen.append(cache.get_or_set("k", default))) == []
    assert len(computations) == 1 and seen == [["x" * (2 * 1024 * 1024)]] * 5
    assert len({id(value) for value in seen}) == 5
    assert cache.get("k") is None


def test_child_forked_during_a_computation_does_not_wait_for_its_parents_threads(mc1, make_cache):
    cache = make_cache(mc1.location, {"STAMPEDE_WAIT": 10})
    computing = threading.Event()

    def slow():
        computing.set()
        time.sleep(1)
        return "parent's"

    parent = threading.Thread(target=cache.get_or_set, args=("k", slow))
    parent.start()
    assert computing.wait(5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            report = []
            for _ in range(3):
                started = time.monotonic()
                value = cache.get_or_set("k", lambda: "child's")
                report.append(b"%s %.2f" % (value.encode(), time.monotonic() - started))
                cache.delete("k")
            os.write(write, b"|".join(report))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        calls = [call.rsplit(b" ", 1) for call in pipe.read().split(b"|")]
    os.waitpid(pid, 0)
    parent.join(10)
    # The parent's computation is the winner's: the child polls it from memcached
    # (about 1 s), instead of waiting STAMPEDE_WAIT for a thread it does not have;
    # and no flight of the parent's is left to wait for after that.
    assert calls[0][0] == b"parent's" and float(calls[0][1]) < 5
    assert [value for value, _seconds in calls[1:]] == [b"child's"] * 2
    assert all(float(seconds) < 2 for _value, seconds in calls[1:]), calls


def test_exceptions_from_a_signal_handler_anywhere_in_get_or_set_leave_no_caller_waiting(mc1, make_cache):
    """SIGALRM raising at random points inside get_or_set (thousands of
    times): afterwards no flight is left in the process and no call waits,
    neither for a flight nor for a lock whose release was cut short
    (STAMPEDE_WAIT 10: either would show as seconds)."""
    class Alarm(Exception):
        pass

    def alarm(*_):
        raise Alarm

    cache = make_cache(mc1.location, {"STAMPEDE_WAIT": 10, "IGNORE_EXC": False})
    keys = ["sig-%d" % i for i in range(50)]
    rng = random.Random(6)
    # Earlier tests' clients, freed by the collector during the alarms, would
    # have their weakref callbacks interrupted: an unraisable error, not ours.
    gc.collect()
    previous = signal.signal(signal.SIGALRM, alarm)
    alarms = 0
    try:
        stop = time.monotonic() + 3
        while time.monotonic() < stop:
            key = rng.choice(keys)
            try:
                try:
                    cache.delete(key)
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0, 0.0012))
                    cache.get_or_set(key, lambda: "v", timeout=300)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except Alarm:
                alarms += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    slowest = 0.0
    for key in keys:
        cache.delete(key)
        started = time.monotonic()
        assert cache.get_or_set(key, lambda: "after", timeout=300) == "after"
        slowest = max(slowest, time.monotonic() - started)
    print("\nSIGALRM in get_or_set: %d alarms raised; then 50 misses, slowest %.3f s" % (alarms, slowest))
    assert alarms > 100
    assert slowest < 2
    assert stampede.guard_for(cache.client)._flights == {}


def _flight_left_behind(cache, monkeypatch, key):
    """get_or_set of ``key`` on this thread, its leader's cleanup interrupted
    as a signal would: the flight stays on the books."""
    forget = stampede.Guard._forget
    calls = []

    def interrupted(guard, *args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return forget(guard, *args)

    monkeypatch.setattr(stampede.Guard, "_forget", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_set(key, lambda: "v")
    guard = stampede.guard_for(cache.client)
    assert key in {k.rsplit(":", 1)[-1] for k in guard._flights}
    cache.delete(key)
    return guard


def test_flight_whose_leader_is_this_thread_or_dead_is_taken_over_at_once(mc1, make_cache, monkeypatch):
    cache = make_cache(mc1.location, {"STAMPEDE_WAIT": 10})
    guard = _flight_left_behind(cache, monkeypatch, "k")
    started = time.monotonic()
    assert cache.get_or_set("k", lambda: "again") == "again"  # the same thread: it is not computing
    assert time.monotonic() - started < 2 and guard._flights == {}

    thread = threading.Thread(target=_flight_left_behind, args=(cache, monkeypatch, "k2"))
    thread.start()
    thread.join()
    assert guard._flights  # left behind by a thread that has ended
    started = time.monotonic()
    assert cache.get_or_set("k2", lambda: "again") == "again"
    assert time.monotonic() - started < 2 and guard._flights == {}


def test_flight_left_behind_costs_one_waiter_stampede_wait_once(mc1, make_cache, monkeypatch):
    cache = make_cache(mc1.location, {"STAMPEDE_WAIT": 1})
    guard = _flight_left_behind(cache, monkeypatch, "k")  # this thread lives on
    seconds = []

    def call():
        started = time.monotonic()
        seen = cache.get_or_set("k", lambda: "computed")
        seconds.append(time.monotonic() - started)
        cache.delete("k")
        return seen

    for _ in range(3):
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    assert seconds[0] >= 1 - 0.05  # waited for the flight, once, then dropped it
    assert max(seconds[1:]) < 0.9, seconds
    assert guard._flights == {}


def test_guard_does_not_keep_its_client_alive(mc1):
    import gc
    import weakref

    from djmemcache import stampede
    from djmemcache.client import Client

    client = Client(parse_options(mc1.location, {}))
    stampede.guard_for(client)
    dead = weakref.ref(client)
    del client
    gc.collect()
    assert dead() is None


@pytest.mark.parametrize("prefix_bytes", [0, 170, 200, 239])
def test_long_keys_get_a_lock_key_memcached_accepts_whatever_the_key_prefix(mc1, make_cache, prefix_bytes):
    """The lock of a key too long for the suffix is a hash cut to the room
    KEY_PREFIX leaves: with a 200-byte prefix, the 80-character hashed lock
    went past 250 bytes, memcached refused the line and ran the lock's data
    block as a command."""
    cache = make_cache(mc1.location, {"KEY_PREFIX": "p" * prefix_bytes, "IGNORE_EXC": False, "STAMPEDE_WAIT": 10})
    room = 250 - prefix_bytes - len(":1:")
    keys = {"x" * room, "y" * min(44, room), "é" * (room // 2)}
    for key in keys:
        computations, default = counted(key[:5])
        seen = []
        assert run_threads(5, lambda _: seen.append(cache.get_or_set(key, default, timeout=60))) == []
        assert seen == [key[:5]] * 5 and len(computations) == 1
        assert cache.get(key) == key[:5]
    guard = stampede.guard_for(cache.client)
    locks = {guard._lock_key(cache.make_key(key)) for key in keys}
    assert len(locks) == len(keys)
    assert all(len(lock.encode()) + prefix_bytes <= 250 for lock in locks)


# -- where meta commands are not spoken ---------------------------------------------

@pytest.mark.parametrize("distribution", ["consistent", "random"])
def test_behind_twemproxy_get_or_set_keeps_plain_semantics_without_error(
        make_cache, memcached_factory, twemproxy_factory, distribution, caplog):
    proxy = twemproxy_factory([memcached_factory()])
    cache = make_cache(proxy.location, {"EARLY_REFRESH": 2, "IGNORE_EXC": False, "DISTRIBUTION": distribution})
    computations, default = counted("v")

    seen = []
    assert run_threads(10, lambda _: seen.append(cache.get_or_set("k", default, timeout=3))) == []
    assert seen == ["v"] * 10
    assert len(computations) == 1  # add works through twemproxy: the lock still holds
    for _ in range(3):
        assert cache.get_or_set("k", default, timeout=3) == "v"
    if distribution == "consistent":
        assert "does not speak meta commands" in caplog.text
    else:
        assert "meta" not in caplog.text  # random: never tried


@pytest.fixture
def scripted():
    """``scripted(mg_reply, piece)``: a fake memcached (tests/fakeserver.py)
    answering every ``mg`` with ``mg_reply``, in pieces of ``piece`` bytes,
    and everything else as an empty memcached would."""
    from fakeserver import Dribble, FakeMemcached, default_reply

    servers = []

    def start(mg_reply, piece=None):
        answer = Dribble(mg_reply, every_ms=10, size=piece) if piece else mg_reply

        def respond(line, data):
            return answer if line.startswith(b"mg ") else default_reply(line, data)

        servers.append(FakeMemcached().reply(*[respond] * 100))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("reply", [
    b"VA 999999999 f0\r\n",  # a length past MAX_VALUE_SIZE: refused before reading
    b"VA 5 f-1\r\nhello\r\n",
    b"VA 5\r\nhello\r\n",  # no client flags
    b"VA 5 f0 Q\r\nhello\r\n",  # a flag not asked for
    b"VA 5 f0 c-7 t1 W\r\nhello\r\n",  # a CAS value that is no number
    b"VA 5 f0 c7 t1x W\r\nhello\r\n",
    b"VA 5 f0\r\nhelloXX",  # no CRLF after the data
    b"VA 5 f0\r\nhello\r\nEN\r\n",  # more than the reply
    b"HD f0\r\n",
    b"SERVER_ERROR out of memory\r\n",
])
def test_meta_get_replies_that_break_the_protocol_are_server_errors(make_cache, scripted, reply):
    server = scripted(reply)
    cache = make_cache(server.location, {"EARLY_REFRESH": 2, "IGNORE_EXC": False, "TIMEOUT": 1,
                                         "BLACKLIST_TIME": 0})
    with pytest.raises(ServerError):
        cache.get_or_set("k", lambda: "computed")
    lenient = make_cache(server.location, {"EARLY_REFRESH": 2, "TIMEOUT": 1, "BLACKLIST_TIME": 0})
    assert lenient.get_or_set("k", lambda: "computed") == "computed"


def test_meta_get_reply_in_pieces_is_read_whole(make_cache, scripted):
    server = scripted(b"VA 5 f0 c7 t1 W\r\nhello\r\n", piece=3)
    cache = make_cache(server.location, {"EARLY_REFRESH": 2, "IGNORE_EXC": False, "TIMEOUT": 2})
    # Won the refresh (W): recomputed and set, the fresh value returned.
    assert cache.get_or_set("k", lambda: "fresh") == "fresh"
    miss = scripted(b"EN\r\n", piece=1)
    cache = make_cache(miss.location, {"EARLY_REFRESH": 2, "IGNORE_EXC": False, "TIMEOUT": 2})
    assert cache.get_or_set("k", lambda: "computed") == "computed"


def test_memcached_older_than_1_6_is_read_with_get_after_one_error(make_cache, scripted, caplog):
    server = scripted(b"ERROR\r\n")
    cache = make_cache(server.location, {"EARLY_REFRESH": 2, "IGNORE_EXC": False, "TIMEOUT": 1})
    for _ in range(3):
        assert cache.get_or_set("k", lambda: "computed") == "computed"
    assert caplog.text.count("does not speak meta commands") == 1
    assert cache.stats()[0]["state"] == "up"


# -- failures --------------------------------------------------------------------------

def test_server_killed_while_others_wait_gives_djangos_ignore_exc_behaviour(memcached_factory, make_cache):
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.5, "STAMPEDE_WAIT": 10})
    waiting = threading.Event()

    def slow():
        waiting.set()
        time.sleep(0.5)
        return "winner"

    results = {}
    winner = threading.Thread(target=lambda: results.setdefault("winner", cache.get_or_set("k", slow)))
    winner.start()
    assert waiting.wait(5)
    other = make_cache(server.location, {"TIMEOUT": 0.5, "STAMPEDE_WAIT": 10, "MAX_POOL_SIZE": 3})

    def poller():  # another configuration, so another client: it polls memcached
        results["poller"] = other.get_or_set("k", lambda: "poller's own")

    started = time.monotonic()
    thread = threading.Thread(target=poller)
    thread.start()
    time.sleep(0.1)
    server.kill()
    thread.join(10)
    winner.join(10)
    assert results == {"winner": "winner", "poller": "poller's own"}
    assert time.monotonic() - started < 5  # not STAMPEDE_WAIT: the failure ended the wait


def test_server_down_get_or_set_computes_or_raises_as_ignore_exc_says(memcached_factory, make_cache):
    server = memcached_factory()
    location = server.location
    server.kill()
    lenient = make_cache(location, {"TIMEOUT": 0.5, "EARLY_REFRESH": 2})
    assert lenient.get_or_set("k", lambda: "computed") == "computed"
    strict = make_cache(location, {"TIMEOUT": 0.5, "EARLY_REFRESH": 2, "IGNORE_EXC": False, "BLACKLIST_TIME": 0})
    with pytest.raises(DjmemcacheError):
        strict.get_or_set("k", lambda: "computed")


# -- options ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, named", [
    ({"STAMPEDE_WAIT": 0}, "STAMPEDE_WAIT"),
    ({"STAMPEDE_WAIT": "5"}, "STAMPEDE_WAIT"),
    ({"STAMPEDE_WAIT": 10**6}, "STAMPEDE_WAIT"),
    ({"EARLY_REFRESH": 1}, "EARLY_REFRESH"),
    ({"EARLY_REFRESH": 2.5}, "EARLY_REFRESH"),
    ({"EARLY_REFRESH": -1}, "EARLY_REFRESH"),
    ({"EARLY_REFRESH": 30, "STAMPEDE_PROTECTION": False}, "EARLY_REFRESH"),
    ({"STAMPEDE_PROTECTION": "yes"}, "STAMPEDE_PROTECTION"),
])
def test_bad_stampede_options_are_refused_naming_the_option(options, named):
    with pytest.raises(ImproperlyConfigured, match=named):
        parse_options("127.0.0.1:11211", options)


def test_stampede_defaults():
    options = parse_options("127.0.0.1:11211", {})
    assert (options.stampede_protection, options.stampede_wait, options.early_refresh) == (True, 5.0, 0)
