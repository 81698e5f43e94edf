"""``manage.py memcached_status``: a health check of a djmemcache cache."""

import json
import sys

from django.core.cache import caches
from django.core.cache.backends.base import InvalidCacheBackendError
from django.core.management.base import BaseCommand, CommandError

from djmemcache.backend import PyMemcacheCache
from djmemcache.connection import Connection


def _server_stats(cache, server):
    """memcached's stats over a connection of its own, so a blacklisted
    server is checked too; None when it cannot be reached."""
    conn = Connection(server, cache.config)
    try:
        conn.connect()
        return {_text(k): _text(v) for k, v in conn.stats().items()}, None
    except Exception as exc:  # noqa: BLE001 - reported, this is a health check
        return None, "%s: %s" % (type(exc).__name__, exc)
    finally:
        conn.close()


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Command(BaseCommand):
    help = "Show each memcached server of a djmemcache cache; exit 1 if any is down."

    def add_arguments(self, parser):
        parser.add_argument("--alias", default="default", help="the CACHES alias (default: default)")
        parser.add_argument("--json", action="store_true", help="print one JSON document")

    def handle(self, *args, alias, **options):
        try:
            cache = caches[alias]
        except InvalidCacheBackendError:
            raise CommandError("no cache %r in CACHES" % alias)
        if not isinstance(cache, PyMemcacheCache):
            raise CommandError("cache %r does not use djmemcache (BACKEND %s)" % (alias, type(cache).__name__))
        report = []
        for entry, server in zip(cache.stats(), cache.config.servers, strict=True):
            stats, error = _server_stats(cache, server)
            entry = dict(entry, reachable=stats is not None, error=error)
            if stats:
                gets = stats.get("get_hits", 0) + stats.get("get_misses", 0)
                entry["memcached"] = {
                    "version": stats.get("version"),
                    "uptime": stats.get("uptime"),
                    "hit_rate": round(stats.get("get_hits", 0) / gets, 4) if gets else None,
                    "curr_items": stats.get("curr_items"),
                    "evictions": stats.get("evictions"),
                    "curr_connections": stats.get("curr_connections"),
                    "bytes": stats.get("bytes"),
                    "limit_maxbytes": stats.get("limit_maxbytes"),
                }
            report.append(entry)
        if options["json"]:
            self.stdout.write(json.dumps({"alias": alias, "servers": report}, indent=2, default=str))
        else:
            self._table(alias, report)
        if not all(e["reachable"] and e["state"] == "up" for e in report):
            sys.exit(1)

    def _table(self, alias, report):
        self.stdout.write("cache %r: %d server(s)" % (alias, len(report)))
        for e in report:
            if not e["reachable"]:
                state = "DOWN (%s)" % e["error"]
            elif e["state"] == "blacklisted":
                state = "blacklisted, next probe in %.0fs (%s), answers now; on its return %s" % (
                    e["next_probe_in"], e["reason"],
                    "it is flushed" if e["flush_on_return"] else
                    "%d keys written meanwhile are deleted there" % e["missed_keys"])
            else:
                state = "up"
            self.stdout.write("\n%s  %s" % (e["server"], state))
            self.stdout.write("  pool: %d in use, %d idle, %d opened; hits %d, misses %d, errors %d, "
                              "timeouts %d, blacklisted %d times"
                              % (e["in_use"], e["idle"], e["opened"], e["hits"], e["misses"],
                                 e["errors"], e["timeouts"], e["blacklistings"]))
            m = e.get("memcached")
            if m:
                rate = "-" if m["hit_rate"] is None else "%.1f%%" % (100 * m["hit_rate"])
                self.stdout.write("  memcached %s, up %ss, hit rate %s, %s items, %s evictions, "
                                  "%s connections, %.1f of %.0f MB used"
                                  % (m["version"], m["uptime"], rate, m["curr_items"], m["evictions"],
                                     m["curr_connections"], (m["bytes"] or 0) / 1e6,
                                     (m["limit_maxbytes"] or 0) / 1e6))
