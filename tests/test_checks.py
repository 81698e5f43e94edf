"""System checks: bad settings are reported by `manage.py check`, not at the first hit.

Django's own cache checks build every cache before djmemcache's run, so a
backend built with bad OPTIONS must not raise in ``__init__``: it raises the
same ``ImproperlyConfigured`` at its first call instead, and the check
reports it as ``djmemcache.E001``. The checks are registered by the app's
``ready()``: installed, every ``manage.py check`` runs them; not installed,
none does.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from django.core import checks
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from djmemcache.options import parse_options

BACKEND = "djmemcache.backend.PyMemcacheCache"
TYPO = {"TIMEOUTT": 0.5}


def _run(caches):
    with override_settings(CACHES=caches):
        return [m for m in checks.run_checks(tags=[checks.Tags.caches]) if m.id.startswith("djmemcache")]


def _parse_error(location, options):
    with pytest.raises(ImproperlyConfigured) as info:
        parse_options(location, options)
    return str(info.value)


def test_missing_socket_timeout_warns_w001():
    messages = _run({"default": {"BACKEND": BACKEND, "LOCATION": "127.0.0.1:11211"}})
    assert [m.id for m in messages] == ["djmemcache.W001"]
    assert "CACHES['default']" in messages[0].obj


def test_socket_timeout_set_is_silent():
    assert _run({"default": {"BACKEND": BACKEND, "OPTIONS": {"TIMEOUT": 1}}}) == []


def test_unknown_option_is_reported_by_run_checks_despite_djangos_cache_checks():
    messages = _run({"default": {"BACKEND": BACKEND, "OPTIONS": {"TIMEOUT": 1, "BLACKLIST_TIMEOUT": 3}},
                     "other": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
    assert [m.id for m in messages] == ["djmemcache.E001"]
    assert "Did you mean 'BLACKLIST_TIME'?" in messages[0].msg


def test_bad_location_is_an_error():
    messages = _run({"default": {"BACKEND": BACKEND, "LOCATION": "host:port", "OPTIONS": {"TIMEOUT": 1}}})
    assert [m.id for m in messages] == ["djmemcache.E001"]
    assert "port is not a number" in messages[0].msg


def test_checks_are_registered_by_the_app_not_by_importing_the_backend():
    import djmemcache.backend  # noqa: F401
    from djmemcache.checks import check_cache_settings

    assert check_cache_settings in checks.registry.registry.get_checks()
    assert "checks" not in vars(djmemcache.backend)


# -- a backend built with bad settings raises at its first call ------------------


@pytest.mark.parametrize("call", [
    lambda c: c.get("k"),
    lambda c: c.get("bad key with spaces"),  # the settings error comes before the key's
    lambda c: c.get("clé"),
    lambda c: c.set("k", 1),
    lambda c: c.add("k", 1),
    lambda c: c.incr("k"),
    lambda c: c.delete("k"),
    lambda c: c.get_many([]),
    lambda c: c.set_many({}),
    lambda c: c.delete_many(["k"]),
    lambda c: c.has_key("k"),
    lambda c: c.get_or_set("k", 1),
    lambda c: c.clear(),
    lambda c: c.stats(),
    lambda c: c.client_servers,
    lambda c: asyncio.run(c.aget("k")),
], ids=["get", "get-bad-key", "get-unicode-key", "set", "add", "incr", "delete", "get_many-empty",
        "set_many-empty", "delete_many", "has_key", "get_or_set", "clear", "stats", "client_servers", "aget"])
def test_first_call_on_bad_settings_raises_the_same_improperly_configured(call, mc1):
    settings = {"default": {"BACKEND": BACKEND, "LOCATION": mc1.location, "OPTIONS": TYPO}}
    with override_settings(CACHES=settings):
        cache = caches["default"]  # built, as Django's own checks do
        with pytest.raises(ImproperlyConfigured) as info:
            call(cache)
        assert str(info.value) == _parse_error(mc1.location, TYPO)
        assert "Did you mean 'TIMEOUT'?" in str(info.value)
        assert cache._client is None  # no pool, no connection: nothing ran
        cache.close()  # Django's request_finished: a no-op, never an error


def test_every_call_raises_again():
    from djmemcache.backend import PyMemcacheCache

    cache = PyMemcacheCache("127.0.0.1:1", {"OPTIONS": TYPO})
    for _ in range(2):
        with pytest.raises(ImproperlyConfigured, match="TIMEOUTT"):
            cache.get("k")


# -- real `manage.py check` on a generated project --------------------------------


@pytest.fixture(scope="module")
def _startproject(tmp_path_factory):
    """A project made once by ``django-admin startproject``."""
    path = tmp_path_factory.mktemp("startproject")
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(path)],
                   check=True, capture_output=True)
    return path


@pytest.fixture
def project(_startproject, tmp_path):
    """``project(installed, options)``: a copy of the generated project with our CACHES."""

    def make(installed, options):
        path = tmp_path / "project"
        shutil.copytree(_startproject, path)
        with (path / "mysite" / "settings.py").open("a") as f:
            f.write(textwrap.dedent("""
                CACHES = {"default": {
                    "BACKEND": %r,
                    "LOCATION": "127.0.0.1:1",
                    "OPTIONS": %r,
                }}
            """ % (BACKEND, options)))
            if installed:
                f.write('INSTALLED_APPS += ["djmemcache"]\n')
        return path

    return make


def _manage(project, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run([sys.executable, "manage.py", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


FIRST_CALL = "from django.core.cache import cache; cache.get('k')"


def test_manage_py_check_lists_an_options_typo_as_e001(project):
    project = project(installed=True, options=TYPO)
    result = _manage(project, "check")
    print(result.stdout, result.stderr)  # the closing note quotes this output
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "djmemcache.E001" in result.stderr
    assert "unknown option 'TIMEOUTT'. Did you mean 'TIMEOUT'?" in result.stderr
    first_call = _manage(project, "shell", "-c", FIRST_CALL)
    assert first_call.returncode != 0
    assert "ImproperlyConfigured: " + _parse_error("127.0.0.1:1", TYPO) in first_call.stderr


def test_manage_py_check_warns_w001_once_with_the_app_installed(project):
    project = project(installed=True, options={})
    result = _manage(project, "check")
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("djmemcache.W001") == 1
    assert "System check identified 1 issue" in result.stdout + result.stderr
    assert _manage(project, "check", "--fail-level", "WARNING").returncode == 1


def test_manage_py_check_is_clean_with_good_settings(project):
    result = _manage(project(installed=True, options={"TIMEOUT": 0.5}), "check")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("options", [TYPO, {}], ids=["typo", "no-timeout"])
def test_without_the_app_check_runs_no_djmemcache_check_and_does_not_crash(project, options):
    project = project(installed=False, options=options)
    result = _manage(project, "check")
    print(result.stdout, result.stderr)  # the closing note quotes this output
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "djmemcache" not in result.stdout + result.stderr
    if options:
        first_call = _manage(project, "shell", "-c", FIRST_CALL)
        assert "ImproperlyConfigured: " + _parse_error("127.0.0.1:1", TYPO) in first_call.stderr
