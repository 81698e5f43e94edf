"""What someone who can write to memcached can (not) do, and TLS."""

import logging
import os
import pickle
import socket
import ssl
import threading
import time

import pytest

from djmemcache import ServerError

from helpers import raw_command


def _raw_set(location, key, flags, data):
    command = b"set %s %d 0 %d\r\n%s\r\n" % (key.encode(), flags, len(data), data)
    assert raw_command(location, command, until=b"\r\n") == b"STORED\r\n"


class _RunsCode:
    """A pickle that, when loaded, creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, ("with open(%r, 'w') as f: f.write('pwned')" % self.path,))


@pytest.mark.parametrize("flags, data", [
    (1 << 12, b"unknown flags"),
    (1, b"\x80\x05corrupt pickle"),
    (8 | 1, b"x\x9c\x01truncated"),
    (2, b"not-a-number"),
])
def test_poisoned_items_are_misses_logged_with_their_key(make_cache, mc1, caplog, flags, data):
    cache = make_cache(mc1.location)
    _raw_set(mc1.location, ":1:poisoned", flags, data)
    cache.set("healthy", "ok")
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        assert cache.get("poisoned", "default") == "default"
        assert cache.get_many(["poisoned", "healthy"]) == {"healthy": "ok"}
    assert any("':1:poisoned'" in r.getMessage() for r in caplog.records)
    assert cache.get("healthy") == "ok"  # the connection survived


def test_signed_values_refuse_a_forged_pickle_and_never_run_it(make_cache, mc1, tmp_path):
    marker = tmp_path / "pwned"
    cache = make_cache(mc1.location, {"SIGN_VALUES": True})
    cache.set("profile", {"name": "alice"})
    assert cache.get("profile") == {"name": "alice"}
    forged = pickle.dumps(_RunsCode(str(marker)))
    for flags, data in ((1, forged), (1 | 128, b"\0" * 32 + forged)):
        _raw_set(mc1.location, ":1:profile", flags, data)
        assert cache.get("profile", "miss") == "miss"
    assert not marker.exists()
    # The same payload without signing would run: the test's payload is real.
    plain = make_cache(mc1.location)
    _raw_set(mc1.location, ":1:profile", 1, forged)
    plain.get("profile")
    assert marker.exists()
    os.unlink(marker)


def test_signing_key_rotation_through_secret_key_fallbacks(make_cache, mc1):
    from django.test import override_settings

    with override_settings(SECRET_KEY="old-key-" + "x" * 40):
        old = make_cache(mc1.location, {"SIGN_VALUES": True, "TIMEOUT": 1})
        old.set("k", "signed with the old key")
    from djmemcache.client import reset_registry

    reset_registry()
    with override_settings(SECRET_KEY="new-key-" + "y" * 40, SECRET_KEY_FALLBACKS=["old-key-" + "x" * 40]):
        new = make_cache(mc1.location, {"SIGN_VALUES": True, "TIMEOUT": 1})
        assert new.get("k") == "signed with the old key"


def test_json_serializer_never_unpickles(make_cache, mc1, tmp_path):
    marker = tmp_path / "pwned"
    cache = make_cache(mc1.location, {"SERIALIZER": "json"})
    cache.set("k", {"a": [1, 2]})
    assert cache.get("k") == {"a": [1, 2]}
    _raw_set(mc1.location, ":1:k", 1, pickle.dumps(_RunsCode(str(marker))))
    assert cache.get("k", "miss") == "miss"
    assert not marker.exists()


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {}
    for name, blob in (("ca", ca.cert_pem), ("chain", cert.private_key_and_cert_chain_pem),
                       ("key", cert.private_key_pem)):
        paths[name] = str(tmp_path / ("%s.pem" % name))
        blob.write_to_path(paths[name])
    wrong = trustme.CA()
    paths["wrong_ca"] = str(tmp_path / "wrong_ca.pem")
    wrong.cert_pem.write_to_path(paths["wrong_ca"])
    return paths


def test_tls_connection_with_verified_certificate(make_cache, memcached_factory, tls_files):
    server = memcached_factory(extra_args=(
        "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (tls_files["chain"], tls_files["key"])))
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 2, "IGNORE_EXC": False})
    cache.set("secret", "over tls")
    assert cache.get("secret") == "over tls"
    assert cache.get_many(["secret", "none"]) == {"secret": "over tls"}


def test_tls_with_the_wrong_ca_fails_clearly_and_blacklists(make_cache, memcached_factory, tls_files):
    server = memcached_factory(extra_args=(
        "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (tls_files["chain"], tls_files["key"])))
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["wrong_ca"], "TIMEOUT": 2,
                                         "IGNORE_EXC": False})
    with pytest.raises(ServerError, match="CERTIFICATE_VERIFY_FAILED"):
        cache.get("k")
    assert cache.stats()[0]["state"] == "blacklisted"


def _tls_server(memcached_factory, tls_files):
    return memcached_factory(extra_args=(
        "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (tls_files["chain"], tls_files["key"])))


def test_tls_call_to_a_stopped_server_ends_within_timeout(make_cache, memcached_factory, tls_files):
    server = _tls_server(memcached_factory, tls_files)
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 0.5})
    cache.set("k", "v")
    server.pause()
    try:
        started = time.monotonic()
        assert cache.get("k") is None
        assert time.monotonic() - started < 1.0
    finally:
        server.resume()
    assert cache.stats()[0]["state"] == "blacklisted"


def test_tls_handshake_with_a_silent_server_ends_within_connect_timeout(make_cache, tls_files):
    with socket.socket() as listener:  # accepts TCP connections (backlog), never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        location = "127.0.0.1:%d" % listener.getsockname()[1]
        cache = make_cache(location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 5,
                                      "CONNECT_TIMEOUT": 0.5, "IGNORE_EXC": False})
        started = time.monotonic()
        with pytest.raises(ServerError, match="connect timed out"):
            cache.get("k")
        assert time.monotonic() - started < 1.0


def test_tls_reply_dribbled_a_byte_at_a_time_ends_within_timeout(make_cache, tls_files):
    """TIMEOUT bounds the whole command, not each recv: a server that sends a
    valid reply one byte every 50 ms cannot hold the call past the deadline."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["chain"], tls_files["key"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(5)
            tls.recv(100)
            for byte in b"VALUE :1:k 0 100\r\n" + b"x" * 100 + b"\r\nEND\r\n":
                if done.is_set():
                    break
                try:
                    tls.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        cache = make_cache("127.0.0.1:%d" % listener.getsockname()[1],
                           {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 0.5, "IGNORE_EXC": False})
        started = time.monotonic()
        with pytest.raises(ServerError, match="timed out"):
            cache.get("k")
        assert time.monotonic() - started < 1.0
    finally:
        done.set()
        thread.join(10)
        listener.close()
