"""LOCATION and OPTIONS, parsed and validated once, into a frozen ``Options``.

Every check lives here, so a typo fails when the cache is first built,
naming the option, instead of at the first cache hit. ``Options`` is
hashable: the process-wide pool registry is keyed on the whole of it.
"""

import difflib
import math
import os
import re
import ssl
from dataclasses import dataclass, field, fields

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from djmemcache.servers import parse_server

MAX_KEY_LENGTH = 250  # memcached's limit, in bytes, prefix included
DEFAULT_LOCATION = "127.0.0.1:11211"
DISTRIBUTIONS = ("consistent", "random")
DEFAULT_MAX_VALUE_SIZE = 1024 * 1024
MAX_STAMPEDE_WAIT = 3600
MIN_SECONDS = 0.001  # the shortest TIMEOUT-like wait: a millisecond (poll's unit)
MAX_SECONDS = 86400.0  # the longest: a day


@dataclass(frozen=True)
class Options:
    """The normalised configuration of one cache; field names are the
    lower-cased option names."""

    servers: tuple
    max_pool_size: int = 2**31
    key_prefix: bytes = b""
    timeout: float = None  # socket timeout (djmemcache 0.13's meaning), not the expiry
    connect_timeout: float = None  # defaults to ``timeout``
    ignore_exc: bool = True
    use_pooling: bool = True
    blacklist_time: float = 60.0
    pool_timeout: float = 1.0
    distribution: str = "consistent"
    no_delay: bool = True
    pool_idle_timeout: float = 0.0
    allow_unicode_keys: bool = True
    serializer: object = "pickle"  # "pickle", "json", or a pymemcache-style serde
    compress_min_length: int = 0  # 0: never compress
    compressor: str = "zlib"
    sign_values: bool = False
    signing_key: object = None  # str/bytes; default SECRET_KEY (+ SECRET_KEY_FALLBACKS)
    tls: bool = False
    tls_ca_file: str = None
    tls_cert_file: str = None
    tls_key_file: str = None
    tls_check_hostname: bool = True
    tls_context: object = None  # an ssl.SSLContext; implies TLS
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE  # bytes; memcached's default item size limit (-I 1m)
    # get_or_set: one caller computes a missing value (djmemcache/stampede.py)
    stampede_protection: bool = True
    stampede_wait: float = 5.0  # seconds the others wait for it; also the lock's lifetime
    early_refresh: int = 0  # seconds before expiry one caller recomputes (0: off; memcached 1.6)
    # Not a user option: lets tests drive blacklist expiry without sleeping.
    clock: object = field(default=None, compare=True)

    @property
    def effective_connect_timeout(self):
        return self.timeout if self.connect_timeout is None else self.connect_timeout


#: pymemcache HashClient arguments that djmemcache 0.13 passed through, mapped
#: to the option that now means the same thing.
ALIASES = {
    "dead_timeout": "blacklist_time",
    "serde": "serializer",
}

#: pymemcache arguments 0.13 accepted that no longer mean anything here.
REJECTED = {
    "retry_attempts": "djmemcache blacklists a server on its first timeout or refused "
                      "connection; tune BLACKLIST_TIME instead",
    "retry_timeout": "djmemcache blacklists a server on its first timeout or refused "
                     "connection; tune BLACKLIST_TIME instead",
    "hasher": "placement is fixed to pymemcache's rendezvous hashing (DISTRIBUTION='consistent') "
              "or DISTRIBUTION='random'",
    "socket_keepalive": "memcached connections are kept warm by use; TCP keepalive is not configurable",
    "socket_module": "djmemcache uses the standard socket module",
    "lock_generator": "djmemcache's pool uses threading locks",
    "encoding": "keys are always UTF-8 on the wire",
    "deserializer": "give SERIALIZER a serde object with serialize() and deserialize()",
    "max_entries": "memcached evicts entries by itself",
    "cull_frequency": "memcached evicts entries by itself",
}

_OPTION_NAMES = tuple(f.name for f in fields(Options) if f.name not in ("servers", "clock"))
_BAD_KEY_CHARS = re.compile(rb"[\x00-\x20\x7f]")


def accepted_names():
    return ", ".join(name.upper() for name in _OPTION_NAMES)


def _bad(name, value, expected):
    return ImproperlyConfigured(
        "djmemcache: OPTIONS[%r] = %r is invalid: expected %s." % (name.upper(), value, expected)
    )


def _seconds(name, value, minimum=0.0, maximum=MAX_SECONDS, allow_none=False):
    """A number of seconds from ``minimum`` to ``maximum``.

    Bounded both ways because these reach ``poll``: past about 2.1e6 s its
    milliseconds overflow (a raw OverflowError on every call), and it counts
    nothing shorter than a millisecond. A day is longer than anyone waits on
    memcached.
    """
    if value is None and allow_none:
        return None
    # An int is finite (and math.isfinite would overflow on one past a float's range).
    ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    if not ok or not minimum <= value <= maximum:
        expected = "a number of seconds from %g to %g" % (minimum, maximum)
        raise _bad(name, value, expected + (" or None" if allow_none else ""))
    return float(value)


def _flag(name, value):
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise _bad(name, value, "True or False")


def _key_prefix(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise _bad("key_prefix", value, "bytes or str")
    if _BAD_KEY_CHARS.search(value):
        raise _bad("key_prefix", value, "no spaces or control characters (memcached cannot hold them)")
    if len(value) >= MAX_KEY_LENGTH - 10:
        raise _bad("key_prefix", value, "fewer than %d bytes, leaving room for keys" % (MAX_KEY_LENGTH - 10))
    return value


def parse_location(location):
    """Split LOCATION as Django does (a list, or a string split on ``;`` or ``,``)."""
    if location is None or location == "" or location == []:
        specs = [DEFAULT_LOCATION]
    elif isinstance(location, str):
        specs = [s for s in re.split("[;,]", location) if s.strip()] or [DEFAULT_LOCATION]
    elif isinstance(location, (list, tuple)):
        specs = list(location) or [DEFAULT_LOCATION]
    else:
        raise ImproperlyConfigured(
            "djmemcache: LOCATION must be a string or a list of strings, not %r" % (location,)
        )
    servers = []
    for spec in specs:
        try:
            server = parse_server(spec)
        except ValueError as exc:
            raise ImproperlyConfigured("djmemcache: LOCATION entry %r: %s" % (spec, exc)) from None
        if any(s.node == server.node for s in servers):
            raise ImproperlyConfigured("djmemcache: LOCATION lists %r twice" % (spec,))
        servers.append(server)
    return tuple(servers)


def parse_options(location, options=None, clock=None):
    """Validate LOCATION and OPTIONS; return ``Options`` or raise
    ``ImproperlyConfigured`` naming the option."""
    values = {}
    for raw_name, value in (options or {}).items():
        if not isinstance(raw_name, str):
            raise ImproperlyConfigured("djmemcache: option names must be strings, got %r" % (raw_name,))
        name = raw_name.lower()
        name = ALIASES.get(name, name)
        if name == "default_noreply":
            # Django's PyMemcacheCache passes False; djmemcache always waits for replies.
            if value is False:
                continue
            raise ImproperlyConfigured(
                "djmemcache: OPTIONS[%r] = %r is not supported: djmemcache always waits for "
                "replies so that failures are seen." % (raw_name, value)
            )
        if name in REJECTED:
            raise ImproperlyConfigured(
                "djmemcache: OPTIONS[%r] is not supported: %s." % (raw_name, REJECTED[name])
            )
        if name not in _OPTION_NAMES:
            close = difflib.get_close_matches(name, _OPTION_NAMES, n=1)
            hint = " Did you mean %r?" % close[0].upper() if close else ""
            raise ImproperlyConfigured(
                "djmemcache: unknown option %r.%s Accepted options: %s."
                % (raw_name, hint, accepted_names())
            )
        if name in values:
            raise ImproperlyConfigured("djmemcache: option %r is given twice" % (raw_name,))
        values[name] = value

    parsed = {}
    for name, value in values.items():
        if name == "max_pool_size":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31:
                raise _bad(name, value, "a whole number from 1 to 2**31")
        elif name == "key_prefix":
            value = _key_prefix(value)
        elif name in ("timeout", "connect_timeout"):
            value = _seconds(name, value, MIN_SECONDS, allow_none=True)
        elif name == "pool_timeout":  # 0: never wait for a free connection
            value = _seconds(name, value, allow_none=True)
        elif name in ("blacklist_time", "pool_idle_timeout"):  # 0: off
            value = _seconds(name, value)
        elif name == "serializer":
            value = _serializer(value)
        elif name == "max_value_size":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31 - 2:
                raise _bad(name, value, "a whole number of bytes from 1 to 2**31 - 3 "
                                        "(memcached's item size limit, its -I option)")
        elif name == "stampede_wait":
            # At most an hour: it is also the lifetime of the lock.
            value = _seconds(name, value, MIN_SECONDS, MAX_STAMPEDE_WAIT)
        elif name == "early_refresh":
            if isinstance(value, bool) or not isinstance(value, int) or value == 1 or not 0 <= value < 2**31:
                raise _bad(name, value, "0 (off) or a whole number of seconds >= 2 (memcached counts "
                                        "an item's time to live in whole seconds: with 1 no one would "
                                        "ever win the refresh)")
        elif name == "compress_min_length":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(name, value, "a whole number of bytes >= 0 (0: never compress)")
        elif name == "compressor":
            value = _compressor(value)
        elif name == "signing_key":
            if not isinstance(value, (str, bytes)) or not value:
                raise _bad(name, value, "a non-empty str or bytes secret")
        elif name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if isinstance(value, os.PathLike):  # settings write BASE_DIR / "ca.pem"
                value = os.fspath(value)
            if not isinstance(value, str) or not os.path.isfile(value):
                raise _bad(name, value, "the path of a readable PEM file")
        elif name == "tls_context":
            if not isinstance(value, ssl.SSLContext):
                raise _bad(name, value, "an ssl.SSLContext")
        elif name == "distribution":
            if not isinstance(value, str) or value.lower() not in DISTRIBUTIONS:
                raise _bad(name, value, " or ".join(repr(d) for d in DISTRIBUTIONS))
            value = value.lower()
        else:
            value = _flag(name, value)
        parsed[name] = value
    if parsed.get("early_refresh") and parsed.get("stampede_protection") is False:
        raise _bad("early_refresh", parsed["early_refresh"], "0 when STAMPEDE_PROTECTION is False "
                                                             "(get_or_set refreshes early only with it)")
    if parsed.get("tls_key_file") and not parsed.get("tls_cert_file"):
        raise _bad("tls_key_file", parsed["tls_key_file"], "to go with TLS_CERT_FILE")
    if any(parsed.get(n) for n in ("tls_ca_file", "tls_cert_file", "tls_context")):
        parsed["tls"] = True
    servers = parse_location(location)
    if parsed.get("tls") and any(s.is_unix for s in servers):
        raise ImproperlyConfigured("djmemcache: TLS is for TCP servers, not unix sockets")
    return Options(servers=servers, clock=clock, **parsed)


def _serializer(value):
    if isinstance(value, str):
        if value.lower() in ("pickle", "json"):
            return value.lower()
        try:
            value = import_string(value)
        except ImportError as exc:
            raise _bad("serializer", value, "'pickle', 'json' or the dotted path of a serde (%s)" % exc)
        if isinstance(value, type):
            value = value()
    if not (hasattr(value, "serialize") and hasattr(value, "deserialize")):
        raise _bad("serializer", value, "'pickle', 'json', or a serde with serialize() and deserialize()")
    return value


def _compressor(value):
    if value not in ("zlib", "zstd"):
        raise _bad("compressor", value, "'zlib' or 'zstd'")
    if value == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise _bad("compressor", value, "zstandard installed (pip install djmemcache[zstd])") from None
    return value
