"""The demo, end to end, shortened: it runs, reports, and leaves nothing behind."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _alive(pid):
    return os.path.exists("/proc/%d" % pid)


def _start_demo(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "demo", "run.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _started_pids(out):
    """The pids the demo printed: its memcached servers, then the site."""
    started = [int(p) for p in re.search(r"memcached pids: ([\d ]+)", out).group(1).split()]
    started.append(int(re.search(r"pid (\d+), port", out).group(1)))
    return started


def test_demo_serves_traffic_through_a_hung_server_and_cleans_up():
    proc = _start_demo("--duration", "6", "--compare-seconds", "2", "--threads", "4")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    started = _started_pids(out)
    assert len(started) == 4 and not [pid for pid in started if _alive(pid)]
    # The one error a stopped server may cause: a request that read its session just
    # before the SIGSTOP cannot save it (Django's SessionInterrupted, a 400), at most
    # one per traffic thread. Nothing else: no 500, no request left unanswered.
    errors = re.search(r"errors \(non-200\)\s+(\d+)(?: \((\d+) x 400 on /visit\))?\n", out)
    assert errors, out
    assert errors.group(1) == "0" or (errors.group(1) == errors.group(2) and int(errors.group(1)) <= 4), out
    assert re.search(r"blacklisted", out) and "SIGCONT sent" in out
    ours = int(re.search(r"memcached connections opened\s+(\d+) for", out).group(1))
    django = int(re.search(r"Django's PyMemcacheCache\s+(\d+) for", out).group(1))
    assert ours < django


def test_ctrl_c_stops_everything_the_demo_started():
    import signal
    import time

    proc = _start_demo("--duration", "60", "--threads", "2")
    head = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the site is up (a loaded machine is slow)
        line = proc.stdout.readline()
        head.append(line)
        if not line or re.search(r"pid (\d+), port", line):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    out = "".join(head) + out
    assert "interrupted: stopping everything" in out, out
    assert not [pid for pid in _started_pids(out) if _alive(pid)]
