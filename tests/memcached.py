"""Real memcached and twemproxy processes for the tests: started on free
loopback ports, stopped by their own pid, faults made with real signals."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from helpers import raw_command

HOST = "127.0.0.1"


def require(program, package):
    """Path of ``program``, or fail (not skip) saying how to get it."""
    # nutcracker lives in /usr/sbin, which is not on a normal user's PATH on Debian
    path = shutil.which(program) or shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        pytest.fail(
            "%s is not installed: run `make test` (installs it with apt-get as root) "
            "or `apt-get install %s`" % (program, package),
            pytrace=False,
        )
    return path


def free_port(host=HOST):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _connectable(host, port=None):
    if port is None:  # unix socket path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = host
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        address = (host, port)
    with sock:
        sock.settimeout(1)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


class _Process:
    """A child process we started, with its log in a temp file."""

    name = "process"
    proc = None
    log = None

    def _spawn(self, command):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def _wait_ready(self, host, port=None, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _connectable(host, port):
                return
            time.sleep(0.02)
        output = self._log_tail()
        self.stop()
        raise RuntimeError("%s did not start on %s: %s" % (self.name, self.location, output))

    def _log_tail(self):
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read()[-2000:].decode("utf-8", "replace")

    @property
    def pid(self):
        return self.proc.pid

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def pause(self, timeout=5):
        """SIGSTOP, and return only once every thread is stopped: the signal
        is delivered asynchronously, and a worker thread on another core
        could otherwise still answer the next request."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not self._stopped():
            if time.monotonic() > deadline:
                raise RuntimeError("%s (pid %d) did not stop after SIGSTOP" % (self.name, self.pid))
            time.sleep(0.001)

    def _stopped(self):
        tasks = "/proc/%d/task" % self.pid
        try:
            states = []
            for task in os.listdir(tasks):
                with open(os.path.join(tasks, task, "stat")) as f:
                    states.append(f.read().rpartition(")")[2].split()[0])
        except FileNotFoundError:  # exited, or a thread ended meanwhile: look again
            return not self.running
        return all(state in ("T", "t") for state in states)

    def resume(self):
        if self.running:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        if self.running:
            self.proc.kill()
        self._reap()

    def stop(self):
        if self.running:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def _reap(self):
        if self.proc is not None:
            self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class MemcachedProcess(_Process):
    """One memcached on loopback (TCP, IPv6, or a unix socket)."""

    name = "memcached"

    def __init__(self, host=HOST, port=None, unix_path=None, extra_args=()):
        self.host = host
        self.unix_path = unix_path
        self.port = None if unix_path else (port or free_port(host))
        self.extra_args = tuple(extra_args)

    @property
    def location(self):
        if self.unix_path:
            return "unix:" + self.unix_path
        if ":" in self.host:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)

    @property
    def node(self):
        """The name pymemcache's HashClient hashes for this server."""
        return self.unix_path or "%s:%d" % (self.host, self.port)

    def start(self):
        command = [require("memcached", "memcached"), "-U", "0", "-m", "64", "-t", "2"]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        if self.unix_path:
            command += ["-s", self.unix_path, "-a", "0700"]
        else:
            command += ["-l", self.host, "-p", str(self.port)]
        self._spawn(command + list(self.extra_args))
        if self.unix_path:
            self._wait_ready(self.unix_path)
        else:
            self._wait_ready(self.host, self.port)
        return self

    def restart(self, deadline=10):
        """Stop (or after a kill, just reap) and start again on the same port."""
        self.stop()
        give_up = time.monotonic() + deadline
        while True:
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)

    def command(self, command, until=b"END\r\n"):
        return raw_command(self.location, command, until)

    def stats(self):
        """memcached's ``stats``, numbers as ints (this call opens one connection)."""
        result = {}
        for line in self.command(b"stats\r\n").split(b"\r\n"):
            parts = line.split(b" ")
            if len(parts) == 3 and parts[0] == b"STAT":
                value = parts[2].decode()
                result[parts[1].decode()] = int(value) if value.isdigit() else value
        return result

    def flush(self):
        self.command(b"flush_all\r\n", until=b"OK\r\n")


class Twemproxy(_Process):
    """A twemproxy (nutcracker) in front of memcached servers."""

    name = "nutcracker"

    def __init__(self, servers):
        self.servers = servers
        self.port = free_port()
        self.stats_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="djmemcache-nutcracker-")

    @property
    def location(self):
        return "%s:%d" % (HOST, self.port)

    def start(self):
        config = os.path.join(self.dir, "nutcracker.yml")
        with open(config, "w") as f:
            f.write("pool:\n  listen: %s:%d\n  hash: fnv1a_64\n  distribution: ketama\n"
                    "  auto_eject_hosts: false\n  timeout: 2000\n  servers:\n" % (HOST, self.port))
            for server in self.servers:
                f.write("   - %s:%d:1\n" % (server.host, server.port))
        self._spawn([require("nutcracker", "nutcracker"), "-c", config,
                     "-s", str(self.stats_port), "-a", HOST,
                     "-p", os.path.join(self.dir, "pid"), "-o", os.path.join(self.dir, "log")])
        self._wait_ready(HOST, self.port)
        return self

    def stop(self):
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self):
        super().kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True
