"""The errors djmemcache raises itself; each docstring names the likely cause.

Caller mistakes keep Django's types (``InvalidCacheKey``, ``ValueError`` for
``incr`` on a missing key, ``ImproperlyConfigured`` for bad settings).
"""

from pymemcache.exceptions import MemcacheClientError


class DjmemcacheError(Exception):
    """Base class of the errors raised by djmemcache."""


class ServerError(DjmemcacheError):
    """A memcached server failed: timed out, refused, reset or sent garbage.

    Raised only with ``IGNORE_EXC=False``; otherwise the call is a miss.
    ``server`` is the server as written in LOCATION, ``command`` the
    memcached command that failed.
    """

    def __init__(self, message, server=None, command=None):
        super().__init__(message)
        self.server = server
        self.command = command

    def __reduce__(self):
        return (type(self), (str(self), self.server, self.command))


class NoServerAvailable(ServerError):
    """Every server is blacklisted after timeouts or refused connections.

    Check that memcached runs and is reachable; servers come back on their own
    once a probe succeeds after ``BLACKLIST_TIME`` seconds.
    """


class PoolTimeout(DjmemcacheError):
    """No pooled connection freed up within ``POOL_TIMEOUT`` seconds.

    More threads want a connection to this server at once than
    ``MAX_POOL_SIZE`` allows, or connections are held by slow calls.
    """

    def __init__(self, message, server=None):
        super().__init__(message)
        self.server = server

    def __reduce__(self):
        return (type(self), (str(self), self.server))


class NonNumericValue(ValueError, MemcacheClientError):
    """``incr``/``decr`` of a value memcached cannot count with.

    memcached increments only decimal digits of an unsigned 64-bit number
    (an ``int`` from 0 to 2**64 - 1 set through the cache); a string, a
    pickled value or a negative number is refused. The caller's mistake, not
    the server's: raised whatever ``IGNORE_EXC``, and the connection is kept.
    A ``ValueError``, as Django's ``incr`` raises, and pymemcache's
    ``MemcacheClientError``, as Django's ``PyMemcacheCache`` raises.
    """
