"""Serve the demo site with a threaded WSGI server from the standard library:
one process, a thread per connection (so every request meets a thread, and
a Django cache backend instance, it has never seen: the worst case for
per-thread connections, and no problem for a process-wide pool)."""

import os
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demosite.settings")


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def main():
    from django.core.wsgi import get_wsgi_application

    port = int(sys.argv[1])
    server = make_server("127.0.0.1", port, get_wsgi_application(),
                         server_class=ThreadingWSGIServer, handler_class=QuietHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
