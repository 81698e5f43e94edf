"""A bounded LIFO pool of connections to one memcached server.

One ``HostPool`` per server per configuration per process, shared by every
thread. Rules that keep replies from crossing between callers:

- a connection that saw any error is closed (``discard``), never returned;
- an idle connection the server closed meanwhile (restart, idle timeout) is
  noticed before use (``Connection.is_stale``) and replaced;
- after ``fork()`` the child forgets every inherited connection.

No network I/O happens while the pool lock is held: the lock only moves
connections between "idle" and "in use" and counts slots.
"""

import logging
import os
import threading
import time
import weakref

from djmemcache.connection import Connection
from djmemcache.exceptions import PoolTimeout

logger = logging.getLogger("djmemcache.pool")


_POOLS = weakref.WeakSet()
_now = time.monotonic

#: Seconds of idleness after which a pooled connection is checked for a
#: close by the server before it is used again.
STALE_CHECK_AFTER = 0.001


class HostPool:
    """Connections to one server: at most ``max_size``, reused last-in first-out.

    LIFO keeps the few busiest sockets warm and lets surplus ones sit idle;
    a caller that finds every slot taken waits up to ``wait_timeout`` seconds
    for one, then gets ``PoolTimeout``.
    """

    connection_class = Connection

    def __init__(self, server, options, connection_class=None, tls_context=None):
        self.server = server
        self.tls_context = tls_context
        self.options = options
        if connection_class is not None:
            self.connection_class = connection_class
        self.max_size = options.max_pool_size
        self.wait_timeout = options.pool_timeout
        self.idle_timeout = options.pool_idle_timeout
        self._reset_state()
        _POOLS.add(self)

    def _reset_state(self):
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._idle = []
        self._size = 0  # slots taken: idle + in use + being opened
        self._waiting = 0
        self._pid = os.getpid()
        self.opened = 0  # connections opened by this process, for stats and tests
        self.hits = self.misses = self.errors = self.timeouts = self.blacklistings = 0

    # -- taking and giving back -------------------------------------------

    def acquire(self, idle_only=False):
        """Return a connection ready for one command.

        With ``idle_only``, return an idle connection or None, never opening
        or waiting (random distribution tries every server's idle ones first).
        Raises ``PoolTimeout``, or the ``OSError`` of a failed connect.
        """
        with self._lock:
            if self._idle:
                conn = self._idle.pop()
            elif idle_only:
                return None
            elif self._size < self.max_size:
                self._size += 1
                conn = None
            else:
                conn = self._wait_for_slot()
        if conn is None:
            return self._open()
        idle = _now() - conn.idle_since
        # A connection used less than STALE_CHECK_AFTER ago cannot have missed
        # a server restart (that takes longer); skipping the check keeps a
        # syscall, and a GIL hand-off, off the busiest path.
        if (idle >= STALE_CHECK_AFTER and conn.is_stale()) or (
            self.idle_timeout and idle > self.idle_timeout
        ):
            conn.close()  # the slot stays ours: open a new connection in it
            return self._open()
        return conn

    def _wait_for_slot(self):
        # Called with the lock held; returns an idle connection or None for a free slot.
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        self._waiting += 1
        try:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._size < self.max_size:
                    self._size += 1
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeout(
                        "no connection to memcached server %s became free within %ss "
                        "(MAX_POOL_SIZE=%d)" % (self.server, self.wait_timeout, self.max_size),
                        server=str(self.server),
                    )
                self._freed.wait(remaining)
        finally:
            self._waiting -= 1

    def _open(self):
        conn = self.connection_class(self.server, self.options, self.tls_context)
        try:
            conn.connect()
        except BaseException:
            self._free_slot()
            raise
        conn.pid = self._pid
        with self._lock:
            self.opened += 1
            count = self._size
        logger.debug("new connection to %s (%d in this pool)", self.server, count)
        return conn

    def release(self, conn):
        """Give back a connection whose last command completed cleanly."""
        if conn.pid != self._pid:
            conn.close()  # opened before a fork: its slot belongs to the parent
            return
        conn.reused = True
        conn.idle_since = _now()
        with self._lock:
            self.hits += conn.hits
            self.misses += conn.misses
            conn.hits = conn.misses = 0
            self._idle.append(conn)
            if self._waiting:
                self._freed.notify()

    def discard(self, conn):
        """Close a connection that saw an error and free its slot."""
        conn.close()
        if conn.pid == self._pid:
            self._free_slot()

    def record_failure(self, timeout, blacklisted):
        with self._lock:
            self.errors += 1
            self.timeouts += bool(timeout)
            self.blacklistings += bool(blacklisted)

    def _free_slot(self):
        with self._lock:
            self._size -= 1
            if self._waiting:
                self._freed.notify()

    # -- housekeeping -------------------------------------------------------

    def clear_idle(self):
        """Close every idle connection (the server was blacklisted, or at exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            if self._waiting:
                self._freed.notify_all()
        for conn in idle:
            conn.close()

    def _forget_after_fork(self):
        # In a forked child: the parent owns these sockets. Closing our copy
        # of the descriptor does not disturb the parent's connection.
        for conn in self._idle:
            conn.close()
        self._reset_state()

    def status(self):
        with self._lock:
            idle = len(self._idle)
            return {"in_use": self._size - idle, "idle": idle, "opened": self.opened}

    def counters(self):
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "errors": self.errors,
                    "timeouts": self.timeouts, "blacklistings": self.blacklistings}

    def __repr__(self):
        s = self.status()
        return "<HostPool %s in_use=%d idle=%d max=%d opened=%d>" % (
            self.server, s["in_use"], s["idle"], self.max_size, s["opened"],
        )


def _after_fork_in_child():
    for pool in list(_POOLS):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
