"""Small helpers shared by the tests (no fixtures here: see conftest.py)."""

import socket
import threading

from django.core.signals import request_finished, request_started

#: The OPTIONS of djmemcache 0.13's README, which must keep working verbatim.
OLD_013_OPTIONS = {
    "MAX_POOL_SIZE": 100,
    "KEY_PREFIX": b"uuboard_prefix",
    "TIMEOUT": 30,
    "CONNECT_TIMEOUT": 30,
    "IGNORE_EXC": True,
    "USE_POOLING": True,
}


def raw_command(location, command, until=b"END\r\n", timeout=5):
    """Send one command over a fresh socket and return the raw reply bytes."""
    if location.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = location[5:]
    else:
        host, _, port = location.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        address = (host, int(port))
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(command)
        data = b""
        while not data.endswith(until):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def run_threads(count, target, *args):
    """Run ``target(i, *args)`` in ``count`` threads; return their exceptions."""
    errors = []

    def wrapper(i):
        try:
            target(i, *args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def request(fn):
    """Run ``fn`` inside a request cycle, as Django's handler does
    (``request_finished`` calls ``close()`` on every cache used)."""
    request_started.send(sender=None)
    try:
        return fn()
    finally:
        request_finished.send(sender=None)


def value_for(key):
    return "value-of-%s" % key


class Traffic:
    """Threads of Django-style requests (3 gets + 1 set each) against
    ``caches[alias]``, recording what callers saw: every call's start time
    and duration, exceptions, and wrong values (a get that returns anything
    but the key's own value or a miss would be a crossed reply)."""

    def __init__(self, alias="default", threads=8, keys=200, seed=0):
        import random

        self.alias = alias
        self.threads = threads
        self.keys = ["key-%d" % i for i in range(keys)]
        self.rng = random.Random(seed)
        self.calls = []  # (started, duration, outcome): "ok", "miss", "wrong", or an exception
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = []

    def _one_request(self, rng):
        import time

        from django.core.cache import caches

        cache = caches[self.alias]
        records = []
        for n in range(4):
            key = rng.choice(self.keys)
            started = time.monotonic()
            try:
                if n == 3:
                    cache.set(key, value_for(key))
                    outcome = "ok"
                else:
                    value = cache.get(key)
                    outcome = "miss" if value is None else "ok" if value == value_for(key) else "wrong"
            except Exception as exc:  # noqa: BLE001 - counted
                outcome = exc
            records.append((started, time.monotonic() - started, outcome))
        with self._lock:
            self.calls.extend(records)

    def _worker(self, seed):
        import random

        rng = random.Random(seed)
        while not self._stop.is_set():
            request(lambda: self._one_request(rng))

    def start(self):
        self._workers = [threading.Thread(target=self._worker, args=(i,)) for i in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        for t in self._workers:
            t.join()

    def since(self, moment, until=None):
        with self._lock:
            return [c for c in self.calls if c[0] >= moment and (until is None or c[0] < until)]

    @staticmethod
    def errors(calls):
        return [c[2] for c in calls if isinstance(c[2], BaseException)]

    @staticmethod
    def wrong(calls):
        return [c for c in calls if c[2] == "wrong"]

    @staticmethod
    def slower_than(calls, seconds):
        return [c for c in calls if c[1] > seconds]

    @staticmethod
    def percentile(calls, q):
        durations = sorted(c[1] for c in calls)
        return durations[min(len(durations) - 1, int(len(durations) * q))] if durations else 0.0
