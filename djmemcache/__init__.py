"""djmemcache: a Django cache backend for memcached with a process-wide pool.

Settings::

    CACHES = {"default": {
        "BACKEND": "djmemcache.backend.PyMemcacheCache",
        "LOCATION": ["10.0.0.1:11211", "10.0.0.2:11211"],
        "OPTIONS": {"TIMEOUT": 1, "MAX_POOL_SIZE": 32},
    }}
"""

from djmemcache.exceptions import (
    DjmemcacheError,
    NonNumericValue,
    NoServerAvailable,
    PoolTimeout,
    ServerError,
)

__version__ = "1.1.0"

__all__ = [
    "DjmemcacheError",
    "NonNumericValue",
    "NoServerAvailable",
    "PoolTimeout",
    "ServerError",
    "__version__",
]
