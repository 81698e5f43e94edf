"""TIMEOUT, blacklisting and the pool under real deployments: gevent
monkey-patching (as gunicorn ``-k gevent`` does it) and an ASGI server
(uvicorn) serving a Django app, each in processes the tests start.

The gevent scenarios run in tests/gevent_scenarios.py (patching must come
before anything imports socket); the site is tests/deploy_app.py. Each test
prints one DEPLOY line with what it measured (run with -s to see).
"""

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from test_security import tls_files  # noqa: F401 - a fixture

from memcached import free_port

pytest.importorskip("gevent", reason="gevent is not installed: `pip install -e .[test]` (make test) installs it")

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 0.5

pytestmark = pytest.mark.slow


def _scenario(name, location, options, no_gevent=False, timeout=60, during=None, **spec):
    """Run a scenario of tests/gevent_scenarios.py; ``during()``, if given,
    runs in this process meanwhile (a fault, say)."""
    env = dict(os.environ, PYTHONPATH=HERE, DJM_NO_GEVENT="1" if no_gevent else "0")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "gevent_scenarios.py"), name,
         json.dumps({"location": location, "options": options, **spec})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if during is not None:
            during()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


class Dribbler:
    """A server that answers every command one byte every ``interval``
    seconds, or never (``silent``); TLS with an ``ssl`` server context."""

    REPLY = b"VALUE :1:k 0 1000\r\n" + b"x" * 1000 + b"\r\nEND\r\n"

    def __init__(self, context=None, silent=False, interval=0.1):
        self.context, self.silent, self.interval = context, silent, interval
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.location = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        try:
            conn.settimeout(5)
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            conn.recv(4096)  # the command
            if self.silent:
                self._stop.wait()
            for byte in self.REPLY:
                if self._stop.wait(self.interval):
                    break
                conn.sendall(bytes([byte]))
        except OSError:  # the client gave up and closed: what it should do
            pass
        finally:
            conn.close()

    def close(self):
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def dribbler():
    made = []

    def make(**kwargs):
        made.append(Dribbler(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _tls_memcached(memcached_factory, files):
    return memcached_factory(extra_args=(
        "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (files["chain"], files["key"])))


def _server_context(files):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["chain"], files["key"])
    return context


@pytest.fixture(params=["stopped memcached", "stopped TLS memcached", "byte dribbler",
                        "TLS byte dribbler", "silent TLS server"])
def bad_server(request, memcached_factory, dribbler, tls_files):  # noqa: F811 - the fixture
    """A server that never completes a reply: its location and client OPTIONS."""
    kind = request.param
    options = {"TIMEOUT": TIMEOUT}
    if "TLS" in kind:
        options["TLS_CA_FILE"] = tls_files["ca"]
    if "memcached" in kind:
        server = _tls_memcached(memcached_factory, tls_files) if "TLS" in kind else memcached_factory()
        server.pause()
        return kind, server.location, options
    context = _server_context(tls_files) if "TLS" in kind else None
    return kind, dribbler(context=context, silent="silent" in kind).location, options


def test_under_gevent_a_silent_or_dribbling_server_costs_at_most_about_two_timeouts_then_is_blacklisted(
        bad_server):
    kind, location, options = bad_server
    seen = _scenario("timed_calls", location, options, calls=6)
    durations = [d for d, _, _ in seen["calls"]]
    print("\nDEPLOY gevent %s: calls %s s, another greenlet ticked %d times during the first, "
          "hub stalled at most %.3f s, state %s"
          % (kind, " ".join("%.3f" % d for d in durations), seen["calls"][0][2],
             seen["longest_hub_stall"], seen["status"][0]["state"]))
    assert [outcome for _, outcome, _ in seen["calls"]] == ["miss"] * 6  # IGNORE_EXC: a miss, no error
    assert max(durations) < 2 * TIMEOUT
    # The wait was gevent's: another greenlet (waking every 10 ms) ran meanwhile.
    # A wait gevent cannot see would block the hub for the whole call: no tick.
    assert seen["calls"][0][2] >= 5
    # Blacklisted on its first timeout, as without gevent: later calls do not wait on it.
    assert seen["status"][0]["state"] == "blacklisted"
    assert seen["status"][0]["in_use"] == 0
    assert sum(durations[1:]) < TIMEOUT


def test_under_gevent_a_misread_errno_on_a_hung_server_still_costs_one_timeout(memcached_factory):
    import errno

    server = memcached_factory()
    server.pause()
    seen = _scenario("timed_calls", server.location, {"TIMEOUT": TIMEOUT}, calls=2,
                     errno_clobbered_to=errno.ECONNRESET, timeout=20)
    durations = [d for d, _, _ in seen["calls"]]
    print("\nDEPLOY gevent, errno misread on a hung server: calls %s s" % " ".join("%.3f" % d for d in durations))
    # The second look at the socket finds nothing yet and must not wait for it
    # in gevent's recv, which has no deadline: the call's own wait ends it.
    assert [outcome for _, outcome, _ in seen["calls"]] == ["miss", "miss"]
    assert durations[0] < 2 * TIMEOUT
    assert seen["calls"][0][2] >= 5
    assert seen["status"][0]["state"] == "blacklisted"


def test_a_hung_server_is_blacklisted_under_gevent_exactly_as_on_threads(memcached_factory):
    server = memcached_factory()
    server.pause()
    options = {"TIMEOUT": TIMEOUT, "IGNORE_EXC": False}
    green = _scenario("timed_calls", server.location, options, calls=4)
    plain = _scenario("timed_calls", server.location, options, calls=4, no_gevent=True)
    print("\nDEPLOY hung server, IGNORE_EXC=False: gevent %s / threads %s"
          % ([(round(d, 3), o) for d, o, _ in green["calls"]], [(round(d, 3), o) for d, o, _ in plain["calls"]]))
    outcomes = [call[1] for call in green["calls"]]
    assert outcomes == ["ServerError", "NoServerAvailable", "NoServerAvailable", "NoServerAvailable"]
    assert outcomes == [call[1] for call in plain["calls"]]
    assert green["status"] == plain["status"]
    assert green["status"][0]["state"] == "blacklisted"


def test_under_gevent_a_server_back_from_a_stall_serves_nothing_older_than_the_writes_it_missed(
        memcached_factory):
    server = memcached_factory()

    def stall():
        time.sleep(1.0)  # the scenario's interpreter starts, then writes for a while
        server.pause()
        time.sleep(1.5)
        server.resume()

    seen = _scenario("writes_through_a_stall", server.location, {"TIMEOUT": TIMEOUT}, during=stall,
                     greenlets=4, seconds=7)
    print("\nDEPLOY gevent writes through a 1.5 s stall: %d reads, %d older than the write before"
          % (seen["reads"], seen["older_count"]))
    assert seen["failed_greenlets"] == []
    assert seen["older_count"] == 0, seen["older"]
    assert seen["status"][0]["state"] == "up"
    assert seen["reads"] > 200


def _stopped_servers(memcached_factory, tls_files, tmp_path, tls, gevent, count, options=(),  # noqa: F811
                     **spec):
    """Run ``set_many_to_stopped_servers`` on ``count`` servers (TLS or
    not), under gevent or on threads: what it saw."""
    servers = [_tls_memcached(memcached_factory, tls_files) if tls else memcached_factory()
               for _ in range(count)]
    options = {"TIMEOUT": TIMEOUT, "IGNORE_EXC": True, **dict(options)}
    if tls:
        options["TLS_CA_FILE"] = tls_files["ca"]
    ready, go = tmp_path / "ready", tmp_path / "go"

    def stop_them():
        waited = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < waited:  # connections open (a TLS handshake
            time.sleep(0.01)                                   # needs a server that runs)
        for server in servers:
            server.pause()
        go.touch()

    seen = _scenario("set_many_to_stopped_servers", ",".join(s.location for s in servers), options,
                     no_gevent=not gevent, during=stop_them, ready=str(ready), go=str(go), **spec)
    print("\nDEPLOY %s%s: %s of %d x %d KiB to %d stopped servers took %.2f s (TIMEOUT %s)"
          % ("gevent" if gevent else "threads", " over TLS" if tls else "",
             "set" if spec.get("one_by_one") else "set_many", seen["keys"], spec.get("value_size", 900 * 1024) // 1024,
             count, seen["seconds"], TIMEOUT))
    assert [s["state"] for s in seen["status"]] == ["blacklisted"] * count
    assert [s["in_use"] for s in seen["status"]] == [0] * count
    if gevent:  # the waits were the hub's: other greenlets ran
        assert seen["longest_hub_stall"] < TIMEOUT / 2
    return seen


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "TLS"])
@pytest.mark.parametrize("gevent", [True, False], ids=["gevent", "threads"])
def test_a_large_set_many_to_stopped_servers_costs_one_timeout_not_one_per_server(
        memcached_factory, tls_files, tmp_path, tls, gevent):  # noqa: F811 - the fixture
    """What does not fit in a socket at once is sent to every server
    together under gevent and over TLS too (``connection.send_unsent``),
    not one server after another at TIMEOUT each."""
    seen = _stopped_servers(memcached_factory, tls_files, tmp_path, tls, gevent, 4, per_server=8)
    assert seen["failed"] == seen["keys"]  # nothing stored, nothing raised (IGNORE_EXC)
    assert seen["seconds"] < 2 * TIMEOUT  # one server after another: 4 x TIMEOUT


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "TLS"])
@pytest.mark.parametrize("gevent", [True, False], ids=["gevent", "threads"])
def test_a_large_set_to_a_stopped_server_costs_one_timeout_under_gevent_and_over_tls(
        memcached_factory, tls_files, tmp_path, tls, gevent):  # noqa: F811 - the fixture
    """A value larger than the socket's buffers, to a server that stopped
    reading: TIMEOUT, then the server is blacklisted and the next set does
    not wait. Under gevent over TLS the send spun forever, blocking the hub
    (gevent's SSL socket returns 0 where the standard library's raises)."""
    size = 12 * 1024 * 1024  # more than a socket's buffers on both sides (up to about 4 MiB)
    seen = _stopped_servers(memcached_factory, tls_files, tmp_path, tls, gevent, 1, per_server=2,
                            value_size=size, one_by_one=True, options={"MAX_VALUE_SIZE": 2 * size})
    assert seen["seconds"] < 2 * TIMEOUT


def test_under_gevent_over_tls_a_set_many_of_many_values_is_stored_whole(memcached_factory, tls_files):  # noqa: F811
    """Each storage command ends a TLS record of its own under gevent too
    (see test_security's test of the same on threads): 500 values of 2 KB."""
    server = _tls_memcached(memcached_factory, tls_files)
    seen = _scenario("set_many_round_trip", server.location,
                     {"TIMEOUT": TIMEOUT, "TLS_CA_FILE": tls_files["ca"]}, count=500, size=2000)
    assert (seen["failed"], seen["same"]) == (0, True)
    assert seen["status"][0]["state"] == "up"
    assert seen["seconds"] < TIMEOUT


@pytest.mark.parametrize("warm", [True, False], ids=["pooled connection", "new connection"])
def test_a_gevent_hub_busy_longer_than_timeout_is_no_server_timeout(memcached_factory, warm):
    """One greenlet waits for memcached while another does 0.8 s of CPU work
    without yielding: the reply (or the connect) was there in time, only the
    hub was late, so the call succeeds and the server is not blacklisted."""
    server = memcached_factory()
    seen = _scenario("busy_hub", server.location, {"TIMEOUT": TIMEOUT}, busy=0.8, warm=warm)
    print("\nDEPLOY busy hub (%s): got %r after %.2f s, state %s"
          % ("pooled" if warm else "new connection", seen["outcome"], seen["seconds"],
             seen["status"][0]["state"]))
    assert seen["outcome"] == "v"
    assert seen["status"][0]["state"] == "up"


@pytest.mark.parametrize("max_pool_size", [1, 2])
def test_a_hundred_greenlets_share_a_small_pool_without_deadlock_or_leak_even_when_timeouts_strike(
        memcached_factory, max_pool_size):
    server = memcached_factory()
    options = {"TIMEOUT": TIMEOUT, "MAX_POOL_SIZE": max_pool_size, "POOL_TIMEOUT": 5, "IGNORE_EXC": False}
    seen = _scenario("greenlet_storm", server.location, options, greenlets=100, rounds=20,
                     interrupt=0.3, deadline=40, timeout=90)
    print("\nDEPLOY greenlet storm, MAX_POOL_SIZE=%d: %d calls in %.1f s, %d cut short by "
          "gevent.Timeout, %d values ok, %d misses; afterwards %s"
          % (max_pool_size, seen["calls"], seen["seconds"], seen["interrupted"], seen["ok"],
             seen["miss"], seen["status_after"]))
    assert seen["unfinished"] == 0  # no deadlock
    assert seen["failed_greenlets"] == [] and seen["other"] == []
    assert seen["wrong"] == 0  # an interrupted call never leaves a reply for the next one
    assert seen["interrupted"] > 0 and seen["ok"] > 0
    (after,) = seen["status_after"]
    assert after["state"] == "up"  # waiting for a slot is no timeout of the server's
    assert after["in_use"] == 0 and after["idle"] <= max_pool_size
    assert seen["after"] == "storm"


@pytest.mark.parametrize("max_pool_size", [1, 4])
def test_greenlets_waiting_for_a_full_pool_are_served_in_turn(memcached_factory, max_pool_size):
    """1000 greenlets call in a loop, without yielding between calls, through
    a pool far smaller: each connection given back goes to the greenlet that
    has waited longest, so nobody starves into PoolTimeout."""
    server = memcached_factory()
    options = {"TIMEOUT": TIMEOUT, "MAX_POOL_SIZE": max_pool_size, "POOL_TIMEOUT": 3, "IGNORE_EXC": False}
    seen = _scenario("greenlet_storm", server.location, options, greenlets=1000, rounds=2,
                     interrupt=0, deadline=40, timeout=90)
    print("\nDEPLOY 1000 greenlets, MAX_POOL_SIZE=%d: %d calls in %.2f s, longest %.3f s, errors %s"
          % (max_pool_size, seen["calls"], seen["seconds"], seen["longest"], seen["other"][:3]))
    assert seen["unfinished"] == 0 and seen["failed_greenlets"] == []
    assert seen["other"] == []  # no PoolTimeout
    assert seen["status_after"][0]["in_use"] == 0


# -- ASGI: uvicorn serving a Django app -------------------------------------

def _start_site(server_command, location, options):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=HERE, DEPLOY_LOCATION=location, DEPLOY_OPTIONS=json.dumps(options))
    command = [os.path.join(os.path.dirname(sys.executable), server_command[0]), *server_command[1:]]
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in command], env=env, cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("%s did not start" % server_command[0])


class Browsers:
    """Threads requesting ``paths`` in turn over keep-alive connections,
    recording (started, seconds, status, body) per request."""

    def __init__(self, port, paths, threads=4):
        self.port, self.paths = port, paths
        self.records = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = seed
        while not self._stop.is_set():
            path = self.paths[n % len(self.paths)]
            n += 1
            started = time.monotonic()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                record = (started, time.monotonic() - started, response.status, response.read().decode())
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                record = (started, time.monotonic() - started, None, repr(exc))
            self.records.append(record)
        conn.close()

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def first_hit_after(self, moment, path_prefix="/hit/"):
        """Seconds from ``moment`` until a request started after it came back a hit."""
        ends = [started + seconds - moment for started, seconds, status, body in list(self.records)
                if started >= moment and body.startswith("hit") and status == 200]
        return min(ends) if ends else None


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None:
            return value
        time.sleep(0.02)
    return None


def test_uvicorn_site_hits_again_within_two_seconds_of_sigcont_after_stalls(memcached_factory):
    pytest.importorskip("uvicorn", reason="uvicorn is not installed: `pip install -e .[test]` installs it")
    server = memcached_factory()
    proc, port = _start_site(["uvicorn", "--port", "{port}", "--lifespan", "off", "--log-level", "warning",
                              "deploy_app:asgi"], server.location, {"TIMEOUT": TIMEOUT})
    figures = []
    try:
        paths = ["/hit/k%d" % i for i in range(5)] + ["/sync/%d" % i for i in range(5)]
        with Browsers(port, paths) as browsers:
            assert _wait_for(lambda: browsers.first_hit_after(time.monotonic() - 0.5), 10) is not None
            # A short stall: the first probe (a second after the ban) finds it
            # back. A long one: probes back off (1 s, 2 s, 4 s... while it hangs),
            # so the wait after SIGCONT depends on where in that rhythm it falls.
            for stall, limit in ((0.8, 2.0), (5.0, 6.0)):
                server.pause()
                time.sleep(stall)
                resumed = time.monotonic()
                server.resume()
                back = _wait_for(lambda: browsers.first_hit_after(resumed), 10)  # noqa: B023
                figures.append((stall, back))
                assert back is not None and back < limit, figures
            time.sleep(0.3)
        records = browsers.records
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
    statuses = {}
    for _, _, status, _ in records:
        statuses[status] = statuses.get(status, 0) + 1
    print("\nDEPLOY uvicorn: %d requests %s; hits again %s after SIGCONT (stall: seconds); "
          "slowest request %.2f s" % (len(records), statuses, figures, max(r[1] for r in records)))
    assert set(statuses) == {200}, (statuses, output[-3000:])
