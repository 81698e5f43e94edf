from django.apps import AppConfig


class DjmemcacheConfig(AppConfig):
    """Optional app: adds the system checks and ``manage.py memcached_status``."""

    name = "djmemcache"
    verbose_name = "djmemcache"

    def ready(self):
        from djmemcache import checks  # noqa: F401 - registers the checks
