"""Run Django's own memcached cache tests against a cache backend.

    python tests/conformance_runner.py LOCATION [BACKEND] [OPTIONS_JSON]

Django's test files are not in its wheel: the source distribution of the
installed Django is fetched once with ``pip download`` and ``tests/cache`` is
kept under ``~/.cache/djmemcache-conformance`` (or ``$CONFORMANCE_CACHE``).
The tests are those Django runs for its own ``PyMemcacheCache``
(``BaseMemcachedTests``, which includes ``BaseCacheTests``), minus three that
inspect the internals of Django's own backend classes (see ``EXCLUDED``; the
behaviour behind them is tested in tests/test_backend.py). Last line:

    conformance: N passed, N failed, N errors, N skipped, N excluded

Runs in its own process because it needs its own Django settings.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest

BACKEND = "djmemcache.backend.PyMemcacheCache"

EXCLUDED = {
    "test_location_multiple_servers": "reads the private _servers list of Django's BaseMemcachedCache",
    "test_close": "mocks cache._class.disconnect_all, the client class of Django's backends",
    "test_set_many_returns_failing_keys": "mocks cache._class.set_multi of Django's backends",
}

CACHE_DIR = os.environ.get(
    "CONFORMANCE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "djmemcache-conformance")
)


def django_tests_dir():
    import django

    version = django.get_version()
    tests = os.path.join(CACHE_DIR, "django-%s" % version, "tests")
    if os.path.exists(os.path.join(tests, "cache", "tests.py")):
        return tests
    os.makedirs(CACHE_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "Django==%s" % version, "-d", tmp],
            capture_output=True, text=True,
        )
        archives = [name for name in os.listdir(tmp) if name.endswith(".tar.gz")]
        if result.returncode or not archives:
            sys.exit("conformance: cannot download Django %s sources: %s"
                     % (version, result.stderr.strip()[-500:]))
        with tarfile.open(os.path.join(tmp, archives[0])) as archive:
            top = archive.getnames()[0].split("/")[0]
            wanted = [m for m in archive.getmembers() if m.name.startswith(top + "/tests/cache/")]
            archive.extractall(tmp, members=wanted)
        os.makedirs(os.path.dirname(tests), exist_ok=True)
        shutil.move(os.path.join(tmp, top, "tests"), tests)
    return tests


def configure(params):
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="djmemcache-conformance-" + "x" * 30,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={"default": params},
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions", "django.contrib.messages", "cache"],
        MIDDLEWARE=[],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                    "APP_DIRS": True, "OPTIONS": {}}],
        USE_TZ=False,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        MIGRATION_MODULES={"auth": None, "contenttypes": None, "sessions": None},
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    )
    django.setup()


def suite(params):
    from cache import tests as django_cache_tests
    from django.test import TestCase, override_settings

    attrs = {"base_params": params, "incr_decr_type_error": Exception}
    for name, reason in EXCLUDED.items():
        attrs[name] = unittest.skip("excluded: " + reason)(lambda self: None)
    cls = type("DjangoCacheTests", (django_cache_tests.BaseMemcachedTests, TestCase), attrs)
    cls = override_settings(CACHES=django_cache_tests.caches_setting_for_tests(
        base=params, exclude=django_cache_tests.memcached_excluded_caches))(cls)
    return unittest.defaultTestLoader.loadTestsFromTestCase(cls)


def main(argv):
    location = argv[1]
    backend = argv[2] if len(argv) > 2 else BACKEND
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    sys.path.insert(0, django_tests_dir())
    params = {"BACKEND": backend, "LOCATION": location}
    if options:
        params["OPTIONS"] = options
    configure(params)
    import django
    from django.conf import settings
    from django.test.utils import get_runner, setup_test_environment, teardown_test_environment

    setup_test_environment()
    runner = get_runner(settings)(verbosity=0, interactive=False)
    databases = runner.setup_databases()
    try:
        result = unittest.TextTestRunner(verbosity=int(os.environ.get("VERBOSITY", "1")),
                                         stream=sys.stdout).run(suite(params))
    finally:
        runner.teardown_databases(databases)
        teardown_test_environment()

    def ids(entries):
        return {getattr(test, "test_case", test).id() for test, _ in entries}

    failed = ids(result.failures) | {t.id() for t in result.unexpectedSuccesses}
    errors = ids(result.errors) - failed
    excluded = len(EXCLUDED)
    passed = result.testsRun - len(failed) - len(errors) - len(result.skipped) - len(result.expectedFailures)
    print("backend: %s  django: %s  options: %s" % (backend, django.get_version(), options))
    print("conformance: %d passed, %d failed, %d errors, %d skipped, %d excluded"
          % (passed, len(failed), len(errors), len(result.skipped) - excluded, excluded))
    return 0 if passed > 0 and not failed and not errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
