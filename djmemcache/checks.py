"""Django system checks for every CACHES entry that uses this backend.

Registered by the app's ``ready()`` (``apps.py``), the Django way: with
``djmemcache`` in INSTALLED_APPS every ``manage.py check`` runs them, and
without it none does. (Registering on import of the backend, as before,
came too late for ``manage.py check`` yet showed up in later
``run_checks()`` calls of other apps' test suites.)
"""

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from djmemcache.options import parse_options


def _our_aliases():
    from djmemcache.backend import PyMemcacheCache

    for alias, params in getattr(settings, "CACHES", {}).items():
        try:
            backend = import_string(params.get("BACKEND", ""))
        except ImportError:
            continue
        if isinstance(backend, type) and issubclass(backend, PyMemcacheCache):
            yield alias, params


def check_cache_settings(app_configs=None, **kwargs):
    messages = []
    for alias, params in _our_aliases():
        try:
            options = parse_options(params.get("LOCATION"), params.get("OPTIONS") or {})
        except ImproperlyConfigured as exc:
            messages.append(checks.Error(
                str(exc), hint="See the options table in djmemcache's README.",
                obj="CACHES[%r]" % alias, id="djmemcache.E001",
            ))
            continue
        if options.timeout is None:
            messages.append(checks.Warning(
                "CACHES[%r] sets no socket TIMEOUT in OPTIONS: a hung memcached server "
                "blocks requests forever and is never blacklisted." % alias,
                hint="Add e.g. 'OPTIONS': {'TIMEOUT': 1} (seconds; the expiry of cached "
                     "items is the top-level TIMEOUT).",
                obj="CACHES[%r]" % alias, id="djmemcache.W001",
            ))
    return messages
