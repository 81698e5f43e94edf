"""System checks: bad settings are reported by `manage.py check`, not at the first hit."""

from django.core import checks
from django.test import override_settings

BACKEND = "djmemcache.backend.PyMemcacheCache"


def _run(caches):
    import djmemcache.checks  # noqa: F401 - registered on import

    with override_settings(CACHES=caches):
        return [m for m in checks.run_checks(tags=[checks.Tags.caches]) if m.id.startswith("djmemcache")]


def _run_ours(caches):
    # Django's own cache checks build every backend first, and ours raises
    # ImproperlyConfigured (naming the option) when built with bad settings;
    # our check reports the same problem as a message.
    from djmemcache.checks import check_cache_settings

    with override_settings(CACHES=caches):
        return check_cache_settings()


def test_missing_socket_timeout_warns_w001():
    messages = _run({"default": {"BACKEND": BACKEND, "LOCATION": "127.0.0.1:11211"}})
    assert [m.id for m in messages] == ["djmemcache.W001"]
    assert "CACHES['default']" in messages[0].obj


def test_socket_timeout_set_is_silent():
    assert _run({"default": {"BACKEND": BACKEND, "OPTIONS": {"TIMEOUT": 1}}}) == []


def test_unknown_option_is_an_error_with_a_suggestion():
    messages = _run_ours({"default": {"BACKEND": BACKEND, "OPTIONS": {"TIMEOUT": 1, "BLACKLIST_TIMEOUT": 3}},
                     "other": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
    assert [m.id for m in messages] == ["djmemcache.E001"]
    assert "Did you mean 'BLACKLIST_TIME'?" in messages[0].msg


def test_bad_location_is_an_error():
    messages = _run_ours({"default": {"BACKEND": BACKEND, "LOCATION": "host:port", "OPTIONS": {"TIMEOUT": 1}}})
    assert [m.id for m in messages] == ["djmemcache.E001"]
    assert "port is not a number" in messages[0].msg
