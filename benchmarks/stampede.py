"""Stampedes: djmemcache's get_or_set against Django's memcached backends.

    python benchmarks/stampede.py [--rounds N] [--hot-seconds S]   (or: make bench-stampede)

1. Crowd: 4 processes x 50 threads call ``get_or_set`` on one missing key
   whose computation takes 200 ms. Printed: computations (Django: one per
   caller; target 1), the slowest caller's latency, and misses (callers
   left without the value).
2. Hot key: 8 threads read one key through ``get_or_set`` (timeout 10 s)
   across several expiries. Printed: computations per generation of the
   value (a generation: one value that callers read) and misses (reads
   memcached answered with "not found", from its get_misses counter).

Each backend runs on a memcached of its own, started here. Nothing is
asserted: this only reports (the test suite pins the behaviour).
"""

import argparse
import itertools
import multiprocessing
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench import ensure_pylibmc, start_memcached  # noqa: E402 - benchmarks/ and tests/ on the path

COMPUTE_SECONDS = 0.2
HOT_TIMEOUT = 10
FORK = multiprocessing.get_context("fork")

#: alias: (backend, OPTIONS)
BACKENDS = {
    "djmemcache": ("djmemcache.backend.PyMemcacheCache", {}),
    "djmemcache EARLY_REFRESH=6": ("djmemcache.backend.PyMemcacheCache", {"EARLY_REFRESH": 6}),
    "django PyMemcacheCache": ("django.core.cache.backends.memcached.PyMemcacheCache", {}),
    "django PyLibMCCache": ("django.core.cache.backends.memcached.PyLibMCCache", {}),
}
CROWD_BACKENDS = ("djmemcache", "django PyMemcacheCache", "django PyLibMCCache")


def configure(locations):
    import django
    from django.conf import settings

    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    for alias, location in locations.items():
        path, options = BACKENDS[alias]
        caches[alias] = {"BACKEND": path, "LOCATION": location, "OPTIONS": dict(options)}
    settings.configure(SECRET_KEY="bench", CACHES=caches, USE_TZ=True, DATABASES={})
    django.setup()


# -- 1. a crowd on one missing key -------------------------------------------------

def _crowd_process(alias, key, threads, go, computations, results):
    from django.core.cache import caches

    def compute():
        with computations.get_lock():
            computations.value += 1
        time.sleep(COMPUTE_SECONDS)
        return "the value"

    outcomes = []

    def caller():
        cache = caches[alias]  # per thread, as Django hands them out
        go.wait()
        started = time.monotonic()
        try:
            value = cache.get_or_set(key, compute, timeout=60)
        except Exception as exc:  # noqa: BLE001 - counted as a miss
            value = exc
        outcomes.append((time.monotonic() - started, value))

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(outcomes)


def crowd(alias, key, processes=4, threads=50):
    go = FORK.Event()
    computations = FORK.Value("i", 0)
    results = FORK.Queue()
    members = [FORK.Process(target=_crowd_process, args=(alias, key, threads, go, computations, results))
               for _ in range(processes)]
    for member in members:
        member.start()
    time.sleep(1.0)  # every thread waiting on ``go``
    go.set()
    outcomes = [outcome for _ in members for outcome in results.get(timeout=120)]
    for member in members:
        member.join()
    slowest = max(latency for latency, _value in outcomes)
    misses = sum(1 for _latency, value in outcomes if value != "the value")
    return computations.value, slowest, misses


# -- 2. a hot key across its expiries ------------------------------------------------

def hot_key(alias, server, seconds, threads=8):
    from django.core.cache import caches

    generation = itertools.count(1)
    computations = []

    def compute():
        computations.append(1)
        time.sleep(COMPUTE_SECONDS)
        return next(generation)

    caches[alias].get_or_set("hot", compute, timeout=HOT_TIMEOUT)
    misses_before = server.stats()["get_misses"]
    stop = time.monotonic() + seconds
    read = []

    def reader():
        cache = caches[alias]
        while time.monotonic() < stop:
            read.append(cache.get_or_set("hot", compute, timeout=HOT_TIMEOUT))
            time.sleep(0.005)

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    misses = server.stats()["get_misses"] - misses_before
    generations = len(set(read))
    computed = len(computations) - 1  # the first was before the run
    return computed, computed / max(1, generations - 1), misses, len(read)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="crowd runs per backend (median shown)")
    parser.add_argument("--hot-seconds", type=float, default=30.0, help="length of the hot-key run")
    args = parser.parse_args(argv)
    aliases = [a for a in BACKENDS if "PyLibMC" not in a or ensure_pylibmc()]
    servers = {alias: start_memcached() for alias in aliases}
    try:
        configure({alias: server.location for alias, server in servers.items()})
        print("crowd: 4 processes x 50 threads, get_or_set of one missing key, 200 ms computation "
              "(median of %d rounds)" % args.rounds)
        print("%-28s %13s %16s %8s" % ("backend", "computations", "slowest caller", "misses"))
        for alias in (a for a in CROWD_BACKENDS if a in aliases):
            runs = [crowd(alias, "crowd-%d" % n) for n in range(args.rounds)]
            print("%-28s %13d %13.0f ms %8d" % (
                alias, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs) * 1000,
                statistics.median(r[2] for r in runs)), flush=True)
        print()
        print("hot key: 8 threads, get_or_set with timeout %d s, %.0f s (about %d expiries), 200 ms computation"
              % (HOT_TIMEOUT, args.hot_seconds, args.hot_seconds // HOT_TIMEOUT))
        print("%-28s %13s %16s %8s %12s" % ("backend", "computations", "per generation", "misses", "reads"))
        for alias in aliases:
            computed, per_generation, misses, reads = hot_key(alias, servers[alias], args.hot_seconds)
            print("%-28s %13d %16.1f %8d %12d" % (alias, computed, per_generation, misses, reads), flush=True)
        print("(per generation: computations for each new value callers read; misses: reads memcached "
              "answered \"not found\", its get_misses during the run)")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
