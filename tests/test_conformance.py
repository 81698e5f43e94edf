"""Django's own cache test suite (BaseMemcachedTests) against djmemcache."""

import json
import os
import re
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(__file__), "conformance_runner.py")

pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("options", [{}, {"MAX_POOL_SIZE": 4, "USE_POOLING": True, "TIMEOUT": 5}],
                         ids=["default", "bounded-pool"])
def test_djangos_cache_suite_passes(memcached_factory, options):
    server = memcached_factory()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", RUNNER, server.location,
         "djmemcache.backend.PyMemcacheCache", json.dumps(options)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print("\n" + last)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|errors)", last))
    assert counts["failed"] == 0 and counts["errors"] == 0
    assert counts["passed"] >= 50
