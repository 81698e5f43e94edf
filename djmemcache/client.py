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
import errno
import logging
import os
import random
import threading
import time
from functools import partial

from djmemcache.connection import (
    BLOCKING_READ_MIN_TIMEOUT,
    MAX_LINE,
    Connection,
    ConnectionClosed,
    ErrorReply,
    IOTimeout,
    ProtocolError,
    _load_speedups,
    _native_failure,
    _store_outcome,
    exchange_many,
    send_unsent,
    tls_context_for,
)
from djmemcache.exceptions import (
    DjmemcacheError,
    NonNumericValue,
    NoServerAvailable,
    PoolTimeout,
    ServerError,
)
from djmemcache.pool import HostPool, give_back, take_idle
from djmemcache.serializer import CorruptValue, serializer_for
from djmemcache.servers import FLUSH, Blacklist, Rendezvous, merge_missed

logger = logging.getLogger("djmemcache.client")

MISS = object()
#: An item that is there but cannot be read (``Client.get_or_unreadable``).
UNREADABLE = object()

# The kinds of failure that came out of the socket or the protocol. Anything
# else raised during a command (a signal handler's exception, gevent.Timeout,
# KeyboardInterrupt) is the caller's: it closes the connection and goes on
# unchanged, and counts against no server.
TIMEOUT, REFUSED, LOST, BROKEN = "timed out", "connection refused", "connection lost", "bad reply"

# memcached keeps exptime as a signed 32-bit number. memcached 1.6.18 reads
# the field as 64 bits and truncates it (2**32 means "never expire",
# -2**31 - 1 an absolute time in 2038); past 2**63 it rejects the command
# line without reading the data block, and then runs the value's bytes as
# the next command. So nothing outside 32 bits is ever sent: the backend
# clamps Django's timeouts into this range, and check_expire refuses the rest.
EXPTIME_MAX = 2**31 - 1
EXPTIME_MIN = -(2**31)
FLAGS_MAX = 2**32 - 1
DELTA_MAX = 2**64 - 1

#: A server back from a ban has what it missed deleted in rounds, each
#: deleting what was missed during the last, until a round has at most
#: REPAIR_BATCH keys or this many rounds ran; the last round runs while the
#: writers of its keys wait (``Client._come_back``).
REPAIR_ROUNDS = 8
#: Deletes per pipelined batch when a server back from a ban is repaired.
REPAIR_BATCH = 500
#: With TIMEOUT None, the bound of each command of a probe and of the repair
#: that follows (a server that hangs then must not hold them for ever).
PROBE_TIMEOUT = 5.0
#: Most times the last round of a repair starts again (each time with what
#: was missed during the one before) before the probe gives up for now.
CLOSING_ROUNDS = 50


def _banned(blacklist, index):
    return index not in blacklist.live


def fault_kind(exc):
    """What kind of server fault ``exc`` is, or None when it is not one.

    Only exceptions raised by the I/O itself count: our own ``IOTimeout`` and
    ``ProtocolError``, and ``OSError``s that carry an errno (the kernel's or
    the TLS layer's). A bare ``TimeoutError()`` raised by a caller's alarm
    has none, so it is never taken for a socket timeout.
    """
    if isinstance(exc, IOTimeout):
        return TIMEOUT
    if isinstance(exc, ProtocolError):
        return LOST if isinstance(exc, ConnectionClosed) else BROKEN
    if isinstance(exc, OSError) and exc.errno is not None:
        if isinstance(exc, BlockingIOError) or exc.errno == errno.ETIMEDOUT:
            return TIMEOUT  # SO_RCVTIMEO/SO_SNDTIMEO expired (EAGAIN), or TCP gave up
        if isinstance(exc, ConnectionRefusedError):
            return REFUSED
        return LOST
    return None


def check_expire(expire):
    """``expire`` as memcached will accept it, or ValueError before anything is sent."""
    if type(expire) is not int:
        raise ValueError("memcached expiry must be a whole number of seconds, not %r" % (expire,))
    if not EXPTIME_MIN <= expire <= EXPTIME_MAX:
        raise ValueError("memcached expiry %d is out of range (%d to %d)" % (expire, EXPTIME_MIN, EXPTIME_MAX))
    return expire


class Client:
    """All servers of one configuration, with a pool and a blacklist entry each."""

    def __init__(self, options, connection_class=Connection):
        self.options = options
        self.servers = options.servers
        clock = options.clock or time.monotonic
        self.clock = clock
        self.connection_class = connection_class
        self.tls = tls_context_for(options)
        self.pools = tuple(HostPool(s, options, connection_class, self.tls) for s in self.servers)
        self.blacklist = Blacklist(self.servers, options.blacklist_time, clock)
        for index, pool in enumerate(self.pools):
            pool.banned = partial(_banned, self.blacklist, index)
        self._everyone = tuple(range(len(self.servers)))
        self._index_of = {str(server): index for index, server in enumerate(self.servers)}
        self.rendezvous = Rendezvous([s.node for s in self.servers])
        self.serializer = serializer_for(options)
        self.ignore_exc = options.ignore_exc
        self.max_value_size = options.max_value_size
        self._random = options.distribution == "random"
        # Client.get's C path places keys as Rendezvous does in C.
        self._placed_get = not self._random and self.rendezvous._native is not None
        self._log_lock = threading.Lock()
        self._pool_warned_at = -1e9
        self._pool_warnings_held = 0
        # Longer than a probe can take: connect, then one command (a repair
        # that follows holds its claim longer, one batch at a time).
        self._probe_hold = (options.effective_connect_timeout or 5.0) + (options.timeout or 5.0) + 1.0
        self._probes = []  # probe threads of this process, for tests and shutdown
        # After a return, the copies other servers took are deleted again this
        # much later: a write placed before it waited for pool slots, then sent.
        pool_wait = options.pool_timeout if options.pool_timeout is not None else 5.0
        self._stray_delay = min(30.0, len(self.servers) * pool_wait + (options.timeout or 5.0))
        # How long a write of a returning server's keys waits for the last round of its repair.
        self._repair_wait = min(options.timeout or 1.0, 1.0)

    # -- choosing a server --------------------------------------------------

    def _live(self):
        live, next_probe = self.blacklist.state  # read once: other threads replace it whole
        if next_probe is not None and self.clock() >= next_probe:
            self._start_probes()
        if not live:
            raise NoServerAvailable(
                "every memcached server is blacklisted: %s" % ", ".join(map(str, self.servers))
            )
        return live

    def _index_for(self, key):
        live, next_probe = self.blacklist.state
        if next_probe is not None or not live:  # a probe may be due, or no server is live
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
        return self.rendezvous.group(keys, self._live())

    # -- writes a blacklisted server misses ----------------------------------
    #
    # A key whose server is banned is written elsewhere (or, none live,
    # nowhere); back in service, that server would serve the value it held
    # before. So while any server is banned (never on the usual path), each
    # write names its key to the blacklist, and the probe that brings the
    # server back deletes those keys there first (_come_back). Random
    # distribution has no such server: every proxy serves every key.

    def _index_for_write(self, key):
        """``_index_for`` for a command that changes ``key``."""
        if self._random:
            return self._index_for(key)
        live, next_probe = self.blacklist.state  # read once: a ban in between must not go unnamed
        if next_probe is None:  # nothing banned: live is every server
            return self.rendezvous.choose(key, live)
        while True:
            try:
                live = self._live()
            except NoServerAvailable:
                if self._name(key, None, ()):
                    raise
                continue  # a server came back meanwhile: it takes the write
            index = self.rendezvous.choose(key, live)
            if self._name(key, index, live):
                return index

    def _name(self, key, index, live):
        """Name ``key``, written to server ``index`` (None: to none) as placed
        among ``live``, to every other server that would serve it before
        ``index`` once back (its server, and those that took it while that
        one was out). False when one of them is back (since ``live`` was
        read, or once the last round of its repair ends): placed again."""
        rendezvous = self.rendezvous
        for banned in self._everyone:
            if banned in live or (index is not None and not rendezvous.prefers(key, banned, index)):
                continue
            named = self.blacklist.missed(banned, key, index)
            if named is not True and named is not False:  # the last round of its repair
                named.wait(self._repair_wait)
                return False  # it came back, or the wait is over: placed again
            if named is False:
                return False
        return True

    def _group_for_write(self, keys):
        """``_group`` for a command that changes ``keys``."""
        live, next_probe = self.blacklist.state  # read once, as _index_for_write
        if self._random or not keys:
            return self._group(keys)
        if next_probe is None:
            return self.rendezvous.group(keys, live)
        groups = {}
        none_live = None
        for key in keys:
            try:
                groups.setdefault(self._index_for_write(key), []).append(key)
            except NoServerAvailable as exc:
                none_live = exc  # every key is named before this is raised
        if none_live is not None:
            raise none_live
        return groups

    def _unsure(self, exc, keys):
        """A write of ``keys`` failed on a server that is banned now (the
        failure banned it): it may still hold the older values, so they are
        deleted there on its return as well."""
        index = self._index_of.get(getattr(exc, "server", None))
        if index is not None and not self._random and self.blacklist.state[1] is not None:
            for key in keys:
                if not self.blacklist.missed(index, key, None, wait=False):
                    return  # not banned: it answered, or is back

    def _come_back(self, index, conn):
        """Bring server ``index`` back after its probe passed on ``conn``:
        delete there what it missed while banned, in rounds (each deletes
        what was missed during the last), the last ones while writers of its
        keys wait (``Blacklist.close``), with the copies the other servers
        took, then restore it. The copies go before it is back, not after:
        banned again in between (dead right after its probe), it sent its
        keys' reads back to them, older than what was written and read on
        it meanwhile. Raises when the server fails meanwhile, all it missed
        (and where the copies are) given back to the blacklist for its next probe."""
        strays = {}  # {key: bits of the other servers that took it}
        missed = {}
        try:
            missed = self.blacklist.missed_by(index)
            rounds = 1
            while rounds < REPAIR_ROUNDS and (FLUSH in missed or len(missed) > REPAIR_BATCH):
                self._repair_round(index, conn, missed, strays)
                missed = self.blacklist.missed_by(index)
                rounds += 1
            for _round in range(CLOSING_ROUNDS):
                missed = self.blacklist.close(index, missed, self._repair_wait)
                if missed:
                    self._repair_round(index, conn, missed, strays)
                missed = self.blacklist.restore(index)
                if not missed:  # else missed meanwhile (a writer's wait ran out, a flush_all): again
                    break
            else:
                raise ServerError("writes of its keys kept coming during its repair")
        except BaseException:
            self.blacklist.unrepaired(index, merge_missed(missed, strays))  # the writers waiting go on
            raise
        if strays:
            # Once more later: a write placed before the return may land after the first.
            timer = threading.Timer(self._stray_delay, self._delete_strays, (index, strays))
            timer.daemon = True
            with _registry_lock:
                _timers[:] = [t for t in _timers if t.is_alive()] + [timer]
            timer.start()

    def _repair_round(self, index, conn, missed, strays):
        """``_repair`` of ``missed``, then the deletion of the copies of its
        keys on the other servers (added to ``strays``): each round's own,
        so writers waiting for the last round wait for its copies only."""
        copies = {}
        self._repair(index, conn, missed, copies)
        if copies:
            self._delete_strays(index, copies, hold=True)
            merge_missed(strays, copies)

    def _repair(self, index, conn, missed, strays):
        """Delete on ``conn`` (server ``index``) the keys it ``missed``, or
        flush it; the other servers that took each key go in ``strays``."""
        name = self.servers[index]
        if FLUSH in missed:
            self.blacklist.hold(index, self._probe_hold)
            try:
                conn.flush_all()
            except ErrorReply as exc:  # memcached -F: staying out would be for ever
                logger.error("memcached server %s back from a ban refused flush_all (%s): it may serve "
                             "values older than writes it missed", name, exc)
            else:
                logger.warning("memcached server %s flushed on its return: it missed a flush_all, or "
                               "writes of too many keys to name, while blacklisted", name)
        else:
            keys = list(missed)
            for start in range(0, len(keys), REPAIR_BATCH):
                self.blacklist.hold(index, self._probe_hold)
                conn.delete_many(keys[start:start + REPAIR_BATCH])
            logger.info("memcached server %s: %d keys written while it was blacklisted deleted there "
                        "before its return", name, len(keys))
        others = ~(1 << index)
        for key, written in missed.items():
            if written & others and key is not FLUSH:
                strays[key] = strays.get(key, 0) | (written & others)

    def _delete_strays(self, index, strays, hold=False):
        """Delete the copies of keys other servers took while ``index`` was
        banned; a server banned now (or whose delete fails) has them named,
        to be deleted on its return."""
        live = self.blacklist.live
        groups = {}
        for key, written in strays.items():
            other = 0
            while written:
                if written & 1:
                    # Back since live was read (missed says False): deleted there now.
                    if other in live or not self.blacklist.missed(other, key, None, wait=False):
                        groups.setdefault(other, []).append(key)
                written >>= 1
                other += 1
        # In batches, each with a TIMEOUT of its own: 90,000 deletes in one
        # pipeline outlasted a short TIMEOUT and banned a healthy server.
        for start in range(0, max(map(len, groups.values()), default=0), REPAIR_BATCH):
            batches = {other: keys[start:start + REPAIR_BATCH] for other, keys in groups.items()
                       if len(keys) > start}
            if hold:  # a return under way stays claimed
                self.blacklist.hold(index, self._probe_hold)
            for batch, outcome in self._pipeline("delete", batches, Connection.send_delete_many,
                                                 Connection.read_delete_many, retry=True):
                if isinstance(outcome, DjmemcacheError):
                    self._unsure(outcome, batch)  # deleted on its return if that failure banned it
                    logger.warning("copies of %d keys written while %s was blacklisted not deleted: %s",
                                   len(batch), self.servers[index], outcome)

    # -- bringing blacklisted servers back -----------------------------------

    def _start_probes(self):
        """Probe each server that is due, each in a thread of its own.

        Off the request path: the caller that notices a probe is due goes on
        at once (its key is a miss or goes to another server), and no caller
        ever waits for a probe's timeout.
        """
        for index in self.blacklist.claim_probe(self._probe_hold):
            thread = threading.Thread(target=self._probe, args=(index,), daemon=True,
                                      name="djmemcache-probe-%s" % self.servers[index])
            self._probes = [t for t in self._probes if t.is_alive()] + [thread]
            thread.start()

    def _probe(self, index):
        """Connect on a connection of its own (no pool slot), ask ``version``;
        if it answers, delete there what it missed, then restore it (``_come_back``)."""
        conn = self.connection_class(self.servers[index], self.options, self.tls)
        # Bounded even with TIMEOUT None: a repair follows, and writers may wait for it.
        conn.timeout = self.options.timeout or PROBE_TIMEOUT
        conn.connect_timeout = conn.connect_timeout or PROBE_TIMEOUT
        try:
            conn.connect()
            conn.version()
            self._come_back(index, conn)
        except Exception as exc:  # noqa: BLE001 - any failure keeps it out
            self.blacklist.probe_failed(index, "probe failed: %s" % _describe(exc))
        finally:
            conn.close()

    def wait_for_probes(self, timeout=10.0):
        """Wait until the probes under way have reported (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._probes):
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- running one command on one server -----------------------------------

    def _acquire(self, index, anywhere, fresh=False):
        """``(index, connection)`` for a command on server ``index``.

        ``anywhere`` (random distribution): any live server will do. ``fresh``
        (a retry after a server hung up on a pooled connection): a new
        connection, as other pooled ones may be dropped too; in random
        distribution, when the server that hung up refuses it (a restarting
        proxy), it is blacklisted and another live server takes the retry."""
        if anywhere:
            live = self._live()
            if fresh:
                if index in live:
                    try:
                        return index, self._take(index, fresh)
                    except ServerError:  # refused: blacklisted now, so another server
                        live = self._live()
                others = [i for i in live if i != index]
                index = random.choice(others) if others else live[0]
            else:
                # Prefer any live server's idle connection, then open one to a random live server.
                start = random.randrange(len(live)) if len(live) > 1 else 0
                for i in range(len(live)):
                    candidate = live[(start + i) % len(live)]
                    try:
                        conn = self.pools[candidate].acquire(idle_only=True)
                    except Exception as exc:  # a stale idle connection, and the reconnect failed
                        if fault_kind(exc) is None:
                            raise
                        self._connect_failed(candidate, exc)
                        continue
                    if conn is not None:
                        return candidate, conn
                if index not in live:
                    index = random.choice(self._live())
                tried = set()
                while True:
                    try:
                        return index, self._take(index)
                    except NoServerAvailable:  # banned while this call waited for its pool: another
                        tried.add(index)
                        others = [i for i in self._live() if i not in tried]
                        if not others:
                            raise
                        index = random.choice(others)
        return index, self._take(index, fresh)

    def _take(self, index, fresh=False):
        """A connection from server ``index``'s pool (``fresh``: a new one);
        a failed connect blacklists the server and raises its ``ServerError``."""
        pool = self.pools[index]
        try:
            return pool.acquire(fresh=True) if fresh else take_idle(pool) or pool.acquire()
        except Exception as exc:  # PoolTimeout is no fault of the server's
            if isinstance(exc, PoolTimeout) or fault_kind(exc) is None:
                raise
            raise self._connect_failed(index, exc) from exc

    def _connect_failed(self, index, exc):
        # A failed connect is a fault of the server's whatever its errno.
        return self._server_failed(index, "connect", exc, fault_kind(exc) or LOST, ban=True)

    def _call(self, index, command, method, *args, retry=False, anywhere=None, fresh=False):
        """Run ``method(connection, *args)`` on server ``index``.

        ``retry``: the command may run twice without changing the outcome
        (get, set, delete, touch, flush_all), so if a reused connection turns
        out to be closed by the server, it is retried once on a fresh one.
        incr, decr and add are never retried: a lost reply may hide a success.
        """
        if anywhere is None:
            anywhere = self._random  # random distribution: any live server serves any key
        index, conn = self._acquire(index, anywhere, fresh)
        try:
            result = method(conn, *args)
        except BaseException as exc:
            self.pools[index].discard(conn)
            kind = fault_kind(exc)
            if kind is None:
                raise
            return self._recover(index, conn, command, exc, kind, retry, anywhere, method, args)
        pool = self.pools[index]
        give_back(pool, conn) or pool.release(conn)
        return result

    def _recover(self, index, conn, command, exc, kind, retry, anywhere, method, args):
        """``method`` failed on ``conn`` (already discarded): retry once, or raise."""
        if self._retries(index, conn, command, exc, kind, retry):
            return self._call(index, command, method, *args, anywhere=anywhere, fresh=True)
        raise self._server_failed(index, command, exc, kind) from exc

    def _retries(self, index, conn, command, exc, kind, retry):
        """Whether ``command`` runs once more after failing on ``conn``: when
        it may (``retry``) and the server closed a reused connection. Its
        other idle connections are suspect too (a restart, a NAT or firewall
        that dropped them): they are closed, and the retry takes a new one
        (``_acquire``'s ``fresh``). Not when another caller has banned the
        server meanwhile (consistent distribution, where the retry would go
        to it): a hung server would cost the retry TIMEOUT."""
        if not (retry and conn.reused and kind == LOST):
            return False
        if not self._random and index not in self.blacklist.live:
            return False
        logger.debug("retrying %s on %s after %r", command, self.servers[index], exc)
        self.pools[index].clear_idle()
        return True

    def _pipeline(self, command, batches, send, read, retry, native=None, into=None, fresh=False):
        """Run a multi-key command on several servers at once.

        Every server is sent its batch before any reply is read, so the
        round trips overlap instead of adding up, and all of it shares one
        deadline. ``batches`` maps a server index to its batch; returns
        ``(batch, outcome)`` pairs where the outcome is ``read``'s result or
        the ``DjmemcacheError`` of that server. Whatever is raised meanwhile,
        every connection taken is given back or closed first.

        ``native``: ``(request, outcome)`` methods for connections that run
        through ``_speedups``; their commands are sent and replies read in
        one C call (one GIL release for every server, values put in
        ``into``) before the others' replies are read, and ``outcome``
        raises a server's failure as ``read`` would.

        ``fresh``: on new connections (``_acquire``), for a retry.
        """
        anywhere = self._random
        timeout = self.options.timeout
        deadline = None
        results = []
        retrying = False  # some server closed a reused connection: _retry_together
        held = []  # [index, conn, batch, token] whose reply is still to be read
        natives = []  # those of held that run through _speedups
        try:
            # Taking connections in server order: with bounded pools, two callers
            # taking them in opposite orders could each wait for the other forever.
            for index, batch in sorted(batches.items()) if len(batches) > 1 else batches.items():
                try:
                    index, conn = self._acquire(index, anywhere, fresh)
                except DjmemcacheError as exc:
                    results.append((batch, exc))
                    continue
                entry = [index, conn, batch, None]
                held.append(entry)
                if native is not None and conn._native:
                    entry[3] = native[0](conn, batch)  # no I/O yet: see below
                    natives.append(entry)
                    continue
                try:
                    # Deferred: what the socket does not take now waits for
                    # _send_unsent, so nothing here waits on a server.
                    entry[3] = send(conn, batch, None, True)
                except BaseException as exc:
                    results.append((batch, self._settle(index, conn, command, exc, retry)))
                    held.pop()
                    retrying = retrying or type(results[-1][1]) is _Retry
            if timeout is not None and len(held) > len(natives):
                # TIMEOUT runs from when every connection is in hand: a connect
                # or a pool wait for a later server (CONNECT_TIMEOUT, POOL_TIMEOUT
                # bound those) must not use up an earlier one's time and get a
                # healthy server blacklisted for a timeout it never had.
                deadline = time.monotonic() + timeout
            if len(held) > len(natives) and any(entry[1].unsent for entry in held):
                retrying = self._send_unsent(command, held, results, deadline, retry) or retrying
            if natives:
                if timeout is not None:
                    deadline = time.monotonic() + timeout  # the latest: nothing of theirs is sent yet
                outcomes = exchange_many([entry[3] for entry in natives], deadline, timeout,
                                         self.max_value_size, into)
                for entry, outcome in zip(natives, outcomes, strict=True):
                    entry[3] = outcome
            while held:
                index, conn, batch, token = held[0]
                try:
                    if native is not None and conn._native:
                        outcome = native[1](conn, token, batch)
                    else:
                        outcome = read(conn, token, deadline)
                except BaseException as exc:
                    outcome = self._settle(index, conn, command, exc, retry)
                    held.pop(0)
                    retrying = retrying or type(outcome) is _Retry
                else:
                    # Off the list first: once given back it may be another
                    # caller's, even if release() is interrupted.
                    held.pop(0)
                    pool = self.pools[index]
                    give_back(pool, conn) or pool.release(conn)
                results.append((batch, outcome))
            if retrying:
                self._retry_together(command, results, send, read, native, into)
        except BaseException:
            for index, conn, _batch, _token in held:
                self.pools[index].discard(conn)
            raise
        return results

    def _send_unsent(self, command, held, results, deadline, retry):
        """Send every server in ``held`` the rest of its command at once (a
        large ``set_many``); each failure is settled and its entry dropped.
        True when one of them is to be retried."""
        pending = [entry for entry in held if entry[1].unsent]
        retrying = False
        for entry, exc in zip(pending, send_unsent([entry[1] for entry in pending], deadline), strict=True):
            if exc is not None:
                index, conn, batch, _token = entry
                results.append((batch, self._settle(index, conn, command, exc, retry)))
                held.remove(entry)
                retrying = retrying or type(results[-1][1]) is _Retry
        return retrying

    def _settle(self, index, conn, command, exc, retry):
        """A server's failure in a pipeline, as its outcome: ``_Retry`` when
        the server closed a reused connection and ``retry`` allows one, else
        its ``DjmemcacheError``. Never raises a server's failure: the other
        servers' connections are still checked out and must be read and
        given back first."""
        self.pools[index].discard(conn)
        kind = fault_kind(exc)
        if kind is None:
            raise exc
        if self._retries(index, conn, command, exc, kind, retry):
            return _Retry(index)
        error = self._server_failed(index, command, exc, kind)
        error.__cause__ = exc
        return error

    def _retry_together(self, command, results, send, read, native=None, into=None):
        """Run the batch of every ``_Retry`` in ``results`` once more, all in
        one pipeline, and put each outcome in its place.

        Together, not one server after another: a call whose every server
        stalls and then hangs up costs about twice TIMEOUT, not TIMEOUT more
        for each server."""
        again = {outcome.index: batch for batch, outcome in results if type(outcome) is _Retry}
        retried = {id(batch): outcome
                   for batch, outcome in self._pipeline(command, again, send, read, False, native, into,
                                                        fresh=True)}
        for position, (batch, outcome) in enumerate(results):
            if type(outcome) is _Retry:
                results[position] = (batch, retried[id(batch)])

    def _settle_failures(self, failures):
        """``(batch, outcome)`` of each server ``get_pooled`` saw fail (its
        connection already discarded there), as ``_pipeline`` gives them:
        the batches of servers that closed a reused connection retried once,
        together, on fresh connections."""
        if len(failures) > 1:
            failures.sort(key=_server_index)  # in server order, as _pipeline reports them
        results = [(batch, self._settle(index, conn, "get", _native_failure(conn, failure), True))
                   for index, conn, batch, failure in failures]
        if any(type(outcome) is _Retry for _batch, outcome in results):
            self._retry_together("get", results, Connection.send_get_many, Connection.read_get_many)
        return results

    def _server_failed(self, index, command, exc, kind, ban=False):
        server = self.servers[index]
        reason = "%s %s" % (command, _describe(exc))
        banned = False
        if ban or kind in (TIMEOUT, REFUSED):
            banned = self.blacklist.ban(index, reason)
            if banned:
                self.pools[index].clear_idle()
        self.pools[index].record_failure(kind == TIMEOUT, banned)
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

    def _decode(self, key, raw, unreadable=MISS):
        try:
            return self.serializer.loads(key, *raw)
        except CorruptValue as exc:
            _warn_unreadable(key, exc)
            return unreadable

    def _item(self, key, value):
        """``(data, flags)`` of a value, or None when memcached could not hold it."""
        data, flags = self.serializer.dumps(key, value)
        if type(flags) is not int or not 0 <= flags <= FLAGS_MAX:
            raise ValueError("the serializer gave flags %r for key %r; memcached takes 0 to %d"
                             % (flags, key, FLAGS_MAX))
        if len(data) > self.max_value_size:
            logger.warning("value of key %r not stored: %d bytes, more than MAX_VALUE_SIZE (%d)",
                           key, len(data), self.max_value_size)
            return None
        return data, flags

    def _stored(self, command, key, reason):
        if reason is None:
            return True
        if reason.startswith("SERVER_ERROR"):
            logger.warning("%s of key %r refused by memcached: %s", command, key, reason)
        return False

    # -- the commands the backend uses --------------------------------------

    def get(self, key):
        # The busiest call of a Django site: placement, the pool, the round
        # trip and giving back in one C call (get_placed) when every server
        # is as usual, else _get_at. Any failure takes the general path
        # through _recover.
        try:
            live, next_probe = self.blacklist.state
            if get_placed is not None and self._placed_get and next_probe is None and live:
                raw = get_placed(self.pools, self.rendezvous.scored(live), key,
                                 MAX_LINE, BLOCKING_READ_MIN_TIMEOUT)
                if type(raw) is int:  # that pool's Python path: nothing was taken
                    raw = self._get_at(raw, key)
                elif type(raw) is list:  # the server failed (C has discarded the connection)
                    index, conn, failure = raw
                    raw = self._one_failed(index, conn, _native_failure(conn, failure), "get", True,
                                           Connection.get, (key,))
            else:
                raw = self._get_at(self._index_for(key), key)
        except DjmemcacheError as exc:
            return self._failed(exc, "get", MISS)
        return MISS if raw is None else self._decode(key, raw)

    def _get_at(self, index, key):
        if self._random:
            return self._call(index, "get", Connection.get, key, retry=True)
        pool = self.pools[index]
        conn = self._take(index)
        try:
            raw = conn.get(key)
        except BaseException as exc:
            return self._one_failed(index, conn, exc, "get", True, Connection.get, (key,))
        give_back(pool, conn) or pool.release(conn)
        return raw

    def _one_failed(self, index, conn, exc, command, retry, method, args):
        """``method`` failed on ``conn`` (``_get_at``'s, or a one-key C path's,
        which has discarded it already): discard it, then retry once or raise."""
        self.pools[index].discard(conn)
        kind = fault_kind(exc)
        if kind is None:
            raise exc
        return self._recover(index, conn, command, exc, kind, retry, False, method, args)

    def get_many(self, keys, names=None):
        """``{key: value}`` of the keys found; with ``names``, ``{names[key]: value}``."""
        found = {}
        try:
            groups = self._group(keys)
        except DjmemcacheError as exc:
            return self._failed(exc, "get_many", found)
        raw = {}  # the C paths put their values here; the Python path returns dicts
        failures = None
        if get_pooled is not None and not self._random:
            # The common case in one C call: connections from the pools, every
            # server asked at once, and given back (None: not this time).
            failures = get_pooled(self.pools, groups, MAX_LINE, BLOCKING_READ_MIN_TIMEOUT, raw)
        if failures is None:
            outcomes = self._pipeline(
                "get", groups, Connection.send_get_many, Connection.read_get_many, retry=True,
                native=_GET_MANY_NATIVE, into=raw,
            )
        else:
            outcomes = self._settle_failures(failures) if failures else ()
        for _batch, outcome in outcomes:
            if type(outcome) is dict:
                raw.update(outcome)
            elif isinstance(outcome, DjmemcacheError):
                self._failed(outcome, "get_many", None)
            # else (hits, misses) of the C path, whose values are already in raw
        if raw:
            # Decoded once for every server: one call, not one per server.
            found, corrupt = self.serializer.loads_many(raw, names)
            for key, exc in corrupt:
                _warn_unreadable(key, exc)
        return found

    def _store(self, command, key, value, expire, retry):
        """None when stored, else why not: "too large" (MAX_VALUE_SIZE),
        memcached's reply ("NOT_STORED", "SERVER_ERROR ..."), or "failed"
        (the server failed, IGNORE_EXC)."""
        check_expire(expire)
        item = self._item(key, value)
        if item is None:
            return "too large"
        try:
            live, next_probe = self.blacklist.state
            if (store_placed is not None and self._placed_get and next_probe is None and live
                    and type(item[0]) is bytes):
                # As get: placement, the pool and the round trip in one C call.
                reason = store_placed(self.pools, self.rendezvous.scored(live), command, key, item[0],
                                      item[1], expire, MAX_LINE, BLOCKING_READ_MIN_TIMEOUT)
                if type(reason) is bytes:  # not stored (NOT_STORED, SERVER_ERROR ...)
                    reason = _store_outcome(reason)
                elif type(reason) is int:  # that pool's Python path: nothing was taken
                    reason = self._call(reason, command.decode(), Connection.store_one,
                                        command, key, item, expire, retry=retry)
                elif reason is not None:  # the server failed (C has discarded the connection)
                    index, conn, failure = reason
                    reason = self._one_failed(index, conn, _native_failure(conn, failure), command.decode(),
                                              retry, Connection.store_one, (command, key, item, expire))
            else:
                reason = self._call(self._index_for_write(key), command.decode(), Connection.store_one,
                                    command, key, item, expire, retry=retry)
        except DjmemcacheError as exc:
            self._unsure(exc, (key,))
            return self._failed(exc, command.decode(), "failed")
        if reason is not None:
            self._stored(command.decode(), key, reason)  # logs a refusal (SERVER_ERROR)
        return reason

    def set(self, key, value, expire):
        return self._store(b"set", key, value, expire, True) is None

    def add(self, key, value, expire):
        return self._store(b"add", key, value, expire, False) is None

    def store_why(self, command, key, value, expire):
        """``add`` (or ``set``) saying why a value was not stored: see ``_store``."""
        return self._store(command, key, value, expire, command == b"set")

    def set_many(self, mapping, expire):
        """Store every item; return the keys that were not stored."""
        check_expire(expire)
        data = {}
        failed = []
        for key, value in mapping.items():
            item = self._item(key, value)
            if item is None:
                failed.append(key)
            else:
                data[key] = item
        try:
            groups = self._group_for_write(data)
        except DjmemcacheError as exc:
            return failed + self._failed(exc, "set_many", list(data))
        batches = {index: {key: data[key] for key in keys} for index, keys in groups.items()}
        for batch, outcome in self._pipeline(
            "set", batches, _SendStore(b"set", expire), Connection.read_store, retry=True
        ):
            if isinstance(outcome, DjmemcacheError):
                self._unsure(outcome, batch)
                failed += self._failed(outcome, "set_many", list(batch))
                continue
            failed += [key for key, reason in outcome.items() if not self._stored("set", key, reason)]
        return failed

    def delete(self, key):
        try:
            return self._call(self._index_for_write(key), "delete", Connection.delete, key, retry=True)
        except DjmemcacheError as exc:
            self._unsure(exc, (key,))
            return self._failed(exc, "delete", False)

    def delete_many(self, keys):
        try:
            groups = self._group_for_write(keys)
        except DjmemcacheError as exc:
            return self._failed(exc, "delete_many", None)
        for batch, outcome in self._pipeline(
            "delete", groups, Connection.send_delete_many, Connection.read_delete_many, retry=True
        ):
            if isinstance(outcome, DjmemcacheError):
                self._unsure(outcome, batch)
                self._failed(outcome, "delete_many", None)

    def touch(self, key, expire):
        check_expire(expire)
        try:
            return self._call(self._index_for_write(key), "touch", Connection.touch, key, expire, retry=True)
        except DjmemcacheError as exc:
            self._unsure(exc, (key,))
            return self._failed(exc, "touch", False)

    def incr(self, key, delta):
        """New value (``delta`` < 0 decrements), or None when the key is
        missing or, ignoring errors, the server failed; ``NonNumericValue``
        when the value is not a counter."""
        if type(delta) is not int or abs(delta) > DELTA_MAX:
            raise ValueError("incr/decr delta must be a whole number from -%d to %d, not %r"
                             % (DELTA_MAX, DELTA_MAX, delta))
        try:
            value = self._call(self._index_for_write(key), "incr", _incr, key, delta)
        except DjmemcacheError as exc:
            self._unsure(exc, (key,))
            return self._failed(exc, "incr", None)
        if value is _NON_NUMERIC:
            raise NonNumericValue(
                "cannot %s key %r: memcached holds a value that is not a whole number from 0 "
                "to 2**64 - 1" % ("decrement" if delta < 0 else "increment", key))
        return value

    def flush_all(self):
        """Flush every live server; a banned one is flushed on its return,
        and one back meanwhile, in the next pass."""
        pending = list(self._everyone)
        try:
            for _pass in range(3):
                for index in list(pending):
                    if index in self.blacklist.live:
                        pending.remove(index)
                        try:
                            self._call(index, "flush_all", Connection.flush_all, retry=True, anywhere=False)
                        except DjmemcacheError as exc:
                            self._mark_unflushed(index)  # if that failure banned it
                            self._failed(exc, "flush_all", None)
                    elif self._mark_unflushed(index):
                        pending.remove(index)
                    # else back between the two looks: the next pass flushes it
                if not pending:
                    break
        finally:
            for index in pending:
                self._mark_unflushed(index)

    def _mark_unflushed(self, index):
        """True when ``index`` is banned and will be flushed on its return
        (a proxy, in random distribution, has no items of its own)."""
        return self._random or self.blacklist.missed_all(index)

    # -- for djmemcache.stampede: failures raised, not turned into misses -----

    def index_for(self, key, write=True):
        """Index of the server that holds ``key`` (``NoServerAvailable`` when
        none is live); ``write``: for a command that may change it."""
        return self._index_for_write(key) if write else self._index_for(key)

    def call(self, index, command, method, *args, retry=False):
        """Run ``method(connection, *args)`` on server ``index`` like every
        command (pool, blacklist, one retry when ``retry``), but raise a
        server failure as ``DjmemcacheError`` instead of making it a miss:
        get_or_set must tell "the lock is taken" from "the server failed"."""
        return self._call(index, command, method, *args, retry=retry)

    def get_or_unreadable(self, key):
        """``get``, but UNREADABLE for an item that is there and cannot be
        read (another client's flags, a bad signature): ``get_or_set`` must
        replace it, since ``add`` never would."""
        try:
            raw = self._call(self._index_for(key), "get", Connection.get, key, retry=True)
        except DjmemcacheError as exc:
            return self._failed(exc, "get", MISS)
        return MISS if raw is None else self._decode(key, raw, UNREADABLE)

    def cas(self, index, key, value, expire, cas):
        """Store ``value`` on server ``index`` only if the item still has the
        CAS value ``cas``: None when stored, else why not ("EXISTS": written
        since; "NOT_FOUND": deleted or expired; "too large"). Server failures
        are raised, as ``call`` does. Not retried: a lost STORED would come
        back as EXISTS."""
        check_expire(expire)
        item = self._item(key, value)
        if item is None:
            return "too large"
        if not self._random:
            try:
                placed = self._index_for_write(key)  # and named, while a server is banned
            except NoServerAvailable:
                placed = None
            if placed != index:
                return "EXISTS"  # the key has moved since it was read (a ban, a return): not written
        try:
            reason = self._call(index, "cas", Connection.cas, key, item, expire, cas)
        except DjmemcacheError as exc:
            self._unsure(exc, (key,))
            raise
        self._stored("cas", key, reason)  # logs a refusal (SERVER_ERROR)
        return reason

    # -- introspection and shutdown -----------------------------------------

    def status(self):
        """Per server: where it stands (blacklisted: when it is probed next,
        why, and how many keys written meanwhile its return will delete, or
        whether it will be flushed), what its pool holds, and its counters
        (``opened``, ``hits``, ``misses``, ``errors``, ``timeouts``,
        ``blacklistings``) since the process started."""
        result = []
        for index, server in enumerate(self.servers):
            banned = self.blacklist.report(index)
            entry = {"server": str(server), "state": "blacklisted" if banned else "up",
                     "next_probe_in": None, "reason": None, "missed_keys": 0, "flush_on_return": False}
            if banned:
                next_probe, entry["reason"], entry["missed_keys"], entry["flush_on_return"] = banned
                entry["next_probe_in"] = max(0.0, next_probe - self.clock())
            entry.update(self.pools[index].status())
            entry.update(self.pools[index].counters())
            result.append(entry)
        return result

    def close(self):
        for pool in self.pools:
            pool.clear_idle()

    def __repr__(self):
        return "<Client %s>" % " ".join(repr(p) for p in self.pools)


_GET_MANY_NATIVE = (Connection.get_many_request, Connection.get_many_outcome)
#: The common paths of ``Client.get_many``, ``get`` and ``_store`` in C
#: (``_speedups.get_pooled``, ``get_placed``, ``store_placed``), or None.
get_pooled = getattr(_load_speedups(), "get_pooled", None)
get_placed = getattr(_load_speedups(), "get_placed", None)
store_placed = getattr(_load_speedups(), "store_placed", None)


def _server_index(failure):
    return failure[0]


def _warn_unreadable(key, exc):
    logger.warning("unreadable item for key %r treated as a miss: %s", key, exc)


_NON_NUMERIC = object()
_NON_NUMERIC_REPLY = "CLIENT_ERROR cannot increment or decrement non-numeric value"


def _incr(conn, key, delta):
    """``Connection.incr``, where memcached's refusal of a non-numeric value
    is a result: the reply is complete and well-formed, so the connection is
    kept and no server is blamed (the caller gets ``NonNumericValue``)."""
    try:
        return conn.incr(key, delta)
    except ErrorReply as exc:
        if str(exc) == _NON_NUMERIC_REPLY:
            return _NON_NUMERIC
        raise


class _Retry:
    """A pipeline's outcome for a server that closed a reused connection:
    its batch runs again, with the others that did (``_retry_together``)."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


class _SendStore:
    def __init__(self, command, expire):
        self.command, self.expire = command, expire

    def __call__(self, conn, items, deadline=None, defer=False):
        return conn.send_store(self.command, items, self.expire, deadline, defer)


def _describe(exc):
    kind = fault_kind(exc)
    if kind in (TIMEOUT, REFUSED):
        return kind
    if isinstance(exc, ErrorReply):
        return "error reply: %s" % exc
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


_registry = {}
_registry_lock = threading.Lock()
#: Timers of the second deletion of stray copies (``Client._come_back``):
#: cancelled by ``reset_registry``, not by ``Client.close``, which Django
#: calls after every request when USE_POOLING is off.
_timers = []


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
        timers, _timers[:] = list(_timers), []
    for timer in timers:
        timer.cancel()
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
