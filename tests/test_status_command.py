"""manage.py memcached_status against real servers."""

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

BACKEND = "djmemcache.backend.PyMemcacheCache"


def _run(*args):
    out = io.StringIO()
    code = 0
    try:
        call_command("memcached_status", *args, stdout=out)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


def test_all_servers_up_exit_zero_and_table_names_each(mc3):
    with override_settings(CACHES={"default": {"BACKEND": BACKEND, "LOCATION": [m.location for m in mc3],
                                               "OPTIONS": {"TIMEOUT": 1}}}):
        from django.core.cache import cache

        cache.set("k", "v")
        code, out = _run()
    assert code == 0
    for m in mc3:
        assert m.location in out
    assert "memcached 1." in out and "hit rate" in out


def test_down_server_exits_non_zero_and_json_says_unreachable(memcached_factory):
    up, down = memcached_factory(), memcached_factory()
    down.kill()
    with override_settings(CACHES={"default": {"BACKEND": BACKEND, "LOCATION": [up.location, down.location],
                                               "OPTIONS": {"TIMEOUT": 0.5}}}):
        code, out = _run("--json")
    assert code == 1
    report = json.loads(out)
    by_server = {e["server"]: e for e in report["servers"]}
    assert by_server[up.location]["reachable"] is True
    assert by_server[up.location]["memcached"]["version"].startswith("1.")
    assert by_server[down.location]["reachable"] is False
    assert "ConnectionRefusedError" in by_server[down.location]["error"]


def test_unknown_alias_and_foreign_backend_are_command_errors():
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}):
        with pytest.raises(CommandError, match="does not use djmemcache"):
            call_command("memcached_status")
        with pytest.raises(CommandError, match="no cache 'nope'"):
            call_command("memcached_status", "--alias", "nope")


def test_a_blacklisted_server_that_answers_again_is_reported_with_what_its_return_deletes(memcached_factory):
    servers = [memcached_factory(), memcached_factory()]
    with override_settings(CACHES={"default": {"BACKEND": BACKEND, "LOCATION": [s.location for s in servers],
                                               "OPTIONS": {"TIMEOUT": 0.5}}}):
        from django.core.cache import cache

        cache.client.blacklist.ban(1, "get timed out")
        cache.set_many({"k%d" % i: i for i in range(20)})  # the keys of server 1 are named
        missed = cache.stats()[1]["missed_keys"]
        code, out = _run()
    assert code == 1
    assert 0 < missed < 20
    assert "blacklisted, next probe in" in out and "(get timed out), answers now" in out
    assert "%d keys written meanwhile are deleted there" % missed in out
