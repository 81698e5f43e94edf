"""Instructions per call, counted by callgrind: repeatable where timings are not.

    python benchmarks/instructions.py [--calls N] [--only W,W] [--backends B,B]

Starts memcached servers (outside valgrind), then runs this script again
under ``valgrind --tool=callgrind`` twice per workload and backend: once
making 0 calls, once making N. The difference of the two totals divided by N
is the user-space instructions of one call; imports, start-up and the
first connections cancel out. The kernel's share (syscalls) is not counted.
Keep the per-function split with ``--keep DIR`` (then ``callgrind_annotate``).
Counted is a busy site's path, where the pool hands out a connection used
within the last millisecond without looking at it again;
``INSTRUCTIONS_IDLE=1`` counts the path of connections idle longer.
"""

import argparse
import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

BACKENDS = {
    "djmemcache": "djmemcache.backend.PyMemcacheCache",
    "pylibmc": "django.core.cache.backends.memcached.PyLibMCCache",
    "django": "django.core.cache.backends.memcached.PyMemcacheCache",
}

KEYS = ["obj:%d" % j for j in range(50)]


def pickled(j):
    return {"id": j, "name": "object %d" % j, "body": "x" * 180, "tags": ["a", "b"]}


_REQUESTS = itertools.count(1)


def site_request(cache):
    """bench.py's threads-request, one thread: get, set, get_many(10 keys) and a
    missing get between request_started and request_finished (Django calls
    close() on the cache at the end), over this workload's servers."""
    from django.core.signals import request_finished, request_started

    i = next(_REQUESTS)
    n = (i * 8) % 200
    request_started.send(sender=None)
    cache.get("user:%d" % n)
    cache.set("user:%d" % n, {"id": n, "name": "user %d" % n})
    cache.get_many(["obj:%d" % ((n + j) % 50) for j in range(10)])
    cache.get("missing:%d" % i)
    request_finished.send(sender=None)


# name: (servers, fill, call) - call(cache) is one counted call.
WORKLOADS = {
    "request-1": (1, lambda j: {"id": j, "title": "item %d" % j}, site_request),
    "request-3": (3, lambda j: {"id": j, "title": "item %d" % j}, site_request),
    "get_many50-3": (3, pickled, lambda cache: cache.get_many(KEYS)),
    "get_many50-str-3": (3, lambda j: "value %d" % j, lambda cache: cache.get_many(KEYS)),
    "get_many50-1": (1, pickled, lambda cache: cache.get_many(KEYS)),
    "set_many50-3": (3, pickled, lambda cache: cache.set_many({k: pickled(1) for k in KEYS})),
    "get_many10-1": (1, pickled, lambda cache: cache.get_many(KEYS[:10])),
    "get_many10-3": (3, pickled, lambda cache: cache.get_many(KEYS[:10])),
    "get-3": (3, lambda j: "small value", lambda cache: cache.get("obj:1")),
    "get-1": (1, lambda j: "small value", lambda cache: cache.get("obj:1")),
}


def inner(backend, workload, locations, calls):
    """Runs under valgrind: set up, warm up, then exactly ``calls`` calls."""
    import django
    from django.conf import settings

    count, fill, call = WORKLOADS[workload]
    if os.environ.get("INSTRUCTIONS_IDLE") != "1":
        # A busy site reuses a connection within STALE_CHECK_AFTER (1 ms), so
        # the pool hands it out without looking at it again. Under callgrind
        # every call is ~50x slower and each connection would look idle:
        # counted here is the busy path (INSTRUCTIONS_IDLE=1 counts the other).
        from djmemcache import pool

        pool.STALE_CHECK_AFTER = 3600.0
    settings.configure(CACHES={"default": {"BACKEND": BACKENDS[backend], "LOCATION": locations[:count],
                                           "KEY_PREFIX": backend}}, USE_TZ=True)
    django.setup()
    from django.core.cache import caches

    cache = caches["default"]
    cache.set_many({k: fill(j) for j, k in enumerate(KEYS)})
    for _ in range(3):  # connections opened, caches warm
        call(cache)
    # Everything so far out of the collector's sight: a full collection
    # walks every object of Django's, and whether one falls among N calls
    # would decide the count. Collections of the calls' own objects remain.
    gc.collect()
    gc.freeze()
    for _ in range(calls):
        call(cache)


def count_instructions(backend, workload, locations, calls, keep):
    out = os.path.join(keep, "callgrind.%s.%s.%d" % (backend, workload, calls))
    # A fixed hash seed: str hashes decide dict collisions, which moved a
    # count by up to 3 k instructions from one run to the next.
    env = dict(os.environ, PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
    subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                    sys.executable, os.path.abspath(__file__), "--inner", backend, workload,
                    ",".join(locations), str(calls)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    with open(out) as f:
        for line in f:
            match = re.match(r"(summary|totals): (\d+)", line)
            if match:
                return int(match.group(2))
    raise RuntimeError("no totals in %s" % out)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--inner"]:
        backend, workload, locations, calls = sys.argv[2:6]
        return inner(backend, workload, locations.split(","), int(calls))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", default="get_many50-3", help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--backends", default="djmemcache,pylibmc", help=", ".join(BACKENDS))
    parser.add_argument("--keep", default=None, help="directory to keep the callgrind files in")
    args = parser.parse_args(argv)
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    from memcached import MemcachedProcess

    backends = args.backends.split(",")
    if "pylibmc" in backends:
        try:
            import pylibmc  # noqa: F401
        except ImportError:
            print("pylibmc is not installed (`make bench` installs it): its rows are left out")
            backends.remove("pylibmc")
    servers = [MemcachedProcess().start() for _ in range(3)]
    keep = args.keep or tempfile.mkdtemp(prefix="djmemcache-callgrind-")
    os.makedirs(keep, exist_ok=True)
    try:
        locations = [s.location for s in servers]
        for workload in args.only.split(","):
            for backend in backends:
                base = count_instructions(backend, workload, locations, 0, keep)
                total = count_instructions(backend, workload, locations, args.calls, keep)
                print("%-18s %-11s %10.1f k instructions per call" % (
                    workload, backend, (total - base) / args.calls / 1000.0), flush=True)
    finally:
        for server in servers:
            server.stop()
        if args.keep is None:
            shutil.rmtree(keep, ignore_errors=True)


if __name__ == "__main__":
    main()
