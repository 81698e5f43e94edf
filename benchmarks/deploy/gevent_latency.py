"""Request latency under gunicorn ``-k gevent``: djmemcache against Django's PyMemcacheCache.

    .venv/bin/python benchmarks/deploy/gevent_latency.py [--seconds 10] [--rounds 3]

Also the threaded site of issue 11 (gunicorn 2 workers x 8 gthreads), against
pylibmc::

    .venv/bin/python benchmarks/deploy/gevent_latency.py --worker-class gthread \
        --threads 8 --only djmemcache --only pylibmc

Starts one memcached, then for each backend a gunicorn with gevent workers
serving tests/deploy_app.py (a view doing get, set on a miss, get_many),
and drives it with wrk (32 connections, keys spread over 1000 items). The
backends' rounds are interleaved; the median of each figure is printed,
with the workers' CPU and context switches per request. With several
workers it also says how many of wrk's connections each worker held:
they stay with whichever worker won each accept, the split is a lottery
(29 and 3 as often as 16 and 16), and an uneven round runs slower whatever
the cache, so the medians of the even rounds are printed too. Each round
first warms every worker up with requests on connections of their own,
and the workers' bytecode is written once and read after (as an installed
package's would be), so neither worker meets the measured run cold. On
a shared machine the p99s are noisy: compare backends within one run.
Timing is only reported, never asserted.

To compare with an older djmemcache, install that commit in a venv of its
own and pass ``--venv``::

    git archive <commit> | tar -x -C /tmp/old-src
    python3 -m venv /tmp/old && /tmp/old/bin/pip install gevent gunicorn packaging /tmp/old-src
    .venv/bin/python benchmarks/deploy/gevent_latency.py --venv /tmp/old
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, TESTS)

from memcached import MemcachedProcess, free_port  # noqa: E402 - tests/ is on the path only now

BACKENDS = {
    "djmemcache": ("djmemcache.backend.PyMemcacheCache", {"TIMEOUT": 0.5}),
    "django": ("django.core.cache.backends.memcached.PyMemcacheCache", {}),
    "pylibmc": ("django.core.cache.backends.memcached.PyLibMCCache", {}),
}
DEFAULT_BACKENDS = ["djmemcache", "django"]

# Spread requests over 1000 items, as a site's traffic would be.
WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/sync/" .. math.random(0, 999))
end
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}

#: A round counts as even when every worker holds at least this share of
#: an even split of wrk's connections.
EVEN = 0.5


def _seconds(text):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output):
    """``{"p50": s, "p99": s, "max": s, "rps": n, "errors": n}`` from ``wrk --latency``."""
    result = {"errors": 0}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            result["p" + parts[0][:-1]] = _seconds(parts[1])
        elif parts[:1] == ["Latency"] and len(parts) == 5:
            result["max"] = _seconds(parts[3])
        elif parts[:1] == ["Requests/sec:"]:
            result["rps"] = float(parts[1])
        elif line.strip().startswith("Non-2xx"):
            result["errors"] += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            result["errors"] += sum(int(n) for n in re.findall(r"\d+", line))
            result["socket_errors"] = line.strip()  # a timeout is a request over wrk's 2 s
    return result


def _wait_listening(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gunicorn exited with %s (its log is printed above)" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gunicorn did not listen on %d" % port)


def gunicorn(backend, location, options, workers, log, bindir, extra=(), worker_class="gevent",
             pycache=None):
    """gunicorn from ``bindir`` (a venv's bin: its djmemcache is the one measured).

    ``pycache``: a directory for the bytecode of every module the workers
    import. A source checkout run with PYTHONDONTWRITEBYTECODE (as here)
    compiles djmemcache anew in every worker, some 25 ms of a worker's
    first request that an installed package (compiled by pip) never pays,
    and Django's modules, installed, did not pay either."""
    port = free_port()
    env = dict(os.environ, DEPLOY_BACKEND=backend, DEPLOY_LOCATION=location,
               DEPLOY_OPTIONS=json.dumps(options), PYTHONPATH=TESTS)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    command = [os.path.join(bindir, "gunicorn"), "-k", worker_class,
               "-w", str(workers), "-b", "127.0.0.1:%d" % port, "--log-level", "warning",
               *extra, "deploy_app:wsgi"]
    proc = subprocess.Popen(command, env=env, cwd=TESTS, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        log.seek(0)
        print(log.read()[-3000:])
        raise
    return proc, port


def _workers(master):
    """The pids of gunicorn's workers (children of ``master``), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == master:  # ppid
                    pids.append(entry)
        except (OSError, IndexError, ValueError):  # a process that just exited
            continue
    return pids


def _workers_usage(master):
    """CPU seconds (user, system) of each of gunicorn's workers so far
    (pid -> (user, system)), and their context switches (voluntary +
    involuntary, every thread), from /proc. The system share is mostly
    the GIL's hand-offs between threads (futex) and the sockets' syscalls."""
    cpu = {}
    switches = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _workers(master):
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu[pid] = (int(fields[11]) / tick, int(fields[12]) / tick)
            for task in os.listdir("/proc/%s/task" % pid):
                with open("/proc/%s/task/%s/status" % (pid, task)) as f:
                    switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except (OSError, IndexError, ValueError):  # a process that just exited
            continue
    return cpu, switches


def _connections_per_worker(master, port):
    """Established connections to ``port`` that each of gunicorn's workers
    holds now (pid -> count), from /proc: wrk's keep-alive connections stay
    with the worker that accepted them."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        inodes.add(fields[9])
        except OSError:
            continue
    held = {}
    for pid in _workers(master):
        try:
            links = [os.readlink("/proc/%s/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%s/fd" % pid)]
        except OSError:
            continue
        held[pid] = sum(link[8:-1] in inodes for link in links if link.startswith("socket:["))
    return held


def _look_at_split(into, master, port):
    into.update(_connections_per_worker(master, port))


def wrk(port, seconds, connections, script, close=False):
    """wrk's figures; with ``close``, every request on a connection of its own."""
    output = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", "%ds" % seconds, "--latency",
         *(["-H", "Connection: close"] if close else []),
         "-s", script, "http://127.0.0.1:%d/" % port],
        capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--options", default=None,
                        help="djmemcache OPTIONS as JSON (default %s)" % json.dumps(BACKENDS["djmemcache"][1]))
    parser.add_argument("--servers", type=int, default=1, help="memcached servers (default 1)")
    parser.add_argument("--preload", action="store_true", help="gunicorn --preload")
    parser.add_argument("--worker-class", default="gevent", help="gunicorn -k (default gevent)")
    parser.add_argument("--threads", type=int, default=None, help="gunicorn --threads (gthread)")
    parser.add_argument("--worker-connections", type=int, default=None,
                        help="gunicorn --worker-connections: with CONNECTIONS / WORKERS, every "
                             "worker holds an even share of wrk's connections")
    parser.add_argument("--log", help="write gunicorn's whole log (djmemcache's warnings) here")
    parser.add_argument("--only", choices=sorted(BACKENDS), action="append")
    parser.add_argument("--venv", default=os.path.dirname(os.path.dirname(sys.executable)),
                        help="virtualenv whose gunicorn and djmemcache to run (default: this "
                             "Python's), e.g. one with an older commit installed")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    backends = dict(BACKENDS)
    if args.options:
        backends["djmemcache"] = (backends["djmemcache"][0], json.loads(args.options))
    names = args.only or DEFAULT_BACKENDS
    servers = [MemcachedProcess().start() for _ in range(args.servers)]
    location = ",".join(server.location for server in servers)
    extra = ["--preload"] if args.preload else []
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.worker_connections:
        extra += ["--worker-connections", str(args.worker_connections)]
    try:
        summary = _run(args, names, backends, location, extra)
    finally:
        for server in servers:
            server.kill()
    print("DEPLOY_JSON " + json.dumps(summary))


def _run(args, names, backends, location, extra):
    figures = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "spread.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        with open(os.path.join(tmp, "gunicorn.log"), "w+") as log:
            full_log = _rounds(args, names, backends, location, extra, script, log, figures,
                               os.path.join(tmp, "pycache"))
    tail = full_log[-3000:]
    print("\nmedian of %d rounds, gunicorn -k %s -w %d%s, %d memcached, wrk -c %d -d %ds:"
          % (args.rounds, args.worker_class, args.workers, "".join(" " + e for e in extra),
             args.servers, args.connections, args.seconds))
    summary = {}
    for name in names:
        runs = figures[name]
        summary[name] = _medians(runs)
        summary[name]["errors"] = sum(r["errors"] for r in runs)
        even = [r for r in runs if _even(r, args)]
        summary[name]["even_rounds"] = len(even)
        summary[name]["even"] = _medians(even) if even else None
        s = summary[name]
        print("  %-10s p50 %7.2f ms  p99 %8.2f ms  max %8.2f ms  %7.0f req/s  errors %d  "
              "workers' CPU %4.0f us (system %3.0f)  switches %4.1f per request"
              % (name, 1000 * s["p50"], 1000 * s["p99"], 1000 * s["max"], s["rps"], s["errors"],
                 s["cpu_us"], s["sys_us"], s["switches"]))
    if args.workers > 1:
        print("rounds where each worker held at least %d%% of an even share of wrk's connections:"
              % (100 * EVEN))
        for name in names:
            s = summary[name]
            print("  %-10s %s of %d rounds%s" % (name, s["even_rounds"], len(figures[name]),
                                                  "  %7.0f req/s" % s["even"]["rps"] if s["even"] else ""))
    if any(word in tail for word in ("Traceback", "ERROR", "blacklisted", "ignored")):
        print("\ngunicorn log (tail):\n" + tail)
    if args.log:
        with open(args.log, "w") as f:
            f.write(full_log)
    return summary


def _even(result, args):
    split = result["split"]
    return len(split) == args.workers and min(split) >= EVEN * args.connections / args.workers


def _medians(runs):
    figures = ("p50", "p99", "max", "rps", "cpu_us", "sys_us", "switches")
    return {k: statistics.median(r[k] for r in runs) for k in figures}


def _rounds(args, names, backends, location, extra, script, log, figures, pycache=None):
    """Run the rounds, backends interleaved; return gunicorn's log."""
    for round_ in range(args.rounds):
        for name in names:
            backend, options = backends[name]
            proc, port = gunicorn(backend, location, options, args.workers, log,
                                  os.path.join(os.path.abspath(args.venv), "bin"), extra,
                                  args.worker_class, pycache)
            try:
                # Warm up (imports, Django's first request, the cache's connections)
                # every worker: on connections of one request each, so each worker
                # wins accepts. On keep-alive connections one worker often won all
                # 32 and the other met the measured run cold, and lost its accepts
                # while it warmed up: the split then favoured whichever worker was
                # warm, and the longer a first request took, the more.
                wrk(port, 2, args.connections, script, close=True)
                cpu, switches = _workers_usage(proc.pid)
                split = {}
                look = threading.Timer(args.seconds / 2, _look_at_split, (split, proc.pid, port))
                look.start()
                try:
                    result = wrk(port, args.seconds, args.connections, script)
                finally:
                    look.join()
                after = _workers_usage(proc.pid)
                served = result["rps"] * args.seconds
                user = sum(u - cpu.get(pid, (0, 0))[0] for pid, (u, _s) in after[0].items())
                system = sum(s - cpu.get(pid, (0, 0))[1] for pid, (_u, s) in after[0].items())
                result["cpu_us"] = (user + system) / served * 1e6
                result["sys_us"] = system / served * 1e6
                result["switches"] = (after[1] - switches) / served
                # wrk's keep-alive connections stay with whichever worker won each
                # accept, and the split is a lottery (29 and 3, or 32 and 0, as often
                # as 16 and 16); a worker with more connections than threads makes
                # them wait while the other's threads idle, whatever the cache.
                result["split"] = sorted(split.values(), reverse=True)
            finally:
                proc.terminate()
                proc.wait()
            figures[name].append(result)
            print("round %d %-10s p50 %7.2f ms  p99 %8.2f ms  max %8.2f ms  %7.0f req/s  errors %d  "
                  "workers' CPU %4.0f us (system %3.0f)  switches %4.1f per request  "
                  "connections per worker %s%s"
                  % (round_ + 1, name, 1000 * result["p50"], 1000 * result["p99"], 1000 * result["max"],
                     result["rps"], result["errors"], result["cpu_us"], result["sys_us"], result["switches"],
                     "/".join(map(str, result["split"])), "" if _even(result, args) else " (uneven)"),
                  result.get("socket_errors", ""), flush=True)
    log.seek(0)
    return log.read()


if __name__ == "__main__":
    main()
