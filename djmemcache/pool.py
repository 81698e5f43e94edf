"""A bounded LIFO pool of connections to one memcached server.

One ``HostPool`` per server per configuration per process, shared by every
thread. Rules that keep replies from crossing between callers:

- a connection that saw any error, or any exception at all, is closed
  (``discard``) and its slot freed, never returned;
- an idle connection the server closed meanwhile (restart, idle timeout) is
  noticed before use (``Connection.is_stale``) and replaced;
- after ``fork()`` the child forgets every inherited connection.

No slot can leak, whatever is raised and wherever: every connection that
holds a slot is a *member* of the pool, and a member that is dropped without
being given back or discarded (an exception that struck between two
bytecodes of the bookkeeping) has its slot freed and its socket closed once
it is garbage collected (a weakref callback notes it, the pool reaps it).
The explicit ``except BaseException`` handlers free slots at once; the
callback is the backstop.

No network I/O happens while the pool lock is held: the lock only moves
connections between "idle" and "in use" and counts slots.
"""

import logging
import os
import threading
import time
import weakref

from djmemcache.connection import Connection, _load_speedups
from djmemcache.exceptions import NoServerAvailable, PoolTimeout

logger = logging.getLogger("djmemcache.pool")


_POOLS = weakref.WeakSet()
_speedups = _load_speedups()
# The clock the C path stamps connections with (the same as time.monotonic,
# but not replaced by a test's fake clock: two clocks would make idle times wrong).
_now = time.monotonic if _speedups is None else _speedups.monotonic

#: Seconds of idleness after which a pooled connection is checked for a
#: close by the server before it is used again.
STALE_CHECK_AFTER = 0.001


if _speedups is not None:
    #: ``take_idle(pool)``: the common case of ``pool.acquire()`` in C, or
    #: None when ``acquire()`` must run; ``give_back(pool, conn)``: the
    #: common case of ``pool.release(conn)``, or False when ``release()``
    #: must run. Callers write ``take_idle(pool) or pool.acquire()`` and
    #: ``give_back(pool, conn) or pool.release(conn)``. See _speedups.c for
    #: why that needs no lock. Only for exactly ``HostPool`` and
    #: ``Connection`` (registered below): a subclass's overrides of
    #: ``acquire``/``release`` or its properties always take the Python path.
    take_idle = _speedups.pool_take
    give_back = _speedups.pool_give
else:
    def take_idle(pool):
        return None

    def give_back(pool, conn):
        return False


class HostPool:
    """Connections to one server: at most ``max_size``, reused last-in first-out.

    LIFO keeps the few busiest sockets warm and lets surplus ones sit idle;
    a caller that finds every slot taken waits up to ``wait_timeout`` seconds
    for one, then gets ``PoolTimeout``.
    """

    connection_class = Connection

    @staticmethod
    def banned():
        """Whether this pool's server is blacklisted now (its Client sets one that knows)."""
        return False

    def __init__(self, server, options, connection_class=None, tls_context=None):
        self.server = server
        self.tls_context = tls_context
        self.options = options
        if connection_class is not None:
            self.connection_class = connection_class
        self.max_size = options.max_pool_size
        self.wait_timeout = options.pool_timeout
        self.idle_timeout = options.pool_idle_timeout
        # How long a connection may sit idle before acquire() looks at it again.
        self._check_after = min(STALE_CHECK_AFTER, self.idle_timeout or STALE_CHECK_AFTER)
        self._reset_state()
        _POOLS.add(self)

    def _reset_state(self):
        self._lock = threading.Lock()
        self._idle = []
        # Every connection holding a slot (idle, in use, or connecting):
        # weakref -> its socket, so a lost member's socket can be closed.
        self._members = {}
        # Weakrefs of members that were garbage collected in use. The callback
        # is list.append itself: C code that a signal cannot interrupt, where
        # a Python callback could be cut short (its exception unraisable).
        self._lost = []
        # Callers waiting for a slot, oldest first, each on a lock of its own
        # that a freed slot releases. Not a Condition: a signal handler that
        # raises while Condition.wait re-acquires the lock leaves the lock unowned.
        self._waiters = []
        self._pid = os.getpid()
        self.opened = 0  # connections opened by this process, for stats and tests
        self.hits = self.misses = self.errors = self.timeouts = self.blacklistings = 0

    # -- taking and giving back -------------------------------------------

    def acquire(self, idle_only=False, fresh=False):
        """Return a connection ready for one command.

        With ``idle_only``, return an idle connection or None, never opening
        or waiting (random distribution tries every server's idle ones first).
        With ``fresh``, a new connection (an idle one taken is reconnected in
        its slot): a retry after a pooled connection turned out dropped.
        Raises ``PoolTimeout``, or the ``OSError`` of a failed connect.
        """
        conn = None
        try:
            with self._lock:
                if self._idle:
                    conn = self._idle.pop()
                    conn.pooled = False
                elif idle_only:
                    return None
                else:
                    conn = self._take()
            if conn is None:
                conn = self._wait_for_slot()
                if self.banned():
                    # Banned while this call waited (by the call whose slot it
                    # got, on a timeout, say): it would wait TIMEOUT again, and
                    # each waiter after it in turn.
                    waited, conn = conn, None
                    if waited.sock is None:  # a free slot, not connected: freed
                        self.discard(waited)
                    else:  # a connection another call gave back: to the next waiter
                        self.release(waited)
                    raise NoServerAvailable("memcached server %s was blacklisted while this call waited "
                                            "for a connection" % self.server, server=str(self.server))
            # A connection used less than STALE_CHECK_AFTER ago cannot have missed
            # a server restart (that takes longer); skipping the check keeps a
            # syscall, and a GIL hand-off, off the busiest path.
            if fresh and conn.sock is not None:
                conn.close()
                self._connect(conn)
                return conn
            idle = _now() - conn.idle_since
            if idle >= self._check_after or conn.sock is None:
                self._refresh(conn, idle)
            return conn
        except BaseException:
            if conn is not None:
                self.discard(conn)
            raise

    def _refresh(self, conn, idle):
        """Connect a new connection; replace one the server closed, or one
        idle for longer than IDLE_TIMEOUT (the slot stays ours)."""
        if conn.sock is None:
            self._connect(conn)
        elif (idle >= STALE_CHECK_AFTER and conn.is_stale()) or (
            self.idle_timeout and idle > self.idle_timeout
        ):
            conn.close()
            self._connect(conn)

    def _new_member(self):
        # With the lock held: a slot for a connection not yet connected.
        conn = self.connection_class(self.server, self.options, self.tls_context)
        ref = weakref.ref(conn, self._lost.append)
        conn.member_ref = ref
        self._members[ref] = None
        return conn

    def _reap(self):
        """With the lock held: free the slots of members lost in use, close their sockets."""
        while self._lost:
            sock = self._members.pop(self._lost.pop(), 0)
            if sock != 0:
                logger.debug("a connection to %s was dropped in use; its slot is free again", self.server)
                if sock is not None:
                    sock.close()

    def _take(self):
        # With the lock held: an idle connection, a new member, or None.
        if self._lost:
            self._reap()
        if self._idle:
            conn = self._idle.pop()
            conn.pooled = False
            return conn
        if len(self._members) < self.max_size:
            return self._new_member()
        return None

    def _wait_for_slot(self):
        """Wait (without the pool lock) until a slot frees up, up to ``wait_timeout``.

        A connection given back while callers wait is handed to the one that
        has waited longest, never left for whoever asks next: under gevent a
        greenlet that gives a connection back and asks again runs on without
        yielding, and would otherwise take it every time while the waiters
        starve into PoolTimeout.
        """
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        while True:
            waiter = _Waiter()
            with self._lock:
                conn = self._take()
                if conn is not None:
                    return conn
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeout(
                        "no connection to memcached server %s became free within %ss "
                        "(MAX_POOL_SIZE=%d)" % (self.server, self.wait_timeout, self.max_size),
                        server=str(self.server),
                    )
                self._waiters.append(waiter)
            try:
                # In slices: a slot freed by a lost member wakes nobody.
                waiter.lock.acquire(True, 0.05 if remaining is None else min(remaining, 0.05))
            except BaseException:
                conn = self._withdraw(waiter)
                if conn is not None:
                    self.release(conn)  # to the next waiter
                raise
            conn = self._withdraw(waiter)
            if conn is not None:
                return conn

    def _withdraw(self, waiter):
        """Take ``waiter`` off the queue; the connection handed to it, if any."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            conn, waiter.conn = waiter.conn, None
        return conn

    def _wake_waiters(self):
        # With the lock held: a slot (not a connection) is free. Every waiter
        # looks again, and one gets it: waking only one could wake a waiter
        # that an exception is taking away.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.lock.release()

    def _connect(self, conn):
        conn.connect()
        conn.reused = False  # (again, for one made anew in _refresh) a retry cannot help it
        conn.pid = self._pid
        with self._lock:
            if conn.member_ref in self._members:
                self._members[conn.member_ref] = conn.sock
            self.opened += 1
            count = len(self._members)
        logger.debug("new connection to %s (%d in this pool)", self.server, count)

    def release(self, conn):
        """Give back a connection whose last command completed cleanly."""
        if conn.pid != self._pid:
            conn.close()  # opened before a fork: its slot belongs to the parent
            return
        handed = False
        try:
            conn.reused = True
            conn.idle_since = _now()
            with self._lock:
                self.hits += conn.hits
                self.misses += conn.misses
                conn.hits = conn.misses = 0
                # Set first: once a waiter or the idle list may hold it, another
                # caller may be using it, so it is never closed here. An exception
                # before it gets there only drops it (its slot is freed when it
                # is collected, see _reap).
                handed = True
                if self._waiters:  # to the caller that has waited longest
                    waiter = self._waiters.pop(0)
                    waiter.conn = conn
                    waiter.lock.release()
                else:
                    self._idle.append(conn)
                    conn.pooled = True
        except BaseException:
            if not handed:
                self.discard(conn)
            raise

    def discard(self, conn):
        """Close a connection that saw an error and free its slot (idempotent)."""
        with self._lock:
            if conn.pooled:
                conn.pooled = False
                try:
                    self._idle.remove(conn)
                except ValueError:
                    pass
            if self._members.pop(getattr(conn, "member_ref", None), 0) != 0:
                self._wake_waiters()
        # Reset (Connection.close), unless opened before a fork: the option
        # would hold for the parent's close of the same socket too.
        conn.close(abort=conn.pid == self._pid)

    def record_failure(self, timeout, blacklisted):
        with self._lock:
            self.errors += 1
            self.timeouts += bool(timeout)
            self.blacklistings += bool(blacklisted)

    # -- housekeeping -------------------------------------------------------

    def clear_idle(self):
        """Close every idle connection (the server was blacklisted, or at exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
            for conn in idle:
                conn.pooled = False
                self._members.pop(conn.member_ref, None)
            self._wake_waiters()
        for conn in idle:
            conn.close()

    def _forget_after_fork(self):
        # In a forked child: the parent owns these sockets. Closing our copy
        # of the descriptor does not disturb the parent's connection. Every
        # member's, idle or in use by the parent's other threads (their calls
        # never go on here): a copy left open would keep the socket alive after
        # the parent closes it, so the reset of a command it gave up on
        # (discard) would not happen.
        for sock in self._members.values():
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._reset_state()

    def status(self):
        with self._lock:
            self._reap()
            idle = len(self._idle)
            return {"in_use": len(self._members) - idle, "idle": idle, "opened": self.opened}

    def counters(self):
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "errors": self.errors,
                    "timeouts": self.timeouts, "blacklistings": self.blacklistings}

    def __repr__(self):
        s = self.status()
        return "<HostPool %s in_use=%d idle=%d max=%d opened=%d>" % (
            self.server, s["in_use"], s["idle"], self.max_size, s["opened"],
        )


class _Waiter:
    """A caller waiting for a slot: its lock is released when a slot frees
    up, with ``conn`` set when a connection is handed to it."""

    __slots__ = ("lock", "conn")

    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self.conn = None


def _after_fork_in_child():
    for pool in list(_POOLS):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


if _speedups is not None:
    _speedups.pool_types(HostPool, Connection)
