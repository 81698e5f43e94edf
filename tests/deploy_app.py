"""A one-file Django site served by real gunicorn and uvicorn processes
(tests/test_deployments.py, benchmarks/deploy/).

The cache comes from the environment: ``DEPLOY_BACKEND`` (dotted path),
``DEPLOY_LOCATION`` (comma-separated) and ``DEPLOY_OPTIONS`` (JSON), so
the same site runs djmemcache and Django's own backends side by side.

    /sync/<n>   get, set on a miss, get_many: a typical cached view
    /async/<n>  the same through aget/aset/aget_many, as an async view
    /hit/<key>  "hit" or "miss" for ``key`` (async view; sets it on a miss)

Every response says ``hit`` or ``miss`` in its body, so a client can count
hits without parsing anything.
"""

import json
import os

from django.conf import settings

if not settings.configured:
    settings.configure(
        SECRET_KEY="djmemcache-deploy-" + "x" * 40,
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["djmemcache"],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"stamped": {"format": "%(asctime)s %(process)d %(name)s %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "stamped"}},
            "loggers": {"djmemcache": {"handlers": ["stderr"], "level": "WARNING"}},
        },
        CACHES={"default": {
            "BACKEND": os.environ.get("DEPLOY_BACKEND", "djmemcache.backend.PyMemcacheCache"),
            "LOCATION": os.environ.get("DEPLOY_LOCATION", "127.0.0.1:11211").split(","),
            "OPTIONS": json.loads(os.environ.get("DEPLOY_OPTIONS", "{}")),
        }},
    )

import django  # noqa: E402 - after settings

django.setup()

from django.core.cache import cache  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

VALUE = {"name": "item", "payload": "x" * 200}


def sync_view(request, n):
    item = cache.get("item:%d" % n)
    if item is None:
        cache.set("item:%d" % n, VALUE, 300)
    related = cache.get_many(["item:%d" % (n + i) for i in (1, 2, 3)])
    return HttpResponse("%s %d" % ("miss" if item is None else "hit", len(related)))


async def async_view(request, n):
    item = await cache.aget("item:%d" % n)
    if item is None:
        await cache.aset("item:%d" % n, VALUE, 300)
    related = await cache.aget_many(["item:%d" % (n + i) for i in (1, 2, 3)])
    return HttpResponse("%s %d" % ("miss" if item is None else "hit", len(related)))


async def hit_view(request, key):
    if await cache.aget(key) is None:
        await cache.aset(key, VALUE, 300)
        return HttpResponse("miss")
    return HttpResponse("hit")


urlpatterns = [
    path("sync/<int:n>", sync_view),
    path("async/<int:n>", async_view),
    path("hit/<str:key>", hit_view),
]


def _application():
    from django.core.asgi import get_asgi_application
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application(), get_asgi_application()


wsgi, asgi = _application()
