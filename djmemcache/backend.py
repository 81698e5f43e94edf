"""The Django cache backend: Django's semantics, nothing about sockets.

Each method makes and validates the key, calls the process-wide ``Client``
and shapes the result the way Django's own memcached backends do. Timeouts
come from Django's ``BaseMemcachedCache.get_backend_timeout`` (None: never
expire, 0: expire now, more than 30 days: absolute time).
"""

import math
import re
import threading
from decimal import Decimal
from functools import partial

import pymemcache
from asgiref.sync import sync_to_async
from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    BaseCache,
    InvalidCacheKey,
    default_key_func,
    memcache_key_warnings,
)
from django.core.cache.backends.memcached import BaseMemcachedCache
from django.core.exceptions import ImproperlyConfigured

from djmemcache import stampede
from djmemcache.client import EXPTIME_MAX, MISS, Client, client_for
from djmemcache.connection import _load_speedups
from djmemcache.options import MAX_KEY_LENGTH, parse_options

_prefixed = getattr(_load_speedups(), "prefixed", None)

_BAD_KEY_CHAR = re.compile(r"[\x00-\x20\x7f]")

# Timeouts that can be inf or nan, which Django's int() would meet as an
# OverflowError or a ValueError of its own: refused by name instead.
_INEXACT = (float, Decimal)


def _finite(timeout):
    return math.isfinite(timeout) if isinstance(timeout, float) else timeout.is_finite()

_parsed = {}
_parsed_lock = threading.Lock()


def _options_for(server, params):
    """Parse once per distinct settings: Django builds a backend per thread
    and per async context, and each must find the same configuration."""
    raw = params.get("OPTIONS") or {}
    try:
        cache_key = repr((server, sorted(raw.items(), key=lambda item: str(item[0]))))
    except Exception:  # unsortable or unrepresentable options: just parse
        return parse_options(server, raw)
    options = _parsed.get(cache_key)
    if options is None:
        options = parse_options(server, raw)
        with _parsed_lock:
            _parsed[cache_key] = options
    return options


def _utf8(key):
    """``key`` in UTF-8, as it goes on the wire; ``InvalidCacheKey`` when it
    has none (a lone surrogate such as ``"\\ud800"``), before anything is sent."""
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCacheKey("Cache key is not valid Unicode (it has a lone surrogate) "
                              "and cannot be sent to memcached: %r" % key) from None


class _Misconfigured:
    """Stands in for the options of a backend built with bad settings.

    Django's own cache checks build every cache (``caches[alias]``) before
    djmemcache's run, so raising in ``__init__`` would turn ``manage.py
    check`` into a traceback instead of the ``djmemcache.E001`` message.
    As with Django's ``RedisCache``, whose client is built on first use, the
    backend is built and the error waits: reading any option raises the
    ``ImproperlyConfigured`` again, parsed afresh, before anything is sent.
    """

    def __init__(self, server, params):
        self._settings = (server, params)

    def __getattr__(self, name):
        _options_for(*self._settings)
        raise AssertionError("settings that failed to parse have parsed")  # pragma: no cover


def _async(name):
    """An ``a*`` method that runs the sync one in a worker thread.

    Django's defaults use ``sync_to_async(thread_sensitive=True)``, which
    funnels every cache call of the process through ONE thread. The pool is
    thread-safe, so here concurrent awaits run concurrently, in the event
    loop's default executor (``thread_sensitive=False``). Still through
    ``sync_to_async``: it runs the call in the caller's context variables
    and asgiref's ``Local`` objects (a ``KEY_FUNCTION`` may read a tenant there, a
    ``get_or_set`` default the active language), where a plain
    ``run_in_executor`` costing about 30 µs less per call ran them in none,
    and a copied context alone shows a worker thread no ``Local`` data.
    """

    async def method(self, *args, **kwargs):
        return await sync_to_async(partial(getattr(self, name), *args, **kwargs), thread_sensitive=False)()

    method.__name__ = method.__qualname__ = "a" + name
    method.__doc__ = "Async version of ``%s``, run concurrently in a worker thread." % name
    return method


class PyMemcacheCache(BaseMemcachedCache):
    """memcached through one process-wide connection pool per configuration."""

    def __init__(self, server, params):
        super().__init__(server, params, library=pymemcache, value_not_found_exception=KeyError)
        self._plain_make_key = type(self).make_key is BaseCache.make_key
        # get_many makes a batch of keys at once unless a subclass makes them its own way.
        self._plain_batch = (self._plain_make_key and type(self).make_and_validate_key
                             is PyMemcacheCache.make_and_validate_key)
        self._client = None
        self._guard = None  # get_or_set's, found once per backend instance
        try:
            self.config = _options_for(server, params)
        except ImproperlyConfigured:
            self.config = _Misconfigured(server, params)
            self._max_key_bytes = -1  # every key goes to validate_key, which reads an option
            return
        self._max_key_bytes = MAX_KEY_LENGTH - len(self.config.key_prefix)
        if self.config.use_pooling:
            self._client = client_for(self.config)

    @property
    def client(self):
        """The ``Client`` this backend talks through (shared unless USE_POOLING is off)."""
        if self._client is None:
            self._client = Client(self.config)
        return self._client

    # Django's BaseMemcachedCache builds a pymemcache client here; ours is shared.
    _cache = client

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """Django's expiry mapping, clamped to what memcached accepts.

        Django adds the current time to timeouts over 30 days; a huge one
        (``sys.maxsize``) then overflows memcached's 32-bit exptime, and
        memcached would run the value as a command. So: past the largest
        exptime means the largest (an absolute time in January 2038), below
        the smallest means "expire now"; inf and nan are refused.
        """
        if isinstance(timeout, _INEXACT) and not _finite(timeout):
            raise ValueError("cache timeout must be a finite number of seconds or None, not %r" % timeout)
        expire = super().get_backend_timeout(timeout)
        if expire > EXPTIME_MAX:
            return EXPTIME_MAX
        if expire < 0:
            return -1
        return expire

    @property
    def client_servers(self):
        return [server.spec for server in self.config.servers]

    def validate_key(self, key):
        """Raise ``InvalidCacheKey`` for keys memcached cannot hold, before
        anything is sent: control characters and spaces would be read as
        protocol (command injection), and the limit is 250 bytes on the wire,
        OPTIONS ``KEY_PREFIX`` included (``ImproperlyConfigured`` first if the
        settings are bad)."""
        allow_unicode_keys = self.config.allow_unicode_keys
        if _BAD_KEY_CHAR.search(key) is None and (
            len(key) <= self._max_key_bytes
            if key.isascii()
            else allow_unicode_keys and len(_utf8(key)) <= self._max_key_bytes
        ):
            return
        for warning in memcache_key_warnings(key):
            raise InvalidCacheKey(warning)
        if not key.isascii() and not allow_unicode_keys:
            raise InvalidCacheKey("Cache key contains non-ASCII characters and ALLOW_UNICODE_KEYS "
                                  "is False: %r" % key)
        raise InvalidCacheKey(
            "Cache key will cause errors if used with memcached: %r (longer than %s "
            "bytes once UTF-8 encoded with the KEY_PREFIX option)" % (key, self._max_key_bytes)
        )

    def make_and_validate_key(self, key, version=None):
        # Django's make_key and validate_key, in one call for the hot path
        # (unless a subclass customises make_key); Django's default_key_func
        # inlined.
        if self._plain_make_key:
            key_func = self.key_func
            if key_func is default_key_func:
                key = "%s:%s:%s" % (self.key_prefix, self.version if version is None else version, key)
            else:
                key = key_func(key, self.key_prefix, self.version if version is None else version)
        else:
            key = self.make_key(key, version=version)
        if _BAD_KEY_CHAR.search(key) is None and key.isascii() and len(key) <= self._max_key_bytes:
            return key
        self.validate_key(key)
        return key

    def _made_keys(self, keys, version):
        """``{made key: key}`` for a batch: ``make_and_validate_key`` of each
        key, with the keys of the batch checked in one pass, not one each."""
        if not self._plain_batch:
            return {self.make_and_validate_key(key, version=version): key for key in keys}
        if self.key_func is default_key_func:
            head = "%s:%s:" % (self.key_prefix, self.version if version is None else version)
            # Django formats with %s: the same as + for an exact str, not for a
            # subclass with its own __str__ (an Enum's member), nor an int.
            if _prefixed is not None:
                key_map = _prefixed(head, keys)  # the same, in C
            else:
                key_map = {head + key if type(key) is str else "%s%s" % (head, key): key for key in keys}
        else:
            key_func, prefix = self.key_func, self.key_prefix
            version = self.version if version is None else version
            key_map = {key_func(key, prefix, version): key for key in keys}
        if not key_map:
            return key_map
        joined = "".join(key_map)
        if (_BAD_KEY_CHAR.search(joined) is None and joined.isascii()
                and max(map(len, key_map)) <= self._max_key_bytes):
            return key_map
        for key in key_map:
            self.validate_key(key)  # raises for the first bad key
        return key_map

    def get(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        value = self.client.get(key)
        return default if value is MISS else value

    def get_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None):
        """Django's ``get_or_set``, but a missing value is computed by one
        caller in every process and thread while the others wait for it
        (STAMPEDE_PROTECTION), and EARLY_REFRESH recomputes a hot value
        before it expires: see ``djmemcache.stampede``. A default that is
        not callable has nothing to protect."""
        if not self.config.stampede_protection or not callable(default):
            return super().get_or_set(key, default, timeout=timeout, version=version)
        if isinstance(timeout, _INEXACT) and not _finite(timeout):
            self.get_backend_timeout(timeout)  # raises, before anything is sent
        key = self.make_and_validate_key(key, version=version)
        guard = self._guard
        if guard is None:
            guard = self._guard = stampede.guard_for(self.client)
        return guard.get_or_set(key, default, timeout, self.get_backend_timeout)

    def get_many(self, keys, version=None):
        key_map = self._made_keys(keys, version)
        return self.client.get_many(list(key_map), key_map)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        if not self.client.set(key, value, self.get_backend_timeout(timeout)):
            # Make sure the key doesn't keep its old value in case of failure
            # to set (memcached's 1MB limit).
            self.client.delete(key)

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.client.add(key, value, self.get_backend_timeout(timeout))

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        safe_data = {}
        original_keys = {}
        for key, value in data.items():
            safe_key = self.make_and_validate_key(key, version=version)
            safe_data[safe_key] = value
            original_keys[safe_key] = key
        failed = self.client.set_many(safe_data, self.get_backend_timeout(timeout))
        return [original_keys[k] for k in failed]

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.client.touch(key, self.get_backend_timeout(timeout))

    def delete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.client.delete(key)

    def delete_many(self, keys, version=None):
        keys = [self.make_and_validate_key(key, version=version) for key in keys]
        if keys:
            self.client.delete_many(keys)

    def incr(self, key, delta=1, version=None):
        key = self.make_and_validate_key(key, version=version)
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError("incr/decr delta must be an integer, not %r" % (delta,))
        # memcached has no negative delta: incr(-n) is decr(n), as in Django.
        value = self.client.incr(key, delta)
        if value is None:
            raise ValueError("Key '%s' not found" % key)
        return value

    def clear(self):
        self.client.flush_all()

    def close(self, **kwargs):
        # Django calls this after every request. Pooled connections outlive
        # requests by design; without pooling, behave like Django's backend.
        if self._client is not None and not self.config.use_pooling:
            self._client.close()

    def stats(self):
        """Per-server state and pool counts, for monitoring."""
        return self.client.status()

    aget = _async("get")
    aget_many = _async("get_many")
    aget_or_set = _async("get_or_set")
    aset = _async("set")
    aadd = _async("add")
    aset_many = _async("set_many")
    atouch = _async("touch")
    adelete = _async("delete")
    adelete_many = _async("delete_many")
    aincr = _async("incr")
    adecr = _async("decr")
    ahas_key = _async("has_key")
    aclear = _async("clear")
