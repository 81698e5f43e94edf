"""What someone who can write to memcached can (not) do, and TLS."""

import logging
import os
import pickle
import socket
import ssl
import sys
import threading
import time
from decimal import Decimal

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


def test_tls_records_end_at_command_boundaries_and_hold_as_many_commands_as_fit():
    from djmemcache.connection import TLS_RECORD_SIZE, _tls_records

    commands = [b"c" * n for n in (100, 16000, 300, 40000, 10, 20, TLS_RECORD_SIZE, 1)]
    pieces = _tls_records(commands)
    assert pieces == [100 + 16000, 300, 40000, 10 + 20, TLS_RECORD_SIZE, 1]
    assert sum(pieces) == sum(map(len, commands))
    assert _tls_records([b"x" * 10] * 2000) == [16380, 20000 - 16380]


def test_tls_set_many_of_thousands_of_values_beside_a_busy_thread_stays_fast(
        make_cache, memcached_factory, tls_files):
    """Each TLS write gives up the GIL, which a thread busy with Python code
    (another request's) gives back only after its switch interval: 2,000
    writes, one per command, took 10 s and timed out; packed into records
    of whole commands they are about a dozen."""
    server = _tls_server(memcached_factory, tls_files)
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 2, "IGNORE_EXC": False})
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        data = {"busy%d" % n: b"%d" % n * 20 for n in range(2000)}
        started = time.monotonic()
        assert cache.set_many(data) == []
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
    assert cache.get_many(list(data)) == data
    assert elapsed < 2
    assert cache.stats()[0]["state"] == "up"


@pytest.mark.parametrize("size", [1, 100, 2000, 9000, 17000, 40000])
def test_tls_set_many_of_many_values_is_stored_whole_on_a_real_memcached(
        make_cache, memcached_factory, tls_files, size):
    """Over TLS no record holds the end of a data block and the start of the
    next command (``connection._tls_records``): memcached (1.6.18 here)
    reads a value's data block with a read of just its length, and what the
    same record holds after it stays in OpenSSL's buffer, unseen by its
    event loop until more bytes come, so a ``set_many`` of 10 values of 2 KB
    stalled until TIMEOUT and got the server blacklisted."""
    server = _tls_server(memcached_factory, tls_files)
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 1, "IGNORE_EXC": False})
    for count in (2, 10, 60):
        data = {"k%d-%d-%s" % (size, n, "x" * (n % 150)): b"v%d" % n * (size // 2 + 1) for n in range(count)}
        assert cache.set_many(data) == []
        assert cache.get_many(list(data)) == data
        assert cache.add("added-%d-%d" % (size, count), b"a" * size)  # one command, on the same connection
        cache.delete_many(list(data))
    assert cache.stats()[0]["state"] == "up"


def test_tls_call_to_a_stopped_server_ends_within_timeout(make_cache, memcached_factory, tls_files):
    server = _tls_server(memcached_factory, tls_files)
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 0.5})
    cache.set("k", "v")
    server.pause()
    try:
        started = time.monotonic()
        assert cache.get("k") is None
        assert time.monotonic() - started < 3.0  # TIMEOUT 0.5; slack for a loaded machine
    finally:
        server.resume()
    assert cache.stats()[0]["state"] == "blacklisted"


class _StuckTLS:
    """A TLS socket whose layer stops moving one way (a renegotiation it
    hides, say) while poll says ready: each send takes nothing, as gevent's
    returns 0 for a write that must read first, or each read of the reply
    wants another read."""

    def __init__(self, sock, stuck):
        self._sock, self._stuck = sock, stuck

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def send(self, data, flags=0):
        return 0 if self._stuck == "send" else self._sock.send(data, flags)

    def recv(self, size, flags=0):
        raise ssl.SSLWantReadError("wants a read")


@pytest.mark.parametrize("stuck", ["send", "recv"])
def test_tls_call_whose_layer_stops_moving_ends_at_timeout_not_spinning_past_it(
        make_cache, memcached_factory, tls_files, stuck):
    server = _tls_server(memcached_factory, tls_files)
    cache = make_cache(server.location, {"TLS_CA_FILE": tls_files["ca"], "TIMEOUT": 0.5, "IGNORE_EXC": False})
    cache.set("k", "v")
    conn = cache.client.pools[0]._idle[-1]
    conn.sock = _StuckTLS(conn.sock, stuck)
    started = time.monotonic()
    with pytest.raises(ServerError, match="timed out"):
        cache.set("k", "w")
    assert time.monotonic() - started < 1.0
    assert cache.stats()[0]["in_use"] == 0


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
        assert time.monotonic() - started < 3.0  # not TIMEOUT (5 s); slack for load


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
        assert time.monotonic() - started < 3.0  # not the 6 s of the reply; slack for load
    finally:
        done.set()
        thread.join(10)
        listener.close()


# -- a value must never run as a command --------------------------------------
#
# The choice: timeouts beyond memcached's exptime (a signed 32-bit number:
# memcached 1.6 truncates larger ones, and refuses the command line past
# 2**63, then runs the value as the next command) are clamped to the
# longest expiry memcached accepts, 2**31 - 1 (an absolute time in January
# 2038); below it, "expire now"; inf and nan raise ValueError before any
# connection is used.

PAYLOAD = "delete :1:victim\r\nflush_all"
HUGE_TIMEOUTS = [sys.maxsize, 10**19, 2**63, 2**32, 2**31, 1e300]
PAST_TIMEOUTS = [-(10**19), -sys.maxsize, -(2**31) - 1, -1e300]
STORE_CALLS = {
    "set": lambda c, t: c.set("attacker", PAYLOAD, t),
    "add": lambda c, t: c.add("attacker", PAYLOAD, t),
    "set_many": lambda c, t: c.set_many({"attacker": PAYLOAD, "attacker2": PAYLOAD.encode()}, t),
    "get_or_set": lambda c, t: c.get_or_set("attacker", PAYLOAD, t),
    "get_or_set_callable": lambda c, t: c.get_or_set("attacker", lambda: PAYLOAD, t),  # stampede protection
    "touch": lambda c, t: c.touch("attacker", t),
}


def _ttl(location, key):
    """Seconds ``key`` has left (-1: no expiry; None: not there), from memcached's meta get."""
    reply = raw_command(location, b"mg %s t\r\n" % key.encode(), until=b"\r\n")
    return int(reply.split(b" t")[1]) if reply.startswith(b"HD") else None


def _wire_counts(server):
    stats = server.stats()
    return {name: stats[name] for name in ("cmd_get", "cmd_set", "cmd_touch", "cmd_flush", "delete_hits",
                                           "delete_misses", "incr_hits", "incr_misses", "decr_hits",
                                           "decr_misses", "total_connections")}


@pytest.mark.parametrize("timeout", HUGE_TIMEOUTS + PAST_TIMEOUTS)
@pytest.mark.parametrize("command", STORE_CALLS)
def test_out_of_range_timeout_never_lets_a_value_run_as_a_command(make_cache, mc1, command, timeout):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False})
    cache.set("victim", "alive", None)
    if command == "touch":
        cache.set("attacker", PAYLOAD)
    before = mc1.stats()
    STORE_CALLS[command](cache, timeout)
    after = mc1.stats()
    assert cache.get("victim") == "alive"
    assert after["cmd_flush"] == before["cmd_flush"]
    ttl = _ttl(mc1.location, ":1:attacker")
    if timeout > 0:  # clamped to the longest expiry memcached accepts
        assert 2**31 - 1 - time.time() - 5 <= ttl <= 2**31 - 1 - time.time() + 5
        assert cache.get("attacker") == PAYLOAD
    else:  # expired at once
        assert ttl is None and cache.get("attacker") is None


def test_the_injection_is_real_when_the_expiry_reaches_memcached_unclamped(make_cache, mc1):
    # What the tests above guard against, done by hand: memcached refuses the
    # command line and runs the value as the next command.
    cache = make_cache(mc1.location)
    cache.set("victim", "alive", None)
    payload = PAYLOAD.encode()
    raw_command(mc1.location, b"set :1:attacker 16 %d %d\r\n%s\r\n" % (10**19, len(payload), payload),
                until=b"OK\r\n")
    assert cache.get("victim") is None


@pytest.mark.parametrize("expire", [2**31, -(2**31) - 1, 10**19, 1.5, None, True])
def test_client_refuses_an_expiry_outside_32_bits_before_any_connection(make_cache, mc1, expire):
    cache = make_cache(mc1.location)
    client = cache.client
    for call in (lambda: client.set("k", "v", expire), lambda: client.add("k", "v", expire),
                 lambda: client.set_many({"k": "v"}, expire), lambda: client.touch("k", expire)):
        with pytest.raises(ValueError, match="expiry"):
            call()
    assert client.status()[0]["opened"] == 0


@pytest.mark.parametrize("timeout", [float("inf"), float("-inf"), float("nan"), Decimal("Infinity"),
                                     Decimal("-Infinity"), Decimal("NaN"), Decimal("sNaN")])
@pytest.mark.parametrize("command", STORE_CALLS)
def test_infinite_or_nan_timeout_raises_before_any_connection_is_used(make_cache, mc1, command, timeout):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False})
    before = _wire_counts(mc1)
    with pytest.raises(ValueError, match="finite"):
        STORE_CALLS[command](cache, timeout)
    after = _wire_counts(mc1)
    if command == "get_or_set":  # its get runs first, and misses (not with a callable: stampede protection)
        assert after["cmd_get"] == before["cmd_get"] + 1
        after["cmd_get"], after["total_connections"] = before["cmd_get"], after["total_connections"] - 1
    assert after == {**before, "total_connections": before["total_connections"] + 1}  # stats' own
    assert cache.stats()[0]["opened"] == (command == "get_or_set")


@pytest.mark.parametrize("delta", [2**64, -(2**64), 10**30, 1.0, float("inf"), float("nan"), "1", None])
@pytest.mark.parametrize("command", ["incr", "decr"])
def test_out_of_range_delta_raises_before_any_connection_is_used(make_cache, mc1, command, delta):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False})
    before = _wire_counts(mc1)
    with pytest.raises((ValueError, TypeError)):
        getattr(cache, command)("counter", delta)
    assert _wire_counts(mc1) == {**before, "total_connections": before["total_connections"] + 1}
    assert cache.stats()[0]["opened"] == 0


@pytest.mark.parametrize("delta", [sys.maxsize, 10**19, -(10**19), 2**64 - 1])
@pytest.mark.parametrize("command", ["incr", "decr"])
def test_largest_deltas_reach_memcached_as_numbers_only(make_cache, mc1, command, delta):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False})
    cache.set("victim", "alive", None)
    cache.set("counter", 1)
    result = getattr(cache, command)("counter", delta)
    step = delta if command == "incr" else -delta
    assert result == (0 if 1 + step < 0 else (1 + step) % 2**64)  # memcached: decr stops at 0, incr wraps
    assert cache.get("victim") == "alive"


class _Flags:
    """A serde whose flags memcached could not take."""

    def __init__(self, flags):
        self.flags = flags

    def serialize(self, key, value):
        return b"delete :1:victim", self.flags

    def deserialize(self, key, value, flags):
        return value


@pytest.mark.parametrize("flags", [2**32, -1, 2**64, "1", 1.0, True, None])
def test_flags_out_of_range_raise_before_any_connection_is_used(make_cache, mc1, flags):
    cache = make_cache(mc1.location, {"IGNORE_EXC": False, "SERIALIZER": _Flags(flags)})
    before = _wire_counts(mc1)
    for call in (lambda: cache.set("k", 1), lambda: cache.add("k", 1), lambda: cache.set_many({"k": 1}),
                 lambda: cache.get_or_set("k", 1)):
        with pytest.raises((ValueError, TypeError), match="flags|unsupported operand"):
            call()
    after = _wire_counts(mc1)
    assert after["cmd_set"] == before["cmd_set"]
    assert cache.stats()[0]["opened"] in (0, 1)  # get_or_set's get may run first


_KEY_FUNCTIONS = {
    "crlf": lambda key, prefix, version: "%s\r\nflush_all" % key,
    "space": lambda key, prefix, version: "%s delete victim" % key,
    "newline": lambda key, prefix, version: "%s\nx" % key,
    "tab": lambda key, prefix, version: "%s\tx" % key,
    "nul": lambda key, prefix, version: "%s\x00" % key,
    "del": lambda key, prefix, version: "%s\x7f" % key,
    "251-bytes": lambda key, prefix, version: key.ljust(251, "x"),
    "251-bytes-utf8": lambda key, prefix, version: key + "é" * 125,
}


@pytest.mark.parametrize("key_function", _KEY_FUNCTIONS.values(), ids=_KEY_FUNCTIONS.keys())
def test_keys_made_invalid_by_key_function_never_reach_a_connection(make_cache, mc1, key_function):
    from django.core.cache import InvalidCacheKey

    cache = make_cache(mc1.location, {"IGNORE_EXC": False}, KEY_FUNCTION=key_function)
    before = _wire_counts(mc1)
    for call in (
        lambda: cache.get("k"), lambda: cache.get_many(["k"]), lambda: cache.has_key("k"),
        lambda: cache.set("k", 1), lambda: cache.add("k", 1), lambda: cache.set_many({"k": 1}),
        lambda: cache.get_or_set("k", 1), lambda: cache.touch("k"), lambda: cache.delete("k"),
        lambda: cache.delete_many(["k"]), lambda: cache.incr("k"), lambda: cache.decr("k"),
    ):
        with pytest.raises(InvalidCacheKey):
            call()
    assert _wire_counts(mc1) == {**before, "total_connections": before["total_connections"] + 1}
    assert cache.stats()[0]["opened"] == 0


@pytest.mark.parametrize("serializer", ["json", "pickle"])
@pytest.mark.parametrize("compressor", ["zlib", "zstd"])
def test_a_compression_bomb_is_a_miss_without_inflating(make_cache, mc1, caplog, serializer, compressor):
    """128 MB of zeros fit in 4 KB (zstd) or 128 KB (zlib). Whoever can write
    to memcached must not choose how much memory a get takes: an item that
    inflates past 32 x MAX_VALUE_SIZE (here 8 MB) is a miss, refused as it inflates."""
    import tracemalloc
    import zlib

    from djmemcache.serializer import FLAG_COMPRESSED, FLAG_ZSTD

    zstandard = pytest.importorskip("zstandard")
    cache = make_cache(mc1.location, {"SERIALIZER": serializer, "COMPRESS_MIN_LENGTH": 100,
                                      "COMPRESSOR": compressor, "MAX_VALUE_SIZE": 256 * 1024})
    zeros = b"\0" * (128 << 20)
    if compressor == "zlib":
        bomb, flags = zlib.compress(zeros), FLAG_COMPRESSED
    else:
        bomb, flags = zstandard.ZstdCompressor().compress(zeros), FLAG_ZSTD
    del zeros
    _raw_set(mc1.location, ":1:bomb", flags, bomb)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="djmemcache"):
            assert cache.get("bomb", "miss") == "miss"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20  # zlib: the 8 MB it may inflate, and its buffer's growth
    assert any("inflates past" in r.getMessage() for r in caplog.records)
    # Within the bound, compressed values still round-trip; beyond it they are not compressed.
    cache.set("fits", b"y" * (8 << 20))
    assert cache.get("fits") == b"y" * (8 << 20)
    assert cache.set_many({"too-big": b"z" * ((8 << 20) + 1)}) == ["too-big"]
