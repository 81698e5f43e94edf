"""Cache calls under gevent monkey-patching, in a process of their own.

    python tests/gevent_scenarios.py SCENARIO '{"location": ..., "options": {...}, ...}'

Run by tests/test_deployments.py; prints one JSON line of what it saw.
Monkey-patching has to happen before anything imports socket or threading,
as gunicorn's gevent worker does it, hence a separate process per scenario.
"""

import os

from gevent import monkey

# DJM_NO_GEVENT=1 runs the same scenario on plain threads, for comparison.
PATCHED = os.environ.get("DJM_NO_GEVENT") != "1"
if PATCHED:
    monkey.patch_all()

import json  # noqa: E402 - after monkey-patching, on purpose
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402


def _setup(spec):
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="djmemcache-gevent-" + "x" * 40,
        INSTALLED_APPS=["djmemcache"],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "djmemcache.backend.PyMemcacheCache",
                            "LOCATION": spec["location"], "OPTIONS": spec.get("options", {})}},
    )
    django.setup()
    from django.core.cache import caches

    return caches["default"]


class Ticker:
    """A greenlet that wakes every 10 ms: if a call's wait were one gevent
    cannot see, the hub would be blocked and the ticker would not tick
    during the call; the longest gap between ticks is reported too."""

    def __init__(self):
        self.ticks = 0
        self.longest_gap = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self):
        last = time.monotonic()
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            self.ticks += 1
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    def stop(self):
        self._greenlet.kill()
        return self.longest_gap


def _status(cache):
    return [{k: entry[k] for k in ("state", "in_use", "idle", "reason")} for entry in cache.stats()]


def timed_calls(cache, spec):
    """``spec["calls"]`` gets of one key: each call's seconds, outcome
    (``hit``, ``miss`` or the exception's name) and ticks of the ticker
    meanwhile; the hub's longest stall; each server's state afterwards."""
    if spec.get("errno_clobbered_to"):
        # A signal handler's own ctypes calls can change ctypes' copy of errno
        # between a libc recv and its read: every read of it now says this.
        from djmemcache import connection

        connection._get_errno = lambda: spec["errno_clobbered_to"]
    ticker = Ticker() if PATCHED else None
    calls = []
    for _ in range(spec["calls"]):
        started = time.monotonic()
        ticks = ticker and ticker.ticks
        try:
            outcome = "miss" if cache.get("k") is None else "hit"
        except Exception as exc:  # noqa: BLE001 - reported
            outcome = type(exc).__name__
        calls.append([time.monotonic() - started, outcome, ticker and ticker.ticks - ticks])
    return {"calls": calls, "longest_hub_stall": ticker and ticker.stop(), "status": _status(cache)}


def value_for(key):
    return "value-of-%s" % key


def greenlet_storm(cache, spec):
    """``spec["greenlets"]`` greenlets share the pool, each running
    ``spec["rounds"]`` get/set/get_many calls; a share ``spec["interrupt"]``
    of the calls run under a ``gevent.Timeout`` of 0-3 ms that strikes
    wherever the call is (waiting for a slot, sending, reading)."""
    keys = ["key-%d" % i for i in range(50)]
    big = {key: value_for(key) * 200 for key in keys}  # multi-KB get_many replies take a while to read
    counts = {"calls": 0, "ok": 0, "miss": 0, "wrong": 0, "interrupted": 0, "other": [], "longest": 0.0}

    def check(key, value):
        if value is None:
            return "miss"
        return "ok" if value == big[key] else "wrong"

    def one_call(rng):
        op = rng.random()
        if op < 0.4:
            key = rng.choice(keys)
            return [check(key, cache.get(key))]
        if op < 0.7:
            key = rng.choice(keys)
            cache.set(key, big[key])
            return ["ok"]
        chosen = rng.sample(keys, 20)
        found = cache.get_many(chosen)
        return [check(key, found.get(key)) for key in chosen]

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(spec["rounds"]):
            counts["calls"] += 1
            timer = gevent.Timeout(rng.uniform(0, 0.003)) if rng.random() < spec["interrupt"] else None
            started = time.monotonic()
            try:
                if timer is not None:
                    timer.start()
                for outcome in one_call(rng):
                    counts[outcome] += 1
                counts["longest"] = max(counts["longest"], time.monotonic() - started)
            except gevent.Timeout as exc:
                if exc is not timer:
                    raise
                counts["interrupted"] += 1
            except Exception as exc:  # noqa: BLE001 - reported
                counts["other"].append(type(exc).__name__)
            finally:
                if timer is not None:
                    timer.close()

    started = time.monotonic()
    greenlets = [gevent.spawn(worker, i) for i in range(spec["greenlets"])]
    done = gevent.joinall(greenlets, timeout=spec["deadline"])
    counts["seconds"] = time.monotonic() - started
    counts["unfinished"] = len(greenlets) - len(done)
    counts["failed_greenlets"] = [repr(g.exception) for g in greenlets if g.exception is not None]
    gevent.killall(greenlets)
    counts["status_after"] = _status(cache)
    cache.set("after", "storm")
    counts["after"] = cache.get("after")
    return counts


def busy_hub(cache, spec):
    """A greenlet gets a key while another keeps the hub busy (CPU work that
    never yields) for ``spec["busy"]`` seconds, longer than TIMEOUT; with
    ``spec["warm"]`` on a pooled connection, else connecting first. What the
    getter saw, how long it took, and each server's state afterwards."""
    cache.set("k", "v")
    if not spec["warm"]:
        cache.close()
        from djmemcache.client import reset_registry

        reset_registry()
    seen = {}

    def getter():
        started = time.monotonic()
        try:
            seen["outcome"] = cache.get("k")
        except Exception as exc:  # noqa: BLE001 - reported
            seen["outcome"] = type(exc).__name__
        seen["seconds"] = time.monotonic() - started

    greenlet = gevent.spawn(getter)
    gevent.sleep(0)  # the getter runs until it waits (for its reply, or to connect)
    until = time.monotonic() + spec["busy"]
    while time.monotonic() < until:  # a view doing CPU work, say
        pass
    greenlet.join()
    seen["status"] = _status(cache)
    return seen


def writes_through_a_stall(cache, spec):
    """``spec["greenlets"]`` greenlets each write rising numbers to keys of
    their own and read them back for ``spec["seconds"]``, while the test
    stalls the server and lets it go: every read older than the write
    before it is reported (a miss is not)."""
    stop_at = time.monotonic() + spec["seconds"]
    older, reads = [], [0]

    def writer(number):
        n = 0
        keys = ["g%d-%d" % (number, i) for i in range(20)]
        while time.monotonic() < stop_at:
            # Read back the last writes first: the server may have come back
            # since, while this greenlet gave way (below).
            for key in keys:
                value = cache.get(key)
                reads[0] += 1
                if value is not None and value < n:
                    older.append([key, value, n])
            n += 1
            for key in keys:
                cache.set(key, n)
            gevent.sleep(0)  # a request's own I/O: with every server out, the calls above never yield

    greenlets = [gevent.spawn(writer, number) for number in range(spec["greenlets"])]
    gevent.joinall(greenlets, timeout=spec["seconds"] + 30)
    return {"older": older[:10], "older_count": len(older), "reads": reads[0], "status": _status(cache),
            "failed_greenlets": [repr(g.exception) for g in greenlets if g.exception is not None]}


def set_many_to_stopped_servers(cache, spec):
    """A ``get_many`` opens a connection to each server; once the test has
    stopped them all (it waits for the file ``spec["ready"]``, then creates
    ``spec["go"]``), one ``set_many`` of ``spec["per_server"]`` values of
    ``spec["value_size"]`` bytes (900 KiB) to each, more than their sockets' buffers take (or a ``set``
    of each, ``spec["one_by_one"]``): its seconds,
    how many keys it could not store, the hub's longest stall meanwhile
    and each server's state afterwards."""
    client = cache.client
    by_server = {index: [] for index in range(len(client.servers))}
    number = 0
    while min(map(len, by_server.values())) < spec["per_server"]:
        key = "big%d" % number
        number += 1
        keys = by_server[client.index_for(cache.make_key(key), write=False)]
        if len(keys) < spec["per_server"]:
            keys.append(key)
    value = b"x" * spec.get("value_size", 900 * 1024)
    data = {key: value for keys in by_server.values() for key in keys}
    cache.get_many(list(data))
    open(spec["ready"], "w").close()
    while not os.path.exists(spec["go"]):
        time.sleep(0.01)
    ticker = Ticker() if PATCHED else None
    started = time.monotonic()
    if spec.get("one_by_one"):  # set: a command sent by itself, not deferred
        failed = [key for key, value in data.items() if cache.set(key, value) or True]
    else:
        failed = cache.set_many(data)
    seconds = time.monotonic() - started
    return {"seconds": seconds, "failed": len(failed), "keys": len(data),
            "longest_hub_stall": ticker.stop() if ticker else None, "status": _status(cache)}


def set_many_round_trip(cache, spec):
    """``set_many`` of ``spec["count"]`` values of ``spec["size"]`` bytes,
    then ``get_many`` of them: keys not stored, whether every value came
    back whole, the seconds of both, each server's state."""
    data = {"rt%d" % n: b"%d" % n * spec["size"] for n in range(spec["count"])}
    started = time.monotonic()
    failed = cache.set_many(data)
    same = cache.get_many(list(data)) == data
    return {"failed": len(failed), "same": same, "seconds": time.monotonic() - started,
            "status": _status(cache)}


SCENARIOS = {"set_many_round_trip": set_many_round_trip, "timed_calls": timed_calls,
             "greenlet_storm": greenlet_storm, "busy_hub": busy_hub,
             "writes_through_a_stall": writes_through_a_stall,
             "set_many_to_stopped_servers": set_many_to_stopped_servers}

if __name__ == "__main__":
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    cache = _setup(spec)
    print(json.dumps(SCENARIOS[name](cache, spec)))
