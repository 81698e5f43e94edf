from django.apps import AppConfig
from django.core import checks


class DjmemcacheConfig(AppConfig):
    """Optional app: adds the system checks and ``manage.py memcached_status``."""

    name = "djmemcache"
    verbose_name = "djmemcache"

    def ready(self):
        from djmemcache.checks import check_cache_settings

        checks.register(check_cache_settings, checks.Tags.caches)
