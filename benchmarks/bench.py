"""djmemcache against Django's built-in memcached backends, in one run.

    python benchmarks/bench.py [--quick] [--rounds N] [--only W,W] [--backends B,B]
    (or: make bench ARGS="--only threads --backends djmemcache,pylibmc")

Starts its own memcached servers on free loopback ports, then runs the same
workloads through Django's public cache API for each backend, rounds
interleaved, each in another order (A B C D, B C D A, ...), and prints the
medians with the ratio of djmemcache to each other backend (> 1 means
djmemcache is better, whether the metric is a rate or a time). The last
line, ``BENCH_JSON {...}``, is for machines. Timing is never asserted
anywhere: this script only reports.

Workloads (``--only`` takes any of these names, comma-separated, or a prefix
such as ``threads``): ``request-loop`` (8 threads, 3 gets + 1 set per
request), ``threads-request`` (issue 11: 8 threads, get, set, get_many of 10,
a missing get per request; 1 and 3 servers), ``threads-many`` (4 threads each
calling get_many of 50 keys: ~250-byte pickled values over 3 servers, short
str values over 3 servers, pickled values on 1 server), ``hot``, ``many``
(one thread, *_many of 50 keys), ``async``, ``choice``. Threaded workloads
also report process CPU time (user + system, from getrusage) and context
switches (voluntary + involuntary) per call.
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from memcached import MemcachedProcess  # noqa: E402 - tests/ is on the path only now

BACKENDS = {
    "djmemcache": ("djmemcache.backend.PyMemcacheCache", {}),
    "django": ("django.core.cache.backends.memcached.PyMemcacheCache", {}),
    "django-pooled": ("django.core.cache.backends.memcached.PyMemcacheCache", {"use_pooling": True}),
    "pylibmc": ("django.core.cache.backends.memcached.PyLibMCCache", {}),
}


# -- memcached servers -------------------------------------------------------

def start_memcached():
    """A memcached on a free loopback port: the test suite's own launcher."""
    return MemcachedProcess().start()


def ensure_pylibmc():
    try:
        import pylibmc  # noqa: F401
        return True
    except ImportError:
        pass
    print("pylibmc is not installed; trying `pip install pylibmc` (needs Debian libmemcached-dev)...")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pylibmc"],
                            capture_output=True, text=True)
    if result.returncode:
        print("  could not build pylibmc (apt-get install libmemcached-dev): its column is left out")
        return False
    return True


# -- workloads ----------------------------------------------------------------

def request_loop(alias, threads, requests_per_thread):
    """Requests of 3 gets + 1 set, each wrapped in request_started/finished,
    as Django's handler does (request_finished calls close() on the caches).

    Returns requests/s, and this process's CPU time (user + system, µs) and
    context switches per request: with 8 threads, GIL hand-offs show there."""
    return threaded(alias, threads, requests_per_thread, small_request, requests=True)


def small_request(cache, thread, i):
    n = (i + thread * 7) % 100
    cache.get("user:%d" % n)
    cache.get("page:%d" % (n % 20))
    cache.get("missing:%d" % n)
    cache.set("user:%d" % n, {"id": n, "name": "user %d" % n})


def threaded(alias, threads, calls_per_thread, call, prepare=None, requests=False):
    """``call(cache, thread, i)`` from ``threads`` threads at once.

    Each thread takes its own backend instance, as Django's handler does;
    with ``requests`` every call is wrapped in request_started/finished (so
    Django calls ``close()`` on the caches). Returns calls/s, CPU time of
    the process (user + system, us) and context switches (voluntary +
    involuntary) per call: with threads, GIL hand-offs show there."""
    from django.core.cache import caches
    from django.core.signals import request_finished, request_started

    if prepare is not None:
        prepare(caches[alias])
    barrier = threading.Barrier(threads + 1)

    def worker(offset):
        barrier.wait()
        for i in range(calls_per_thread):
            if requests:
                request_started.send(sender=None)
            call(caches[alias], offset, i)
            if requests:
                request_finished.send(sender=None)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    calls = threads * calls_per_thread
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / calls * 1e6
    switches = (after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw) / calls
    return calls / elapsed, cpu, switches


def issue_request(cache, thread, i):
    """One request of issue 11's site: get, set, get_many of 10 keys, a missing get."""
    n = (i * 8 + thread * 13) % 200
    cache.get("user:%d" % n)
    cache.set("user:%d" % n, {"id": n, "name": "user %d" % n})
    cache.get_many(["item:%d" % ((n + j) % 100) for j in range(10)])
    cache.get("missing:%d:%d" % (thread, i))


def servers_asked(alias, servers, calls=100):
    """Get commands sent per ``get_many`` of the site request's 10 keys, from
    memcached's own ``bytes_read``: a get of k keys is "get", k times " <key>",
    then CRLF, so what is left after the keys' bytes is 5 bytes a command.

    Why: placement decides how many servers a multi-key call asks. pylibmc's
    default (modula of one-at-a-time hashes) puts neighbouring keys such as
    item:1 ... item:10 on fewer servers than the rendezvous hashing of
    djmemcache and Django's PyMemcacheCache (which share placement), so on
    these keys it makes fewer round trips per call."""
    from django.core.cache import caches

    cache = caches[alias]
    batches = [["item:%d" % ((n + j) % 100) for j in range(10)] for n in range(0, 8 * calls, 8)]
    before = sum(s.stats()["bytes_read"] for s in servers)
    for keys in batches:
        cache.get_many(keys)
    after = sum(s.stats()["bytes_read"] for s in servers)
    key_bytes = sum(1 + len(cache.make_key(key)) for keys in batches for key in keys)
    stats_bytes = len(b"stats\r\n") * len(servers)  # the first snapshot's own commands
    return (after - before - stats_bytes - key_bytes) / 5.0 / len(batches)


def fill_items(cache):
    cache.set_many({"item:%d" % j: {"id": j, "title": "item %d" % j} for j in range(100)})


# get_many(50) payloads: pickled dicts of about 250 bytes, or short strs.
MANY_KEYS = ["obj:%d" % j for j in range(50)]


def fill_pickled(cache):
    cache.set_many({k: {"id": j, "name": "object %d" % j, "body": "x" * 180, "tags": ["a", "b"]}
                    for j, k in enumerate(MANY_KEYS)})


def fill_str(cache):
    cache.set_many({k: "value %d" % j for j, k in enumerate(MANY_KEYS)})


def get_many_50(cache, thread, i):
    cache.get_many(MANY_KEYS)


def hot_loop(alias, n):
    from django.core.cache import caches

    cache = caches[alias]
    cache.set("hot", "small value")
    started = time.perf_counter()
    for _ in range(n):
        cache.get("hot")
    get_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(n):
        cache.set("hot", "small value")
    set_us = (time.perf_counter() - started) / n * 1e6
    return get_us, set_us


def many_ops(alias, calls):
    from django.core.cache import caches

    cache = caches[alias]
    data = {"many:%d" % i: {"i": i} for i in range(50)}
    keys = list(data)
    timings = {}
    for name, call in (("set_many", lambda: cache.set_many(data)),
                       ("get_many", lambda: cache.get_many(keys)),
                       ("delete_many", lambda: cache.delete_many(keys))):
        call()
        started = time.perf_counter()
        for _ in range(calls):
            call()
        timings[name] = (time.perf_counter() - started) / calls * 1e6
    return timings


def async_load(alias, requests, concurrency):
    """ASGI-style: many tasks awaiting cache calls at once. Returns requests/s
    and, for djmemcache, the most pooled connections busy at one moment
    (Django's backends run every a* call in one thread: one at a time)."""
    from django.core.cache import caches

    cache = caches[alias]
    peak = [1]
    stop = threading.Event()
    pool = getattr(getattr(cache, "client", None), "pools", [None])[0]

    def sample():
        while pool is not None and not stop.is_set():
            peak[0] = max(peak[0], pool.status()["in_use"])
            time.sleep(0.001)

    async def one(i, semaphore):
        async with semaphore:
            await cache.aget("user:%d" % (i % 100))
            await cache.aget("page:%d" % (i % 20))
            await cache.aget("missing:%d" % i)
            await cache.aset("user:%d" % (i % 100), i)

    async def main():
        semaphore = asyncio.Semaphore(concurrency)
        started = time.perf_counter()
        await asyncio.gather(*[one(i, semaphore) for i in range(requests)])
        return requests / (time.perf_counter() - started)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        rate = asyncio.run(main())
    finally:
        stop.set()
        sampler.join()
    return rate, peak[0]


def raw_get_us(server, n):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for _ in range(n):
            sock.sendall(b"get :1:hot\r\n")
            data = sock.recv(65536)
            while not data.endswith(b"END\r\n"):
                data += sock.recv(65536)
        return (time.perf_counter() - started) / n * 1e6


def placement_us(nodes, n):
    from pymemcache.client.rendezvous import RendezvousHash

    from djmemcache.servers import Rendezvous

    ours, theirs = Rendezvous(nodes), RendezvousHash(nodes=list(nodes))
    keys = [":1:key-%d" % i for i in range(n)]
    everyone = tuple(range(len(nodes)))
    started = time.perf_counter()
    for key in keys:
        ours.choose(key, everyone)
    ours_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for key in keys:
        theirs.get_node(key)
    return ours_us, (time.perf_counter() - started) / n * 1e6


# -- running and reporting ------------------------------------------------------

def configure(servers, backends):
    import django
    from django.conf import settings

    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    for name in backends:
        path, options = BACKENDS[name]
        # Each backend its own keys: pylibmc's flags are not pymemcache's.
        caches[name + "@1"] = {"BACKEND": path, "LOCATION": servers[0].location, "KEY_PREFIX": name,
                               "OPTIONS": dict(options)}
        caches[name + "@3"] = {"BACKEND": path, "LOCATION": [s.location for s in servers],
                               "KEY_PREFIX": name, "OPTIONS": dict(options)}
    settings.configure(SECRET_KEY="bench", CACHES=caches, USE_TZ=True, DATABASES={})
    django.setup()


def connections_opened(servers, run):
    before = sum(s.stats()["total_connections"] for s in servers)
    result = run()
    after = sum(s.stats()["total_connections"] for s in servers)
    return result, after - before - len(servers)  # minus the stats calls' own


WORKLOADS = ("request-loop", "threads-request", "threads-many", "hot", "many", "async", "choice")


def selected(only):
    if not only:
        return set(WORKLOADS)
    chosen = set()
    for word in only.split(","):
        matches = [w for w in WORKLOADS if w == word or w.startswith(word)]
        if not matches:
            sys.exit("--only: unknown workload %r (choose from %s)" % (word, ", ".join(WORKLOADS)))
        chosen.update(matches)
    return chosen


def run_round(name, workloads, servers, scale, record):
    """One round of every chosen workload for backend ``name``."""
    per_thread = int(300 * scale)
    if "request-loop" in workloads:
        for count in (1, 3):
            label = "%d server%s" % (count, "s" * (count > 1))
            (rate, cpu, switches), opened = connections_opened(
                servers, lambda count=count: request_loop("%s@%d" % (name, count), 8, per_thread))
            record("request loop, 8 threads, %s (req/s)" % label, name, rate)
            record("  CPU per request, %s (us, user+sys)" % label, name, cpu)
            record("  context switches per request, %s" % label, name, switches)
            if count == 3:
                record("connections opened per 1,000 requests (3 servers)", name,
                       opened * 1000.0 / (8 * per_thread))
    if "threads-request" in workloads:
        for count in (1, 3):
            label = "%d server%s" % (count, "s" * (count > 1))
            rate, cpu, switches = threaded("%s@%d" % (name, count), 8, int(200 * scale), issue_request,
                                           fill_items, requests=True)
            record("site requests, 8 threads: get+set+get_many(10)+miss, %s (req/s)" % label, name, rate)
            record("  CPU per site request, %s (us)" % label, name, cpu)
            record("  context switches per site request, %s" % label, name, switches)
            if count == 3:
                record("  servers asked per get_many(10), 3 servers", name,
                       servers_asked("%s@3" % name, servers))
    if "threads-many" in workloads:
        for label, alias, fill in (("pickled ~250 B, 3 servers", "@3", fill_pickled),
                                   ("short str, 3 servers", "@3", fill_str),
                                   ("pickled ~250 B, 1 server", "@1", fill_pickled)):
            rate, cpu, switches = threaded(name + alias, 4, int(250 * scale), get_many_50, fill)
            record("4 threads, get_many(50) %s (calls/s)" % label, name, rate)
            record("  CPU per call, %s (us)" % label, name, cpu)
            record("  context switches per call, %s" % label, name, switches)
    if "hot" in workloads:
        get_us, set_us = hot_loop(name + "@1", int(4000 * scale))
        record("hot loop: cache.get (us)", name, get_us)
        record("hot loop: cache.set (us)", name, set_us)
    if "many" in workloads:
        for op, us in many_ops(name + "@3", int(200 * scale)).items():
            record("%s of 50 keys, 3 servers (us)" % op, name, us)
    if "async" in workloads:
        rate, peak = async_load(name + "@1", int(2000 * scale), 50)
        record("async: 50 tasks x 4 awaits (req/s)", name, rate)
        if name == "djmemcache":
            record("async: pooled connections busy at once (peak)", name, peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about a minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default="", help="workloads, comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--backends", default="", help="comma-separated: " + ", ".join(BACKENDS))
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    scale = 0.4 if args.quick else 1.0
    workloads = selected(args.only)

    if not shutil.which("memcached"):
        sys.exit("memcached is not installed: `apt-get install memcached` (or `make bench`)")
    wanted = args.backends.split(",") if args.backends else list(BACKENDS)
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        sys.exit("--backends: unknown %s (choose from %s)" % (", ".join(unknown), ", ".join(BACKENDS)))
    if "djmemcache" not in wanted:
        wanted.insert(0, "djmemcache")
    backends = [b for b in BACKENDS if b in wanted and (b != "pylibmc" or ensure_pylibmc())]
    servers = [start_memcached() for _ in range(3)]
    try:
        configure(servers, backends)
        samples = {}

        def record(metric, backend, value):
            samples.setdefault(metric, {}).setdefault(backend, []).append(value)

        for n in range(rounds):
            print("round %d/%d" % (n + 1, rounds), flush=True)
            if "hot" in workloads:  # the bare round trip, first, for every round
                record("hot loop: cache.get (us)", "raw socket", raw_get_us(servers[0], int(4000 * scale)))
            # Each round in another order: what runs right after a given
            # workload runs differently on this VM (the hot get measured
            # right after the bare-socket loop ran 10-20% slower).
            for name in backends[n % len(backends):] + backends[:n % len(backends)]:
                run_round(name, workloads, servers, scale, record)
        if "choice" in workloads:
            choice = placement_us([s.location for s in servers], 100_000)
    finally:
        for server in servers:
            server.stop()

    medians = {m: {b: statistics.median(v) for b, v in by.items()} for m, by in samples.items()}
    if "choice" in workloads:
        medians["server choice per key, 3 servers (us)"] = {"djmemcache": choice[0], "pymemcache": choice[1]}
    report(medians, backends, rounds)


LOWER_IS_BETTER = ("(us", "connections opened", "context switches", "CPU per", "servers asked")


def ratio(metric, ours, theirs):
    if not ours or not theirs:
        return None
    return theirs / ours if any(k in metric for k in LOWER_IS_BETTER) else ours / theirs


def report(medians, backends, rounds):
    others = [b for b in backends if b != "djmemcache"]
    names = {"djmemcache": "djmemcache", "django": "django", "django-pooled": "dj-pooled",
             "pylibmc": "pylibmc"}
    ratio_columns = [b for b in ("django", "pylibmc") if b in others]
    width = max(len(m) for m in medians) + 2
    header = "%-*s" % (width, "median of %d rounds" % rounds)
    header += "".join("%11s" % names[c] for c in ["djmemcache"] + others)
    header += "".join("%13s" % ("ours/" + names[c]) for c in ratio_columns)
    print()
    print(header)
    print("-" * len(header))
    ratios = {}
    for metric, by in medians.items():
        for other in by:
            r = ratio(metric, by.get("djmemcache"), by.get(other)) if other != "djmemcache" else None
            if r is not None:
                ratios.setdefault(metric, {})[other] = r
        if metric.startswith("server choice"):
            continue
        row = "%-*s" % (width, metric)
        for c in ["djmemcache"] + others:
            value = by.get(c)
            row += "%11s" % ("" if value is None else ("%.1f" % value if value < 100 else "%.0f" % value))
        for c in ratio_columns:
            r = ratios.get(metric, {}).get(c)
            row += "%13s" % ("" if r is None else "%.2fx" % r)
        print(row)
    print("-" * len(header))
    print("ours/x > 1 means djmemcache is better (more per second, fewer microseconds or connections).")
    raw = medians.get("hot loop: cache.get (us)", {}).get("raw socket")
    if raw:
        print("a bare socket doing the same get: %.1f us (djmemcache's cache.get: %.2fx of it; a mostly"
              % (raw, medians["hot loop: cache.get (us)"]["djmemcache"] / raw))
        print("  idle loop can measure slower than a busier one on a VM: docs/performance.rst)")
    choice = medians.get("server choice per key, 3 servers (us)")
    if choice:
        print("choosing the server of a key among 3: %.2f us (pymemcache's RendezvousHash: %.1f us, "
              "same placement)" % (choice["djmemcache"], choice["pymemcache"]))
    print("BENCH_JSON " + json.dumps({"medians": medians, "ratios": ratios, "rounds": rounds},
                                     separators=(",", ":"), sort_keys=True))


if __name__ == "__main__":
    main()
