"""Views that use the cache the way real sites do."""

import time

from django.core.cache import cache
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_page


def _expensive(n):
    time.sleep(0.002)  # a database query, say
    return {"id": n, "name": "Product %d" % n, "price": n * 3 % 97}


def product(request, n):
    """Low-level API: get, and on a miss compute and set."""
    item = cache.get("product:%d" % n)
    if item is None:
        item = _expensive(n)
        cache.set("product:%d" % n, item, 30)
    related = cache.get_many(["product:%d" % (n + i) for i in (1, 2, 3)])
    return JsonResponse({"product": item, "related": len(related)})


@cache_page(10)
def cached_page(request, n):
    """Whole-page caching."""
    return HttpResponse("page %d rendered at %f" % (n, time.time()))


def fragment(request, n):
    """A template with a {% cache %} fragment."""
    return render(request, "fragment.html", {"n": n, "item": _expensive(n)})


def visit(request):
    """Sessions on the cache session engine."""
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"visits": request.session["visits"]})


def status(request):
    stats = cache.stats() if hasattr(cache, "stats") else []
    return JsonResponse({"servers": stats})
