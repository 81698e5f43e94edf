"""The djmemcache demo: a Django site on a pooled memcached cache, under
traffic, while one memcached server hangs and comes back.

    python demo/run.py [--location HOST:PORT,...] [--duration 30] [--threads 8]
    (or: make demo ARGS="--duration 60")

It starts three memcached servers on free loopback ports (unless --location
is given), serves demo/demosite with djmemcache from a threaded WSGI server in
a subprocess, drives traffic at it, SIGSTOPs one memcached a third of the way
in and SIGCONTs it at two thirds, then serves the same site with Django's
built-in PyMemcacheCache for a few seconds to compare the connections opened.
Everything it started is stopped at the end, also on Ctrl-C.
"""

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from memcached import MemcachedProcess, free_port  # noqa: E402 - tests/ is on the path only now

BARS = " ▁▂▃▄▅▆▇█"

children = []  # every process we started, stopped on the way out


def wait_for_port(port, proc, what, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("demo: %s exited at start (code %s)" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("demo: %s did not start on port %d" % (what, port))


def start_memcached():
    """A memcached on a free loopback port (the test suite's launcher),
    stopped by ``shutdown`` with everything else."""
    try:
        server = MemcachedProcess().start()
    except RuntimeError as exc:
        sys.exit("demo: %s" % exc)
    children.append(server.proc)
    return server


def memcached_stats(location):
    host, _, port = location.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), 0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"stats\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    stats = {}
    for line in data.decode().split("\r\n"):
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = int(parts[2]) if parts[2].isdigit() else parts[2]
    return stats


def total_connections(locations):
    return sum((memcached_stats(loc) or {}).get("total_connections", 0) for loc in locations)


class Site:
    """The demo Django site in its own process."""

    def __init__(self, locations, backend):
        self.port = free_port()
        env = dict(os.environ, DEMO_LOCATION=",".join(locations), DEMO_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "djmemcache-demo-site.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "demosite", "serve.py"),
                                      str(self.port)], env=env, stdout=self.log, stderr=self.log)
        children.append(self.proc)
        wait_for_port(self.port, self.proc, "the demo site")

    def get(self, path, headers=None, timeout=5):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Set-Cookie")
        finally:
            conn.close()

    def status(self):
        try:
            return json.loads(self.get("/_status", timeout=2)[1])["servers"]
        except (OSError, ValueError, KeyError):
            return []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.log.close()


class Traffic:
    """Threads sending the site a mix of requests, recording each one."""

    PATHS = [("/product/%d", 100, 6), ("/page/%d", 30, 2), ("/fragment/%d", 50, 1), ("/visit", 0, 1)]

    def __init__(self, site, threads):
        self.site = site
        self.threads = threads
        self.records = []  # (started, seconds, status, path template)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.workers = []

    def worker(self, seed):
        rng = random.Random(seed)
        cookie = None
        weighted = [p for p in self.PATHS for _ in range(p[2])]
        while not self.stop_event.is_set():
            template, span, _ = rng.choice(weighted)
            path = template % rng.randrange(span) if span else template
            started = time.monotonic()
            try:
                status, _body, set_cookie = self.site.get(path, {"Cookie": cookie} if cookie else None)
                if set_cookie:
                    cookie = set_cookie.split(";")[0]
            except OSError:
                status = 0
            with self.lock:
                self.records.append((started, time.monotonic() - started, status, template))

    def start(self):
        self.workers = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self.workers:
            w.start()

    def stop(self):
        self.stop_event.set()
        for w in self.workers:
            w.join()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


def ms(seconds):
    return "%.1f ms" % (seconds * 1000)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("%-*s" % (w, h) for w, h in zip(widths, header, strict=True))
    print("  " + line)
    print("  " + "-" * len(line))
    for row in rows:
        print("  " + "  ".join(("%*s" if i else "%-*s") % (w, c)
                               for i, (w, c) in enumerate(zip(widths, row, strict=True))))


def run(args):
    if args.location:
        locations = [loc.strip() for loc in args.location.split(",") if loc.strip()]
        servers = None
    else:
        if not shutil.which("memcached"):
            sys.exit("demo: memcached is not installed: apt-get install memcached (or run `make demo`)")
        servers = [start_memcached() for _ in range(3)]
        locations = [s.location for s in servers]
    victim = servers[1] if servers and not args.no_fault else None

    print("djmemcache demo: a Django site on %d memcached server%s: %s"
          % (len(locations), "s" * (len(locations) > 1), ", ".join(locations)))
    if servers:
        print("memcached pids: %s" % " ".join(str(s.proc.pid) for s in servers))
    site = Site(locations, "djmemcache.backend.PyMemcacheCache")
    print("site served by a threaded WSGI server (thread per connection), pid %d, port %d"
          % (site.proc.pid, site.port))
    if victim:
        print("plan: %ds of traffic from %d threads; memcached %s is SIGSTOPped at %ds and resumed at %ds"
              % (args.duration, args.threads, victim.location, args.duration // 3, 2 * args.duration // 3))
    opened_before = total_connections(locations)
    traffic = Traffic(site, args.threads)
    timeline = []  # (t, server, state)
    last_states = {}
    started = time.monotonic()
    stopped_window = [None, None]
    traffic.start()
    tty = sys.stdout.isatty()
    next_line = 0.0
    try:
        while True:
            now = time.monotonic() - started
            if now >= args.duration:
                break
            if victim and stopped_window[0] is None and now >= args.duration / 3:
                victim.proc.send_signal(signal.SIGSTOP)
                stopped_window[0] = now
                timeline.append((now, victim.location, "SIGSTOP sent"))
            if victim and stopped_window[0] is not None and stopped_window[1] is None \
                    and now >= 2 * args.duration / 3:
                victim.proc.send_signal(signal.SIGCONT)
                stopped_window[1] = now
                timeline.append((now, victim.location, "SIGCONT sent"))
            states = {s["server"]: s["state"] for s in site.status()}
            for server, state in states.items():
                if last_states.get(server, "up") != state:
                    timeline.append((now, server, state))
            last_states.update(states)
            with traffic.lock:
                done = len(traffic.records)
                recent = [r[1] for r in traffic.records[-500:]]
            state_text = " ".join("%s:%s" % (s.rsplit(":", 1)[1], "UP" if st == "up" else "OUT")
                                  for s, st in states.items())
            line = "  t=%4.1fs  requests %6d  %5.0f req/s  p99 %7s  servers %s" % (
                now, done, done / max(now, 0.001), ms(percentile(recent, 0.99)), state_text)
            if tty:
                sys.stdout.write("\r" + line + "   ")
                sys.stdout.flush()
            elif now >= next_line:
                print(line)
                next_line = now + 3
            time.sleep(0.5)
    finally:
        traffic.stop()
        if victim and victim.proc.poll() is None:
            victim.proc.send_signal(signal.SIGCONT)
    if tty:
        print()
    elapsed = time.monotonic() - started
    final_status = site.status()
    opened = total_connections(locations) - opened_before - len(locations)
    site.stop()

    compare = None
    if not args.no_compare:
        print("now %ds of the same traffic with Django's built-in PyMemcacheCache, to compare..."
              % args.compare_seconds)
        before = total_connections(locations)
        django_site = Site(locations, "django.core.cache.backends.memcached.PyMemcacheCache")
        django_traffic = Traffic(django_site, args.threads)
        django_traffic.start()
        time.sleep(args.compare_seconds)
        django_traffic.stop()
        django_site.stop()
        compare = (len(django_traffic.records), total_connections(locations) - before - len(locations))

    report(traffic.records, started, elapsed, opened, compare, timeline, stopped_window,
           final_status, locations)


def describe_errors(errors):
    """The count, then which status on which page (0 = no HTTP answer at all)."""
    total = sum(errors.values())
    if not total:
        return "0"
    return "%d (%s)" % (total, ", ".join("%d x %s on %s" % (n, status or "no answer", path)
                                          for (status, path), n in sorted(errors.items())))


def report(records, started, elapsed, opened, compare, timeline, window, status, locations):
    errors = collections.Counter((r[2], r[3].split("/%")[0]) for r in records if r[2] != 200)
    hits = sum(s.get("hits", 0) for s in status)
    misses = sum(s.get("misses", 0) for s in status)
    print()
    print("=" * 78)
    print("what happened (%.0f s)" % elapsed)
    print("=" * 78)
    rows = [["requests served", "%d (%.0f/s)" % (len(records), len(records) / elapsed)],
            ["errors (non-200)", describe_errors(errors)],
            ["cache hit rate", "%.1f%% (%d hits, %d misses)" % (100.0 * hits / max(1, hits + misses), hits, misses)],
            ["latency p50 / p90 / p99 / max", " / ".join(ms(percentile([r[1] for r in records], q))
                                                         for q in (0.5, 0.9, 0.99, 1.0))]]
    if window[0] is not None and window[1] is not None:
        during = [r[1] for r in records if window[0] <= r[0] - started < window[1]]
        rows.append(["  while a server was stopped", " / ".join(ms(percentile(during, q))
                                                               for q in (0.5, 0.9, 0.99, 1.0))])
    per_k = 1000.0 * opened / max(1, len(records))
    rows.append(["memcached connections opened", "%d for %d requests (%.1f per 1,000)"
                 % (opened, len(records), per_k)])
    if compare:
        requests, django_opened = compare
        rows.append(["  Django's PyMemcacheCache", "%d for %d requests (%.0f per 1,000)"
                     % (django_opened, requests, 1000.0 * django_opened / max(1, requests))])
    table(rows, ["", "djmemcache"])
    if (400, "/visit") in errors:
        print("  (a 400 on /visit is Django's SessionInterrupted: the session was read just before\n"
              "   its server stopped, and Django refuses to save a session it can no longer read)")

    print()
    print("requests per second (each column one second; ▒ marks the stopped server)")
    buckets = [0] * (int(elapsed) + 1)
    for r in records:
        buckets[min(len(buckets) - 1, int(r[0] - started))] += 1
    top = max(buckets) or 1
    print("  " + "".join(BARS[min(8, int(8 * b / top + 0.5))] for b in buckets))
    if window[0] is not None:
        end = window[1] if window[1] is not None else elapsed
        print("  " + "".join("▒" if window[0] <= i < end else " " for i in range(len(buckets))))
    print("  peak %d/s" % top)

    print()
    print("blacklist timeline (states as polled from the site's /_status every 0.5 s)")
    if timeline:
        table([["%.1f s" % t, server, state] for t, server, state in timeline], ["when", "server", "event"])
    else:
        print("  (no state changes)")

    print()
    print("per server: djmemcache's counters in the site process; memcached's own stats")
    print("(memcached's connection totals include the comparison run with Django's backend)")
    rows = []
    for entry, location in zip(status, locations, strict=False):
        stats = memcached_stats(location) or {}
        rows.append([entry["server"], entry["state"], entry["opened"], entry["hits"], entry["misses"],
                     entry["timeouts"], entry["blacklistings"], stats.get("curr_items", "?"),
                     stats.get("total_connections", "?"), stats.get("curr_connections", "?")])
    table(rows, ["server", "state", "opened", "hits", "misses", "timeouts", "blacklisted",
                 "items", "total conns", "curr conns"])


def shutdown(*_args):
    for proc in reversed(children):
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--location", help="comma-separated memcached servers to use instead of starting 3")
    parser.add_argument("--duration", type=int, default=30, help="seconds of traffic (default 30)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--compare-seconds", type=int, default=5,
                        help="seconds of the same traffic with Django's own backend (default 5)")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison run")
    parser.add_argument("--no-fault", action="store_true", help="do not stop a server midway")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything the demo started")
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
