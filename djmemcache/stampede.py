"""``get_or_set`` without a stampede: one caller computes a missing value.

Django's ``BaseCache.get_or_set`` is get, compute, add, get: when a popular
key is missing, every concurrent caller computes it at once (the "dogpile").
Here, for a callable default:

- On a miss, the caller that ``add``\\ s a companion lock key (placed by the
  real key, so on the same server) computes; the others poll the real key
  and the lock in one ``get`` (one poller per process and key: the other
  threads of the process wait for it in memory) for up to STAMPEDE_WAIT
  seconds, then do what Django does. A winner that raises deletes the lock
  and the next poll takes it over; one that dies leaves a lock that expires
  after STAMPEDE_WAIT.
- With EARLY_REFRESH = n, the value is read with memcached 1.6's meta get
  ``mg <key> v f c t R<n>``: once fewer than n seconds are left, memcached
  hands ONE reader the W flag; that reader recomputes the value while the
  others keep reading the current one, so a hot key never misses, and
  stores it with ``cas``: a write or a delete made meanwhile wins.

Why a lock key rather than memcached's own vivify (``mg <key> N``): vivify
stores an empty item under the real key, which a plain ``get`` (Django's
``get``, or any other client of the cache) would then read as a value;
``add`` of another key leaves the real key as Django expects it, works on
every memcached and through twemproxy, and costs nothing on a hit and two
round trips (add, sent with a get of the key; delete) on a miss. Meta get is only used where it is
needed (early refresh), and a server that does not speak it (memcached
< 1.6 answers ERROR, twemproxy closes the connection) is noticed once and
read with a plain ``get`` from then on; DISTRIBUTION="random" means proxies,
so it never tries there.
"""

import hashlib
import itertools
import logging
import math
import os
import pickle
import threading
import time
import weakref

from djmemcache.client import MISS, UNREADABLE
from djmemcache.connection import Connection, ConnectionClosed, ErrorReply
from djmemcache.exceptions import DjmemcacheError, ServerError
from djmemcache.options import MAX_KEY_LENGTH

logger = logging.getLogger("djmemcache.stampede")

LOCK_SUFFIX = "|stampede-lock"
HASHED_LOCK = "djmemcache-lock:"
#: What a winner whose value memcached would not keep (too large) leaves in
#: the lock for the lock's lifetime: the others compute their own at once
#: instead of waiting, one after another, for a value that never comes.
UNSTORABLE = b"unstorable"
#: The first poll comes soon (a computation may be quick), later ones every 25 ms.
FIRST_POLL = 0.005
MAX_POLL = 0.025
#: memcached's clock ticks in whole seconds: an item given 1 s may live 0 s.
MIN_LOCK_TTL = 2
#: memcached reads a relative expiry only up to 30 days; beyond is a Unix time.
RELATIVE_EXPIRY_MAX = 60 * 60 * 24 * 30

_token_numbers = itertools.count(1)
#: token: thread, of the locks this process's get_or_set calls may hold, for
#: every Guard: with USE_POOLING off each thread has a Client and a Guard of
#: its own (and two aliases of one cache have two), and a Guard must not take
#: a live lock of this process that another Guard took for abandoned.
_takers = {}
_token_prefix = b"%d." % os.getpid()
_guards = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def guard_for(client):
    """The one ``Guard`` of a ``Client``: threads must find each other's flights."""
    try:
        return _guards[client]
    except KeyError:
        with _guards_lock:
            return _guards.setdefault(client, Guard(client))


def _forget_flights_after_fork():
    """A forked child (gunicorn --preload) has none of its parent's threads:
    a flight it inherited would never land, and a lock held at the fork
    would never be released."""
    global _guards_lock, _token_prefix
    _guards_lock = threading.Lock()
    _takers.clear()  # the parent's locks are its own to release
    _token_prefix = b"%d." % os.getpid()
    for guard in list(_guards.values()):
        guard._flights = {}
        guard._flights_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_flights_after_fork)


def _copy_of(value):
    """What a read from the cache would give of ``value``, or MISS when it
    does not pickle (then no cache could hold it)."""
    if type(value) in _IMMUTABLE:
        return value
    try:
        return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - whatever pickling a user's object raises
        return MISS


_IMMUTABLE = frozenset((str, bytes, int, float, bool, type(None)))


def _copy_of_error(exc):
    """An exception of the same type, arguments, attributes and cause as
    ``exc``, built without running its ``__init__`` (which may want other
    arguments than ``args``, reword them, or act); ``exc`` itself when even
    that fails."""
    cls = type(exc)
    try:
        error = cls.__new__(cls, *exc.args)
        error.__dict__.update(exc.__dict__)
        for klass in cls.__mro__:
            slots = getattr(klass, "__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                if name not in ("__dict__", "__weakref__") and hasattr(exc, name):
                    setattr(error, name, getattr(exc, name))
        if isinstance(exc, OSError):  # kept outside args (a None filename set would show in str)
            error.errno, error.strerror = exc.errno, exc.strerror
            for name in ("filename", "filename2"):
                if getattr(exc, name) is not None:
                    setattr(error, name, getattr(exc, name))
    except Exception:  # noqa: BLE001 - a user's exception type, built its own way
        return exc
    error.__cause__, error.__context__ = exc.__cause__, exc.__context__
    error.__suppress_context__ = exc.__suppress_context__
    return error


class _Claim:
    """One caller's attempts at the lock of a key on server ``index``.

    ``held``: True once an add of the lock was answered STORED, False when
    it was answered otherwise (or never sent), None while an add was sent
    and its answer not read.
    """

    __slots__ = ("index", "lock", "token", "at", "held", "unstorable")

    def __init__(self, index, lock):
        self.index, self.lock = index, lock
        self.token, self.at, self.held = None, 0.0, False
        self.unstorable = False  # computed, but memcached would not keep it


class _Flight:
    """One process-local computation of a key, which other threads wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.ok = False
        self.value = None
        self.error = None  # the Exception its computation raised
        self.leader = threading.current_thread()

    def orphaned(self):
        """True when no thread is computing this flight any more."""
        return self.leader is threading.current_thread() or not self.leader.is_alive()


class Guard:
    """get_or_set's protocol for the servers of one ``Client``."""

    def __init__(self, client):
        options = client.options
        self.client = weakref.proxy(client)  # _guards holds the client weakly
        self.wait = options.stampede_wait
        self.lock_ttl = max(MIN_LOCK_TTL, math.ceil(options.stampede_wait))
        self.early_refresh = 0 if options.distribution == "random" else options.early_refresh
        self.max_key_bytes = MAX_KEY_LENGTH - len(options.key_prefix)
        # A hashed lock key names itself when that leaves 128 bits of hash.
        self._hashed_lock = HASHED_LOCK if self.max_key_bytes >= len(HASHED_LOCK) + 32 else "~"
        self._hash_digits = min(64, self.max_key_bytes - len(self._hashed_lock))
        self._flights = {}
        self._flights_lock = threading.Lock()
        self._no_meta = set()  # indexes of servers seen not to speak meta commands
        self._meta_ok = set()  # indexes of servers that answered one

    def get_or_set(self, key, default, timeout, backend_timeout):
        """Django's ``get_or_set`` for a made and validated ``key`` and a
        callable ``default``; ``backend_timeout(timeout)`` is the memcached
        expiry, worked out only when needed (a hit without early refresh
        costs what ``get`` costs)."""
        if self.early_refresh:
            expire = backend_timeout(timeout)
            recache = self._recache_seconds(expire)
            value = self._read_and_refresh(key, default, expire, recache) if recache else self.client.get(key)
        else:
            value = self.client.get(key)
        if value is not MISS:
            return value
        expire = backend_timeout(timeout)
        if expire < 0:  # stores nothing (timeout 0): nothing to wait for
            return self._compute_and_add(key, default, expire)
        return self._coalesce(key, default, expire)

    # -- early refresh ----------------------------------------------------------

    def _recache_seconds(self, expire):
        """The R of ``mg``: EARLY_REFRESH, but at most the time to live less
        1 s (otherwise every new value would be refreshed at once)."""
        if expire <= 0:
            return 0
        ttl = expire if expire <= RELATIVE_EXPIRY_MAX else int(expire - time.time())
        recache = min(self.early_refresh, ttl - 1)
        return recache if recache >= 2 else 0

    def _read_and_refresh(self, key, default, expire, recache):
        client = self.client
        index = None
        try:
            index = client.index_for(key, write=False)  # Client.cas names it if it writes
            if index in self._no_meta:
                return client.get(key)
            reply = client.call(index, "get_or_set", Connection.meta_get, key, recache, retry=True)
        except DjmemcacheError as exc:
            if index is not None and self._lacks_meta(index, exc):
                return self._learn_no_meta(index, key, exc)
            return client._failed(exc, "get_or_set", MISS)
        self._meta_ok.add(index)
        if reply is None:
            return MISS
        data, flags, won, cas, ttl = reply
        value = client._decode(key, (data, flags))
        if not won or value is MISS:
            return value
        if not cas or ttl is None:
            # memcached run with -C has no CAS values: a refresh could only be
            # stored blind, over whatever was written while it was computed.
            if index not in self._no_meta:
                self._no_meta.add(index)
                logger.warning("memcached server %s gives no CAS values (run with -C?): EARLY_REFRESH "
                               "is off for it", client.servers[index])
            return value
        read_at = time.monotonic()
        # This caller won the refresh: the others keep reading ``value``. It
        # also takes the lock, so that if the value expires before the fresh
        # one is set (a slow computation, a late clock), callers who miss wait
        # for this computation instead of starting another.
        claim = _Claim(index, self._lock_key(key))
        try:
            try:
                self._take(claim)
            except DjmemcacheError as exc:
                logger.debug("early refresh of key %r without the lock: %s", key, exc)
            fresh = default()
        except Exception:
            logger.warning("early refresh of key %r failed; the current value stays until it expires",
                           key, exc_info=True)
            return value
        else:
            return self._store_refresh(index, key, fresh, expire, cas, ttl, read_at)
        finally:
            self._release(claim)

    def _store_refresh(self, index, key, fresh, expire, cas, ttl, read_at):
        """Store a refresh only in place of the value it refreshes: it may
        have been computed from older data than a write or a delete made
        meanwhile, and those win (as Django's ``add`` never overwrites).
        Returns what the caller gets: ``fresh``, or the write that won."""
        client = self.client
        try:
            reason = client.cas(index, key, fresh, expire, cas)
            if reason == "NOT_FOUND" and time.monotonic() - read_at >= ttl - 1:
                # Gone, but maybe only expired (memcached's clock ticks in whole
                # seconds): then store it as a miss would, with add.
                reason = None if client.add(key, fresh, expire) else reason
        except DjmemcacheError as exc:
            return client._failed(exc, "get_or_set", fresh)
        if reason != "EXISTS":
            return fresh
        stored = client.get(key)
        return fresh if stored is MISS else stored

    def _lacks_meta(self, index, exc):
        if index in self._meta_ok or not isinstance(exc, ServerError):
            return False
        cause = exc.__cause__
        return isinstance(cause, ConnectionClosed) or (isinstance(cause, ErrorReply) and str(cause) == "ERROR")

    def _learn_no_meta(self, index, key, exc):
        """``mg`` was refused: if a plain ``get`` on the same server works,
        the server does not speak meta commands (remember that); if it fails
        too, the server failed, and that is handled like any failure."""
        client = self.client
        try:
            raw = client.call(index, "get", Connection.get, key, retry=True)
        except DjmemcacheError as failure:
            return client._failed(failure, "get_or_set", MISS)
        if index not in self._no_meta:
            self._no_meta.add(index)
            logger.warning("memcached server %s does not speak meta commands (%s): EARLY_REFRESH "
                           "is off for it", client.servers[index], exc)
        return MISS if raw is None else client._decode(key, raw)

    # -- one computation for a missing key ---------------------------------------

    def _coalesce(self, key, default, expire):
        """One thread per process and key runs the protocol; the others wait for its result.

        Whatever is raised wherever (a signal handler's exception, between any
        two bytecodes), the leader's ``finally`` takes its flight off the books.
        Should even that be interrupted, a flight whose leader is the calling
        thread (it is here, so not computing) or a dead thread is replaced at
        once, and any other waits at most STAMPEDE_WAIT, once: the first
        waiter to give up on it drops it.

        A leader that raised hands over to one waiter, which computes again
        (the failure may have been passing); should that raise too, the
        threads that waited for both raise its exception (a copy each), as
        the callers of a ``concurrent.futures.Future`` do: a computation
        that keeps failing (a database that is down) costs them two
        computations, not STAMPEDE_WAIT of turns, one after another, and
        then all at once. Only threads that share this Guard wait here: with
        USE_POOLING off each thread has its own and polls the lock, as other
        processes do, taking its turn.
        """
        deadline = time.monotonic() + self.wait
        failed = 0  # flights seen to raise
        while True:
            mine = _Flight()
            flight = None
            try:
                with self._flights_lock:
                    flight = self._flights.get(key)
                    if flight is None or flight.orphaned():
                        orphan, flight = flight, mine
                        self._flights[key] = mine
                        if orphan is not None:
                            orphan.done.set()  # its waiters: to this flight
                if flight is mine:
                    try:
                        mine.value = self._compute_once(key, default, expire, deadline)
                    except Exception as exc:
                        mine.error = exc
                        raise
                    mine.ok = True
                    return mine.value
            finally:
                self._forget(key, mine)
                mine.done.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not flight.done.wait(remaining):
                self._forget(key, flight)
                return self._as_django(key, default, expire)
            if flight.ok:
                # A copy of its own, as Django's get_or_set gives every caller:
                # one thread mutating the value must not change another's.
                value = self.client.get(key)
                if value is not MISS:
                    return value
                value = _copy_of(flight.value)  # not stored (too large, a failure)
                return self._as_django(key, default, expire) if value is MISS else value
            # The leader raised (or left): its lock is gone, and this thread may take it.
            if flight.error is not None:
                failed += 1
                if failed == 2:
                    # A copy for each waiter: the original, re-raised as it is,
                    # would gather every waiter's frames (and their locals) in
                    # one traceback.
                    raise _copy_of_error(flight.error)

    def _forget(self, key, flight):
        """Take ``flight`` off the books, unless another has replaced it."""
        with self._flights_lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _compute_once(self, key, default, expire, deadline):
        client = self.client
        claim = None
        try:
            try:
                claim = _Claim(client.index_for(key), self._lock_key(key))
                value = self._lock_or_value(key, claim, deadline)
            except DjmemcacheError as exc:
                client._failed(exc, "get_or_set", None)  # raises unless IGNORE_EXC
                value = MISS
            if value is not MISS:
                return value
            return self._compute_and_add(key, default, expire, claim)
        finally:
            if claim is not None:
                self._release(claim)

    def _lock_or_value(self, key, claim, deadline):
        """Take the lock (MISS: compute now), or poll until the value is
        there (the value), or until computing here is the thing to do (MISS):
        the lock is gone and taken, STAMPEDE_WAIT is over, or the winner left
        word that its value cannot be stored."""
        client = self.client
        index, lock = claim.index, claim.lock
        pause = FIRST_POLL
        while True:
            raw = self._take(claim, key)
            if raw is not None:
                value = client._decode(key, raw)
                if value is not MISS:
                    return value  # stored meanwhile (a lock taken is released)
            if claim.held:
                return MISS
            remaining = deadline - time.monotonic()
            while remaining > 0:
                time.sleep(min(pause, remaining))
                pause = min(pause * 1.5, MAX_POLL)
                found = client.call(index, "get_or_set", Connection.get_many, [key, lock], retry=True)
                if key in found:
                    value = client._decode(key, found[key])
                    if value is not MISS:
                        return value
                token = found.get(lock, (None,))[0]
                if token is None:
                    break  # the winner raised or died: take over
                if token == UNSTORABLE:
                    return MISS  # nothing to wait for: compute, as Django does
                if self._abandoned(token):
                    client.call(index, "get_or_set", Connection.delete, lock, retry=True)
                    break
                remaining = deadline - time.monotonic()
            else:
                logger.info("get_or_set of key %r: no value after STAMPEDE_WAIT (%ss), "
                            "computing it here", key, self.wait)
                return MISS

    def _take(self, claim, key=None):
        """Try to take ``claim``'s lock (``claim.held``: True when this caller
        holds it). With ``key``: read it in the same round trip, and return
        its raw item or None. A caller whose first get missed may come here
        after the winner has stored the value and released the lock: without
        this look, it would take the lock and compute the value again."""
        # Unique, so that an add cut short (by a signal) can tell its own lock.
        if claim.token is not None:  # an earlier try's, not held: off the books
            _takers.pop(claim.token, None)
        claim.token = _token_prefix + b"%d" % next(_token_numbers)  # pid first, for whoever looks
        claim.at = time.monotonic()
        _takers[claim.token] = threading.current_thread()
        claim.held = None  # from here on, it may be stored and the answer not known
        try:
            if key is None:
                reason, raw = self.client.call(claim.index, "get_or_set", Connection.store_one, b"add",
                                               claim.lock, (claim.token, 0), self.lock_ttl), None
            else:
                reason, raw = self.client.call(claim.index, "get_or_set", Connection.add_then_get,
                                               claim.lock, (claim.token, 0), self.lock_ttl, key)
        except DjmemcacheError:
            claim.held = False  # the server failed: not asked again; a lock it stored expires
            raise
        claim.held = reason is None
        return raw

    def _release(self, claim):
        """Delete the claim's lock, only while it is surely still ours: after
        its lifetime another caller may hold it. An add whose answer was never
        read (an exception from a signal handler) may have stored it: the lock
        is read first and deleted only if it carries this claim's token."""
        client = self.client
        try:
            if claim.held is False or time.monotonic() - claim.at >= self.lock_ttl - 1:
                return
            if claim.held is None:
                found = client.call(claim.index, "get_or_set", Connection.get, claim.lock, retry=True)
                if found is None or found[0] != claim.token:
                    return
            if claim.unstorable and claim.held:
                # Word for the others, for the lock's lifetime: don't wait.
                client.call(claim.index, "get_or_set", Connection.store_one, b"set", claim.lock,
                            (UNSTORABLE, 0), self.lock_ttl, retry=True)
            else:
                client.call(claim.index, "get_or_set", Connection.delete, claim.lock, retry=True)
        except DjmemcacheError as exc:
            # The lock expires by itself; the value is what matters.
            logger.debug("get_or_set could not delete lock %r: %s", claim.lock, exc)
        finally:
            _takers.pop(claim.token, None)

    def _abandoned(self, token):
        """True for a lock this process took and no longer holds, because
        its release was cut short (by a signal): it would hold the key up
        until it expires. Its taker is off the books, or is the calling
        thread (polling, so not computing), or has ended. Another process's
        lock, or one in use here, is not abandoned."""
        if not token.startswith(_token_prefix):
            return False
        taker = _takers.get(token)
        if taker is None:
            return True
        if taker is threading.current_thread() or not taker.is_alive():
            _takers.pop(token, None)
            return True
        return False

    def _lock_key(self, key):
        """The lock of ``key``: beside it, and within memcached's 250 bytes
        with KEY_PREFIX. A key too long for the suffix gets a hash, cut to
        the room KEY_PREFIX leaves (at least 10 hex digits: options.py keeps
        KEY_PREFIX under 240 bytes); a longer lock would make memcached
        refuse the command line and run the lock's data block as a command."""
        lock = key + LOCK_SUFFIX
        if len(lock.encode("utf-8")) <= self.max_key_bytes:
            return lock
        return self._hashed_lock + hashlib.sha256(key.encode("utf-8")).hexdigest()[:self._hash_digits]

    # -- Django's behaviour -------------------------------------------------------

    def _as_django(self, key, default, expire):
        value = self.client.get(key)
        return self._compute_and_add(key, default, expire) if value is MISS else value

    def _compute_and_add(self, key, default, expire, claim=None):
        """Compute, ``add``, and return what the cache holds then, as Django does:
        another caller may have added a value between the get and the add.

        Unlike Django, an unreadable item (another client's flags, a rotated
        SIGNING_KEY) is replaced with ``set``: ``add`` never would, and every
        call would compute again, one process after another behind the lock.
        A value memcached would not keep (too large, out of memory) is
        noted on ``claim``; a server that failed is not such word: the
        others would compute at once for the lock's whole lifetime, long
        after the server is back.
        """
        value = default()
        client = self.client
        refused = client.store_why(b"add", key, value, expire)
        if refused is None:
            stored = client.get(key)
            return value if stored is MISS else stored
        stored = client.get_or_unreadable(key)
        if stored is UNREADABLE:
            refused = client.store_why(b"set", key, value, expire)
            if refused is None:
                return value
            client.delete(key)  # as Django's set: nothing stale after a failed set
            stored = MISS
        if stored is MISS and claim is not None and (refused == "too large" or refused.startswith("SERVER_ERROR")):
            claim.unstorable = True
        return value if stored is MISS else stored
