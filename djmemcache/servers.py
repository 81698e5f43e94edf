"""Server specs, which server a key goes to, and the blacklist of failed servers."""

import logging
import os
import re
import threading
import time
from dataclasses import dataclass

from pymemcache.client.base import normalize_server_spec
from pymemcache.client.murmur3 import murmur3_32

from djmemcache.connection import _load_speedups

try:  # C murmur3: identical results, about 30x faster than pymemcache's.
    from mmh3 import hash as _mmh3_hash
except ImportError:  # pragma: no cover - mmh3 is a dependency; keep working without it
    _mmh3_hash = None

_speedups = _load_speedups()

logger = logging.getLogger("djmemcache.servers")

DEFAULT_PORT = 11211
_HOST = re.compile(r"[A-Za-z0-9_.-]+\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Server:
    """One memcached server of LOCATION.

    ``spec`` is how the user wrote it (stripped), ``address`` what a socket
    connects to (``(host, port)`` or a unix socket path), and ``node`` the
    name pymemcache's HashClient hashes, so that placement matches Django's
    own ``PyMemcacheCache`` exactly.
    """

    spec: str
    address: object
    node: str

    @property
    def is_unix(self):
        return isinstance(self.address, str)

    def __str__(self):
        return self.spec


def parse_server(spec):
    """Parse one LOCATION entry; raise ValueError saying what is wrong.

    >>> parse_server("10.0.0.1:11211").address
    ('10.0.0.1', 11211)
    >>> parse_server("cache.local").address
    ('cache.local', 11211)
    >>> parse_server("[::1]:11311").address, parse_server("[::1]:11311").node
    (('::1', 11311), '::1:11311')
    >>> parse_server("unix:/run/mc.sock").address
    '/run/mc.sock'
    >>> parse_server("/run/mc.sock").node
    '/run/mc.sock'
    >>> parse_server("[fe80::1%eth0]:11211").address
    ('fe80::1%eth0', 11211)
    >>> parse_server("h ost:11211")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: host name may only have ASCII letters, digits, '.', '-' and '_' ...: 'h ost:11211'
    >>> parse_server("host:1_1211")  # int() would take it, and full-width digits
    Traceback (most recent call last):
    ValueError: port is not a number (ASCII digits) in 'host:1_1211'
    """
    if not isinstance(spec, str):
        raise ValueError("a server must be a string such as '127.0.0.1:11211', got %r" % (spec,))
    spec = spec.strip()
    if not spec:
        raise ValueError("empty server name")
    if spec.startswith(("unix:", "/")):
        path = spec[5:] if spec.startswith("unix:") else spec
        if not path.startswith("/"):
            raise ValueError("unix socket path must be absolute: %r" % spec)
        if _CONTROL.search(path):
            raise ValueError("control character in unix socket path %r" % spec)
        return Server(spec, path, path)
    if spec.startswith("[") and "]" not in spec:
        raise ValueError("unclosed '[' in IPv6 address %r" % spec)
    if spec.count(":") > 1 and not spec.startswith("["):
        raise ValueError("write IPv6 addresses in brackets, e.g. '[::1]:11211', not %r" % spec)
    # pymemcache's parser below takes whatever int() and the resolver take:
    # "1_1211", full-width digits, "h ost". Only plain forms get through.
    if spec.startswith("["):
        host, _, port = spec[1:].partition("]")
        host_ok = _IPV6.match(host)
        if port and not port.startswith(":"):
            raise ValueError("expected ':port' after ']' in %r" % spec)
        port = port[1:]
    else:
        host, _, port = spec.partition(":")
        host_ok = _HOST.match(host)
    if not host:
        raise ValueError("missing host in %r" % spec)
    if not host_ok:
        raise ValueError("host name may only have ASCII letters, digits, '.', '-' and '_' "
                         "(an international name in its xn-- form): %r" % spec)
    if ":" in spec.rpartition("]")[2] and not _PORT.match(port):
        raise ValueError("port is not a number (ASCII digits) in %r" % spec)
    host, port = normalize_server_spec(spec)
    if not 0 < port < 65536:
        raise ValueError("port out of range in %r" % spec)
    return Server(spec, (host, port), "%s:%s" % (host, port))


#: Keys whose server ``Rendezvous`` remembers (per set of live servers).
PLACEMENT_MEMO = 4096

#: Keys the banned servers of a process may miss (written elsewhere, or
#: dropped), all together, before the blacklist stops naming them and the
#: server that would go past it is flushed on its return instead.
MISSED_MAX = 100_000


class _Flush:
    """The key, in what a banned server missed, that says it must be flushed
    on its return: it missed a ``flush_all``, or writes of too many keys to
    name. The other keys still say which servers took them."""

    def __repr__(self):
        return "FLUSH"


FLUSH = _Flush()


def merge_missed(missed, more):
    """Two of ``Blacklist.missed_by``'s answers as one (``missed`` changed)."""
    for key, written in more.items():
        missed[key] = missed.get(key, 0) | written
    return missed


def _hash_key_bytes(text):
    # pymemcache's murmur3 hashes ord(char) & 0xFF of each character; for
    # non-ASCII keys build the same bytes so placement stays identical.
    if text.isascii():
        return text.encode("ascii")
    return bytes(ord(c) & 0xFF for c in text)


class Rendezvous:
    """pymemcache's RendezvousHash placement, computed faster.

    Same scores (murmur3_32, seed 0, of ``"{node}-{key}"``) and the same
    tie-break, so every key lands where Django's ``PyMemcacheCache`` puts it.
    Faster because it skips hashing altogether when only one server is
    live, and places keys in C: ``djmemcache._speedups`` (a key or a whole
    batch per call) where it is built, else mmh3's murmur3 with a memo.
    """

    def __init__(self, nodes, use_c=True, native=None):
        self.nodes = list(nodes)
        self._prefixes = [(node + "-").encode("utf-8") for node in self.nodes]
        self._ascii_prefixes = all(node.isascii() for node in self.nodes)
        self._fast = use_c and _mmh3_hash is not None and self._ascii_prefixes
        # djmemcache._speedups places a key (or a batch) in one C call, no memo
        # needed; with ``native=False`` (tests) or without it, mmh3 as below.
        speedups = _speedups if native is None else (_speedups if native else None)
        self._native = speedups if use_c and self._ascii_prefixes and speedups is not None else None
        # (candidates, {key: index}, hash order): replaced whole, never changed
        # in place, so a thread reads one consistent set (see _placed_for).
        self._placed = ((), {}, ())

    def _placed_for(self, candidates):
        """``(memo, scored)`` for ``candidates``: the keys already placed among
        them, and the candidates in tie-break order with their hash prefixes.

        Why a memo: a site asks for the same hot keys over and over, and each
        placement is one murmur3 per live server (most of a small
        ``get_many``'s per-key cost). It is bounded (``PLACEMENT_MEMO``
        keys, then started afresh) and tied to one set of candidates: when
        the blacklist changes the live servers, it starts afresh too.
        """
        placed = self._placed
        if (placed[0] is not candidates and placed[0] != tuple(candidates)) or len(placed[1]) >= PLACEMENT_MEMO:
            nodes = self.nodes
            order = sorted(candidates, key=lambda i: (nodes[i], -i), reverse=True)
            placed = (tuple(candidates), {}, tuple((self._prefixes[i], i) for i in order))
            self._placed = placed
        return placed[1], placed[2]

    def scored(self, candidates):
        """The ``scored`` tuple ``_speedups`` places keys with, for ``candidates``."""
        placed = self._placed  # the live servers' tuple is the one placed last: no call
        return placed[2] if placed[0] is candidates else self._placed_for(candidates)[1]

    def score(self, index, key):
        if self._fast:
            return _mmh3_hash(self._prefixes[index] + _hash_key_bytes(key), 0, False)
        return murmur3_32("%s-%s" % (self.nodes[index], key))

    def choose(self, key, candidates):
        """Index of the winning server for ``key`` among ``candidates`` (indexes)."""
        if len(candidates) == 1:
            return candidates[0]
        if self._native is not None:
            return self._native.choose(key, self.scored(candidates))
        memo, _scored = self._placed_for(candidates)
        index = memo.get(key)
        if index is None:
            index = memo[key] = self._choose(key, candidates)
        return index

    def prefers(self, key, a, b):
        """Whether ``key`` goes to server ``a`` rather than ``b`` when both are live."""
        return self._choose(key, (a, b)) == a

    def _choose(self, key, candidates):
        if self._fast:
            data = _hash_key_bytes(key)
            prefixes = self._prefixes
            best, best_score = -1, -1
            for index in candidates:
                score = _mmh3_hash(prefixes[index] + data, 0, False)
                if score > best_score:
                    best, best_score = index, score
                elif score == best_score and self.nodes[index] > self.nodes[best]:
                    best = index
            return best
        best, best_score = -1, -1
        for index in candidates:
            score = self.score(index, key)
            if score > best_score or (score == best_score and self.nodes[index] > self.nodes[best]):
                best, best_score = index, score
        return best

    def group(self, keys, candidates):
        """``{index: [keys]}``: ``choose`` for a batch of keys, with the same results.

        A multi-key call places every key: here the per-key work is one
        loop body (encode, one hash per candidate), not three function
        calls. Candidates are tried in the order of the tie-break (node name
        descending, then index), so only a strictly higher score replaces
        the best, and ties go where ``choose`` sends them.
        """
        if len(candidates) == 1:
            return {candidates[0]: list(keys)}
        if self._native is not None:
            return self._native.group(keys, self._placed_for(candidates)[1])
        if not self._fast:
            groups = {}
            for key in keys:
                groups.setdefault(self.choose(key, candidates), []).append(key)
            return groups
        memo, scored = self._placed_for(candidates)
        groups = {}
        hash_ = _mmh3_hash
        for key in keys:
            index = memo.get(key)
            if index is None:
                data = key.encode("ascii") if key.isascii() else _hash_key_bytes(key)
                best_score = -1
                for prefix, candidate in scored:
                    score = hash_(prefix + data, 0, False)
                    if score > best_score:
                        best_score, index = score, candidate
                memo[key] = index
            members = groups.get(index)
            if members is None:
                groups[index] = [key]
            else:
                members.append(key)
        return groups


class Blacklist:
    """Which servers are left out after a timeout or a refused connection.

    A banned server is probed soon (``first_delay``, about a second), and
    while probes keep failing the delay doubles up to ``blacklist_time``
    (mcrouter's back-off), so a blip costs about a second of misses and a
    dead server costs one probe per ``blacklist_time``. Exactly one caller
    claims each probe (``claim_probe``), which either brings the server back
    (``restore``) or schedules the next one (``probe_failed``).

    A banned server misses the writes of its keys, which go to another
    server or, with none live, nowhere; back in service it would serve the
    older values it still holds. So the blacklist remembers those keys
    (``missed``, and where each was written) until the probe that passed
    has deleted them there (``missed_by``; the last round after ``close``,
    while writers of its keys wait, then ``restore``): a miss, never an
    older value. Past ``MISSED_MAX`` keys it is flushed instead.

    A probe only asks ``version``: a server can pass it and still time out
    on every real command. So a restored server keeps its back-off until it
    has stayed in service for ``max(settle_time, its last delay)``: banned
    again before that, its next probe waits twice as long as the last one,
    instead of a second again (which banned such a server every second,
    each time after the calls in flight waited TIMEOUT for it).

    All changes happen under one lock. ``state`` is an immutable
    ``(live, next_probe)`` pair replaced whole, so the hot path reads it
    once, without locking, and never sees half an update.
    """

    def __init__(self, servers, blacklist_time, clock=time.monotonic, first_delay=1.0, settle_time=10.0):
        self.servers = tuple(servers)
        self.blacklist_time = blacklist_time
        self.first_delay = min(first_delay, blacklist_time)
        self.settle_time = settle_time
        self.clock = clock
        self._lock = threading.Lock()
        self._banned = {}  # index -> _Ban
        self._restored = {}  # index -> (when, failures) of servers restored lately
        self.state = (tuple(range(len(self.servers))), None)

    @property
    def live(self):
        return self.state[0]

    @property
    def next_probe(self):
        return self.state[1]

    def ban(self, index, reason):
        """Leave server ``index`` out; True (and a log line) only when it was live.

        A ``blacklist_time`` of 0 turns blacklisting off: every call tries every server.
        """
        if self.blacklist_time <= 0:
            return False
        with self._lock:
            if index in self._banned:
                self._banned[index].reason = reason
                return False
            now = self.clock()
            failures = 0
            restored = self._restored.pop(index, None)
            if restored is not None and now - restored[0] < max(self.settle_time, self._delay(restored[1])):
                failures = restored[1] + 1  # it failed again soon after its probe passed
            delay = self._delay(failures)
            self._banned[index] = _Ban(now + delay, reason, failures)
            self._update()
        logger.warning(
            "memcached server %s blacklisted (%s in %ss): %s", self.servers[index],
            "next probe" if failures else "first probe", delay, reason,
        )
        return True

    def _delay(self, failures):
        """Seconds until the next probe after ``failures`` failures in a row."""
        return min(self.first_delay * 2 ** min(failures, 30), self.blacklist_time)

    def probe_failed(self, index, reason):
        """The probe of ``index`` failed: wait twice as long before the next one."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return
            entry.failures += 1
            entry.reason = reason
            entry.prober = None
            delay = self._delay(entry.failures)
            entry.until = self.clock() + delay
            self._update()
        logger.info("memcached server %s still down, next probe in %.3gs: %s",
                    self.servers[index], delay, reason)

    def missed(self, index, key, written, wait=True):
        """Remember that banned server ``index`` misses a write of ``key``
        (``written``: the index of the server that took it, or None).

        True when remembered; False, remembering nothing, when ``index`` is
        not banned (any more): the caller places the key again. While the
        last round of its repair runs (``close``, for at most its ``wait``),
        unless not ``wait`` here, the ``threading.Event`` that its end sets:
        the caller waits for it, then places the key again, so the round
        ends (what is missed during it anyway is repaired before
        ``restore`` brings the server back)."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return False
            if entry.closing is not None and wait and time.monotonic() < entry.closing_until:
                return entry.closing
            missed = entry.missed
            bit = 0 if written is None else 1 << written
            if key in missed:
                missed[key] |= bit
                return True
            if sum(len(e.missed) for e in self._banned.values()) < MISSED_MAX:
                missed[key] = bit
                return True
            if FLUSH in missed:
                return True  # flushed on its return (a copy the server written took is left)
            missed[FLUSH] = 0
        logger.warning("memcached server %s missed writes of too many keys to name (%d for the "
                       "blacklisted servers) while blacklisted: it will be flushed when it comes back",
                       self.servers[index], MISSED_MAX)
        return True

    def missed_all(self, index):
        """Banned server ``index`` missed a ``flush_all``: flush it on its
        return. False when it is not banned."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is not None:
                entry.missed[FLUSH] = 0
            return entry is not None

    def missed_by(self, index):
        """What banned server ``index`` missed since the last call, taken:
        ``{key: bits of the indexes of the servers written}``, with the key
        ``FLUSH`` when it must be flushed."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return {}
            return _take_missed(entry)

    def close(self, index, missed, wait):
        """Start (or go on with) the last round of ``index``'s repair: from
        now until ``restore`` or ``unrepaired``, but at most ``wait``
        seconds, a write of its keys waits instead of being missed. Returns
        ``missed`` with what it missed since ``missed_by``, to delete in
        that round."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return missed
            if entry.closing is None:
                entry.closing = threading.Event()
            entry.closing_until = time.monotonic() + wait
            entry.repairing = merge_missed(missed, _take_missed(entry))
            return entry.repairing

    def hold(self, index, seconds):
        """Keep the probe of ``index`` claimed ``seconds`` more: a repair can
        outlast the claim, and a second probe must not restore it meanwhile."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is not None:
                entry.until = max(entry.until, self.clock() + seconds)
                self._update()

    def unrepaired(self, index, missed):
        """Give back what a repair took and did not finish (its last round
        ends, the writers waiting for it go on): the next probe deletes it."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return
            entry.missed = merge_missed(missed, entry.missed)
            entry.repairing = {}
            closing, entry.closing = entry.closing, None
        if closing is not None:
            closing.set()

    def restore(self, index):
        """Bring ``index`` back; ``{}``. But if it missed something during
        the last round of its repair (a write whose wait ran out, one that
        failed on it, a ``flush_all``), it stays banned and that is
        returned, taken, to be repaired first."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is not None:
                if entry.missed:
                    return _take_missed(entry)
                del self._banned[index]
                self._restored[index] = (self.clock(), entry.failures)
            self._update()
        if entry is not None:
            if entry.closing is not None:
                entry.closing.set()
            logger.warning("memcached server %s is back in service", self.servers[index])
        return {}

    def claim_probe(self, hold):
        """Indexes of servers due for a probe, claimed by this caller alone.

        A claim moves the server's next probe ``hold`` seconds ahead (longer
        than a probe can take), so nobody claims it meanwhile and a prober
        that never reports (a killed thread, a fork) is replaced then.
        """
        now = self.clock()
        pid = os.getpid()
        claimed = []
        with self._lock:
            for index, entry in self._banned.items():
                if entry.until <= now or (entry.prober is not None and entry.prober != pid):
                    entry.until = now + hold
                    entry.prober = pid
                    claimed.append(index)
            if claimed:
                self._update()
        return claimed

    def report(self, index):
        """``(next_probe_at, reason, keys its return deletes, whether it is
        flushed instead)``, read at once; None when live."""
        with self._lock:
            entry = self._banned.get(index)
            if entry is None:
                return None
            keys = entry.missed.keys() | entry.repairing.keys()
            return entry.until, entry.reason, len(keys) - (FLUSH in keys), FLUSH in keys

    def _update(self):
        live = tuple(i for i in range(len(self.servers)) if i not in self._banned)
        self.state = (live, min((e.until for e in self._banned.values()), default=None))


def _take_missed(entry):
    """What ``entry``'s server missed, taken for a round of its repair (kept
    as ``repairing`` too, for ``Blacklist.report``, until the next round)."""
    missed, entry.missed = entry.missed, {}
    entry.repairing = missed
    return missed


class _Ban:
    __slots__ = ("until", "reason", "failures", "prober", "missed", "repairing", "closing", "closing_until")

    def __init__(self, until, reason, failures=0):
        self.until = until
        self.reason = reason
        self.failures = failures  # failed probes, and failures soon after a passed one
        self.prober = None  # pid of the process whose thread probes it now
        self.missed = {}  # {key: bits of the indexes written} of writes it missed (and FLUSH)
        self.repairing = {}  # what the round of its repair under way deletes
        self.closing = None  # an Event while the last round of its repair runs
        self.closing_until = 0.0  # time.monotonic() after which writers no longer wait for it
