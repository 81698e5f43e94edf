"""The process-wide client: routes keys to server pools and runs commands.

``client_for(options)`` returns the one ``Client`` of a configuration, so the
backend instances Django makes per thread and per async context all share
one pool set. ``Client`` is where a command meets the network: take a
connection, run the command, give it back or close it, blacklist the server
on a timeout or refusal, and turn a failure into a miss when ``IGNORE_EXC``.

Values are serialized before a connection is taken and decoded after it is
given back, so a bad value or a corrupt item never touches a connection.
"""

import atexit
import logging
import os
import random
import threading
import time

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from djmemcache.connection import Connection, tls_context_for
from djmemcache.exceptions import DjmemcacheError, NoServerAvailable, PoolTimeout, ServerError
from djmemcache.pool import HostPool
from djmemcache.serializer import CorruptValue, serializer_for
from djmemcache.servers import Blacklist, Rendezvous

logger = logging.getLogger("djmemcache.client")

MISS = object()

# A reused connection that fails like this was most likely closed by the
# server while it sat idle (restart, idle timeout) in the instant after the
# staleness check: the command never ran, a fresh connection will do.
_LOST_CONNECTION = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)

# A timed-out call: Python's socket timeout, or EAGAIN from the kernel
# timeouts that connection.py sets instead.
_TIMEOUTS = (TimeoutError, BlockingIOError)

# Errors that say the server itself is unreachable or hung: blacklist it.
_SERVER_DOWN = _TIMEOUTS + (ConnectionRefusedError,)


class Client:
    """All servers of one configuration, with a pool and a blacklist entry each."""

    def __init__(self, options, connection_class=Connection):
        self.options = options
        self.servers = options.servers
        clock = options.clock or time.monotonic
        self.clock = clock
        tls = tls_context_for(options)
        self.pools = tuple(HostPool(s, options, connection_class, tls) for s in self.servers)
        self.blacklist = Blacklist(self.servers, options.blacklist_time, clock)
        self.rendezvous = Rendezvous([s.node for s in self.servers])
        self.serializer = serializer_for(options)
        self.ignore_exc = options.ignore_exc
        self._random = options.distribution == "random"
        self._single = len(self.servers) == 1
        self._log_lock = threading.Lock()
        self._pool_warned_at = -1e9
        self._pool_warnings_held = 0

    # -- choosing a server --------------------------------------------------

    def _live(self):
        blacklist = self.blacklist
        if blacklist.next_probe is not None and self.clock() >= blacklist.next_probe:
            self._probe()
        live = blacklist.live
        if not live:
            raise NoServerAvailable(
                "every memcached server is blacklisted: %s" % ", ".join(map(str, self.servers))
            )
        return live

    def _index_for(self, key):
        live = self._live()
        if len(live) == 1:
            return live[0]
        if self._random:
            return random.choice(live)
        return self.rendezvous.choose(key, live)

    def _group(self, keys):
        """Keys by server index (one group in random mode: any server serves any key)."""
        if not keys:
            return {}
        if self._random:
            return {self._index_for(None): list(keys)}
        live = self._live()
        if len(live) == 1:
            return {live[0]: list(keys)}
        choose = self.rendezvous.choose
        groups = {}
        for key in keys:
            groups.setdefault(choose(key, live), []).append(key)
        return groups

    def _probe(self):
        """Let one caller try a server whose blacklist period is over."""
        index = self.blacklist.claim_probe()
        if index is None:
            return
        pool = self.pools[index]
        try:
            conn = pool.acquire()
        except Exception as exc:
            self.blacklist.ban(index, "probe failed: %s" % _describe(exc))
            return
        try:
            conn.version()
        except Exception as exc:
            pool.discard(conn)
            self.blacklist.ban(index, "probe failed: %s" % _describe(exc))
        else:
            pool.release(conn)
            self.blacklist.restore(index)

    # -- running one command on one server -----------------------------------

    def _acquire(self, index, anywhere):
        pool = self.pools[index]
        if anywhere:
            # Prefer any live server's idle connection, then open one to a random live server.
            live = self.blacklist.live
            start = random.randrange(len(live)) if len(live) > 1 else 0
            for i in range(len(live)):
                candidate = live[(start + i) % len(live)]
                try:
                    conn = self.pools[candidate].acquire(idle_only=True)
                except OSError as exc:  # a stale idle connection, and the reconnect failed
                    self._server_failed(candidate, "connect", exc)
                    continue
                if conn is not None:
                    return candidate, conn
            if index not in self.blacklist.live:
                live = self._live()
                index = random.choice(live)
                pool = self.pools[index]
        try:
            return index, pool.acquire()
        except PoolTimeout:
            raise
        except OSError as exc:
            raise self._server_failed(index, "connect", exc) from exc

    def _call(self, index, command, method, *args, retry=False, anywhere=None):
        """Run ``method(connection, *args)`` on server ``index``.

        ``retry``: the command may run twice without changing the outcome
        (get, set, delete, touch, flush_all), so if a reused connection turns
        out to be closed by the server, it is retried once on a fresh one.
        incr, decr and add are never retried: a lost reply may hide a success.
        """
        if anywhere is None:
            anywhere = self._random  # random distribution: any live server serves any key
        index, conn = self._acquire(index, anywhere)
        try:
            result = method(conn, *args)
        except Exception as exc:
            return self._recover(index, conn, command, exc, retry, anywhere, method, args)
        self.pools[index].release(conn)
        return result

    def _recover(self, index, conn, command, exc, retry, anywhere, method, args):
        """``method`` failed on ``conn``: close it, then retry once or raise."""
        self.pools[index].discard(conn)
        if retry and conn.reused and isinstance(exc, _LOST_CONNECTION):
            logger.debug("retrying %s on %s after %r", command, self.servers[index], exc)
            return self._call(index, command, method, *args, anywhere=anywhere)
        if isinstance(exc, (MemcacheClientError, MemcacheServerError)) and not isinstance(
            exc, MemcacheUnexpectedCloseError  # pymemcache files it under server errors
        ):
            raise exc  # a complete reply about this command: no fault of the server's
        raise self._server_failed(index, command, exc) from exc

    def _pipeline(self, command, batches, send, read, retry):
        """Run a multi-key command on several servers at once.

        Every server is sent its batch before any reply is read, so the
        round trips overlap instead of adding up. ``batches`` maps a server
        index to its batch; returns ``(batch, outcome)`` pairs where the
        outcome is ``read``'s result or the ``DjmemcacheError`` of that server.
        """
        anywhere = self._random
        roundtrip = _Roundtrip(send, read)
        results = []
        pending = []
        # Taking connections in server order: with bounded pools, two callers
        # taking them in opposite orders could each wait for the other forever.
        for index, batch in sorted(batches.items(), key=_first):
            try:
                index, conn = self._acquire(index, anywhere)
            except DjmemcacheError as exc:
                results.append((batch, exc))
                continue
            try:
                pending.append((index, conn, batch, send(conn, batch)))
            except Exception as exc:
                results.append((batch, self._settle(index, conn, command, exc, retry, roundtrip, batch)))
        for index, conn, batch, token in pending:
            try:
                outcome = read(conn, token)
            except Exception as exc:
                outcome = self._settle(index, conn, command, exc, retry, roundtrip, batch)
            else:
                self.pools[index].release(conn)
            results.append((batch, outcome))
        return results

    def _settle(self, index, conn, command, exc, retry, roundtrip, batch):
        # Never raise out of a pipeline: the other servers' connections are
        # still checked out and must be read and given back first.
        try:
            return self._recover(index, conn, command, exc, retry, self._random, roundtrip, (batch,))
        except DjmemcacheError as error:
            return error
        except Exception as error:  # an error reply (CLIENT_ERROR ...) to a whole batch
            server = self.servers[index]
            return ServerError("memcached server %s: %s %r" % (server, command, error),
                               server=str(server), command=command)

    def _server_failed(self, index, command, exc):
        server = self.servers[index]
        reason = "%s %s" % (command, _describe(exc))
        banned = False
        if isinstance(exc, _SERVER_DOWN) or (command == "connect" and isinstance(exc, OSError)):
            banned = self.blacklist.ban(index, reason)
            if banned:
                self.pools[index].clear_idle()
        self.pools[index].record_failure(isinstance(exc, _TIMEOUTS), banned)
        return ServerError(
            "memcached server %s: %s" % (server, reason), server=str(server), command=command
        )

    def _failed(self, exc, command, miss):
        """A server-side failure: the miss value when ignoring errors, else raise."""
        if not self.ignore_exc:
            raise exc
        if isinstance(exc, NoServerAvailable):
            logger.debug("%s: %s", command, exc)  # the blacklist already logged each server
        elif isinstance(exc, PoolTimeout):
            # Under overload every call may time out on the pool: say so once a second.
            with self._log_lock:
                now = time.monotonic()
                if now - self._pool_warned_at < 1.0:
                    self._pool_warnings_held += 1
                    return miss
                held, self._pool_warnings_held, self._pool_warned_at = self._pool_warnings_held, 0, now
            logger.warning("%s ignored (IGNORE_EXC): %s%s", command, exc,
                           " (and %d more in the last second)" % held if held else "")
        else:
            logger.warning("%s ignored (IGNORE_EXC): %s", command, exc)
        return miss

    def _decode(self, key, raw):
        try:
            return self.serializer.loads(key, *raw)
        except CorruptValue as exc:
            logger.warning("unreadable item for key %r treated as a miss: %s", key, exc)
            return MISS

    def _stored(self, command, key, reason):
        if reason is None:
            return True
        if reason.startswith("SERVER_ERROR"):
            logger.warning("%s of key %r refused by memcached: %s", command, key, reason)
        return False

    # -- the commands the backend uses --------------------------------------

    def get(self, key):
        # The busiest call of a Django site: ``_call`` inlined for the common
        # case (consistent distribution, a healthy connection). Any failure
        # takes the general path through ``_recover``.
        try:
            if self._single and self.blacklist.next_probe is None:
                index = 0  # one healthy server: nothing to choose
            else:
                index = self._index_for(key)
            if self._random:
                raw = self._call(index, "get", Connection.get, key, retry=True)
            else:
                pool = self.pools[index]
                try:
                    conn = pool.acquire()
                except OSError as exc:
                    raise self._server_failed(index, "connect", exc) from exc
                try:
                    raw = conn.get(key)
                except Exception as exc:
                    raw = self._recover(index, conn, "get", exc, True, False, Connection.get, (key,))
                else:
                    pool.release(conn)
        except DjmemcacheError as exc:
            return self._failed(exc, "get", MISS)
        return MISS if raw is None else self._decode(key, raw)

    def get_many(self, keys):
        found = {}
        try:
            groups = self._group(keys)
        except DjmemcacheError as exc:
            return self._failed(exc, "get_many", found)
        for _batch, outcome in self._pipeline(
            "get", groups, Connection.send_get_many, Connection.read_get_many, retry=True
        ):
            if isinstance(outcome, DjmemcacheError):
                self._failed(outcome, "get_many", None)
                continue
            for key, raw in outcome.items():
                value = self._decode(key, raw)
                if value is not MISS:
                    found[key] = value
        return found

    def set(self, key, value, expire):
        item = self.serializer.dumps(key, value)
        try:
            reason = self._call(self._index_for(key), "set", Connection.store_one, b"set", key, item, expire,
                                retry=True)
        except DjmemcacheError as exc:
            return self._failed(exc, "set", False)
        return reason is None or self._stored("set", key, reason)

    def add(self, key, value, expire):
        item = self.serializer.dumps(key, value)
        try:
            reason = self._call(self._index_for(key), "add", Connection.store_one, b"add", key, item, expire)
        except DjmemcacheError as exc:
            return self._failed(exc, "add", False)
        return reason is None or self._stored("add", key, reason)

    def set_many(self, mapping, expire):
        """Store every item; return the keys that were not stored."""
        data = {key: self.serializer.dumps(key, value) for key, value in mapping.items()}
        try:
            groups = self._group(data)
        except DjmemcacheError as exc:
            return self._failed(exc, "set_many", list(data))
        batches = {index: {key: data[key] for key in keys} for index, keys in groups.items()}
        failed = []
        for batch, outcome in self._pipeline(
            "set", batches, _SendStore(b"set", expire), Connection.read_store, retry=True
        ):
            if isinstance(outcome, DjmemcacheError):
                failed += self._failed(outcome, "set_many", list(batch))
                continue
            failed += [key for key, reason in outcome.items() if not self._stored("set", key, reason)]
        return failed

    def delete(self, key):
        try:
            return self._call(self._index_for(key), "delete", Connection.delete, key, retry=True)
        except DjmemcacheError as exc:
            return self._failed(exc, "delete", False)

    def delete_many(self, keys):
        try:
            groups = self._group(keys)
        except DjmemcacheError as exc:
            return self._failed(exc, "delete_many", None)
        for _batch, outcome in self._pipeline(
            "delete", groups, Connection.send_delete_many, Connection.read_delete_many, retry=True
        ):
            if isinstance(outcome, DjmemcacheError):
                self._failed(outcome, "delete_many", None)

    def touch(self, key, expire):
        try:
            return self._call(self._index_for(key), "touch", Connection.touch, key, expire, retry=True)
        except DjmemcacheError as exc:
            return self._failed(exc, "touch", False)

    def incr(self, key, delta):
        """New value (``delta`` < 0 decrements), or None when the key is
        missing or, ignoring errors, the server failed."""
        try:
            return self._call(self._index_for(key), "incr", Connection.incr, key, delta)
        except DjmemcacheError as exc:
            return self._failed(exc, "incr", None)

    def flush_all(self):
        for index in range(len(self.servers)):
            if index not in self.blacklist.live:
                continue
            try:
                self._call(index, "flush_all", Connection.flush_all, 0, False, retry=True, anywhere=False)
            except DjmemcacheError as exc:
                self._failed(exc, "flush_all", None)

    # -- introspection and shutdown -----------------------------------------

    def status(self):
        """Per server: where it stands, what its pool holds, and its counters
        (``opened``, ``hits``, ``misses``, ``errors``, ``timeouts``,
        ``blacklistings``) since the process started."""
        result = []
        for index, server in enumerate(self.servers):
            banned = self.blacklist.state(index)
            entry = {"server": str(server), "state": "blacklisted" if banned else "up",
                     "blacklisted_for": None, "reason": None}
            if banned:
                entry["blacklisted_for"] = max(0.0, banned[0] - self.clock())
                entry["reason"] = banned[1]
            entry.update(self.pools[index].status())
            entry.update(self.pools[index].counters())
            result.append(entry)
        return result

    def close(self):
        for pool in self.pools:
            pool.clear_idle()

    def __repr__(self):
        return "<Client %s>" % " ".join(repr(p) for p in self.pools)


def _first(pair):
    return pair[0]


class _Roundtrip:
    """send then read, as one method: how a failed pipelined batch is retried alone."""

    def __init__(self, send, read):
        self.send, self.read = send, read

    def __call__(self, conn, batch):
        return self.read(conn, self.send(conn, batch))


class _SendStore:
    def __init__(self, command, expire):
        self.command, self.expire = command, expire

    def __call__(self, conn, items):
        return conn.send_store(self.command, items, self.expire)


def _describe(exc):
    if isinstance(exc, _TIMEOUTS):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


_registry = {}
_registry_lock = threading.Lock()


def client_for(options):
    """The one process-wide ``Client`` for this configuration."""
    client = _registry.get(options)
    if client is None:
        with _registry_lock:
            client = _registry.get(options)
            if client is None:
                client = _registry[options] = Client(options)
    return client


def reset_registry():
    """Close every pooled connection and forget all clients (tests, shutdown)."""
    with _registry_lock:
        clients = list(_registry.values())
        _registry.clear()
    for client in clients:
        client.close()


# Close pooled sockets at interpreter exit instead of leaving them to the
# garbage collector (which warns about each one).
atexit.register(reset_registry)


def _reset_lock_after_fork():
    global _registry_lock
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reset_lock_after_fork)
