"""Settings of the demo site. The cache backend and servers come from the
environment so that run.py can serve the same site with Django's built-in
backend for comparison."""

import os

SECRET_KEY = "djmemcache-demo-not-secret-" + "x" * 30
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "demosite.urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "djmemcache",
]
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]
SESSION_ENGINE = "django.contrib.sessions.backends.cache"
DATABASES = {}
USE_TZ = True
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [os.path.join(os.path.dirname(__file__), "templates")],
    "OPTIONS": {"builtins": ["django.templatetags.cache"]},
}]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"djmemcache": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
}

_backend = os.environ.get("DEMO_BACKEND", "djmemcache.backend.PyMemcacheCache")
_options = {}
if _backend.startswith("djmemcache"):
    _options = {"TIMEOUT": 0.25, "CONNECT_TIMEOUT": 0.25, "BLACKLIST_TIME": 5}
CACHES = {"default": {
    "BACKEND": _backend,
    "LOCATION": os.environ.get("DEMO_LOCATION", "127.0.0.1:11211").split(","),
    "OPTIONS": _options,
}}
