"""Small helpers shared by the tests (no fixtures here: see conftest.py)."""

import socket
import threading

from django.core.signals import request_finished, request_started


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
