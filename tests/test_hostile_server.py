"""What a caller sees when the server, or anything listening on its port, is hostile.

Each test scripts the replies of a fake server (tests/fakeserver.py) and
checks what the caller gets (what Django promises for a miss, or
``ServerError`` with ``IGNORE_EXC=False``), that the call ends within about
twice TIMEOUT, that the connection was closed and never pooled (the next
call opens a new one) and, where a reply declares a size, that memory grows
with the bytes received and never with what the server declares.
"""

import time
import tracemalloc

import pytest
from fakeserver import CLOSE, SILENCE, Dribble

from djmemcache import ServerError

# Every test runs on both I/O paths: djmemcache._speedups (C) and pure Python.
pytestmark = pytest.mark.usefixtures("io_path")

TIMEOUT = 1.0
# No call may last longer, whatever the server does: twice TIMEOUT, plus
# slack for a loaded machine (2 cores shared by several test runs stalled a
# thread up to 5 s here). A call that waited for the server would last far longer.
LIMIT = 2 * TIMEOUT + 3.0
#: For replies refused without waiting: a client that waited would take this long.
LONG_TIMEOUT = 30
MB = 1024 * 1024


@pytest.fixture(params=[True, False], ids=["ignore_exc", "raise"])
def ignore_exc(request):
    return request.param


def _cache(make_cache, fake, ignore_exc=True, **options):
    return make_cache(fake.location, {"TIMEOUT": TIMEOUT, "IGNORE_EXC": ignore_exc, **options})


def _sees(call, ignore_exc, miss, limit=LIMIT):
    """Run ``call``: with IGNORE_EXC it returns ``miss`` (or raises it, an
    exception class), else it raises ServerError; either way within ``limit``."""
    started = time.monotonic()
    if not ignore_exc:
        with pytest.raises(ServerError):
            call()
    elif isinstance(miss, type) and issubclass(miss, Exception):
        with pytest.raises(miss):
            call()
    else:
        assert call() == miss
    elapsed = time.monotonic() - started
    assert elapsed < limit, "the call took %.2f s" % elapsed
    return elapsed


def _dropped(cache, fake):
    """The connection was closed and not pooled; the next call opens a new one."""
    fake.forget()
    assert fake.wait_all_closed(), "a connection is still open"
    status = cache.stats()[0]
    assert (status["in_use"], status["idle"]) == (0, 0)
    opened, accepted = status["opened"], fake.accepted
    assert cache.get("next") is None  # an empty server's END
    assert (cache.stats()[0]["opened"], fake.accepted) == (opened + 1, accepted + 1)


def _peak_memory(call):
    """Peak bytes Python allocated during ``call()``."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Every command of the Django API: how to call it, what it returns (or
# raises) when a failure is ignored, and how many commands it sends when
# every one of them fails (set deletes the old value after a failed set;
# get_or_set is get, add, get).
COMMANDS = {
    "get": (lambda c: c.get("k"), None, 1),
    "get_many": (lambda c: c.get_many(["k", "k2"]), {}, 1),
    "has_key": (lambda c: c.has_key("k"), False, 1),
    "get_or_set": (lambda c: c.get_or_set("k", "fallback"), "fallback", 3),
    "get_or_set_callable": (lambda c: c.get_or_set("k", lambda: "made"), "made", 5),
    "set": (lambda c: c.set("k", "v"), None, 2),
    "add": (lambda c: c.add("k", "v"), False, 1),
    "set_many": (lambda c: c.set_many({"k": 1, "k2": 2}), ["k", "k2"], 2),
    "delete": (lambda c: c.delete("k"), False, 1),
    "delete_many": (lambda c: c.delete_many(["k", "k2"]), None, 2),
    "incr": (lambda c: c.incr("k"), ValueError, 1),
    "decr": (lambda c: c.decr("k"), ValueError, 1),
    "touch": (lambda c: c.touch("k", 10), False, 1),
    "clear": (lambda c: c.clear(), None, 1),
}
STORES = ("set", "add", "set_many")


# -- impossible or malformed VALUE headers ------------------------------------

BAD_HEADERS = {
    "negative-length": b"VALUE :1:k 0 -2\r\n",
    "negative-length-with-data": b"VALUE :1:k 0 -1\r\nx\r\nEND\r\n",
    "non-numeric-length": b"VALUE :1:k 0 abc\r\nabc\r\nEND\r\n",
    "signed-length": b"VALUE :1:k 0 +1\r\nx\r\nEND\r\n",
    "underscored-length": b"VALUE :1:k 0 1_0\r\n0123456789\r\nEND\r\n",
    "non-ascii-digit-length": "VALUE :1:k 0 \u0661\r\nx\r\nEND\r\n".encode(),
    "21-digit-length": b"VALUE :1:k 0 %s\r\nx\r\nEND\r\n" % (b"0" * 20 + b"1"),
    "5000-digit-length": b"VALUE :1:k 0 %s\r\nx\r\nEND\r\n" % (b"9" * 5000),
    "5000-digit-flags": b"VALUE :1:k %s 1\r\nx\r\nEND\r\n" % (b"9" * 5000),
    "non-numeric-flags": b"VALUE :1:k x 1\r\nx\r\nEND\r\n",
    "negative-flags": b"VALUE :1:k -1 1\r\nx\r\nEND\r\n",
    "three-fields": b"VALUE :1:k 0\r\nx\r\nEND\r\n",
    "five-fields": b"VALUE :1:k 0 1 7\r\nx\r\nEND\r\n",
    "double-space": b"VALUE :1:k 0  1\r\nx\r\nEND\r\n",
    "bare-value": b"VALUE\r\nEND\r\n",
    "data-longer-than-declared": b"VALUE :1:k 0 1\r\nxy\r\nEND\r\n",
    "data-shorter-than-declared": b"VALUE :1:k 0 3\r\nx\r\nEND\r\n",
    "empty-line": b"\r\n",
    "end-in-lowercase": b"end\r\n",
}


@pytest.mark.parametrize("command", ["get", "get_many"])
@pytest.mark.parametrize("reply", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_malformed_value_header_is_a_protocol_error(make_cache, fake_memcached, ignore_exc, command, reply):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(reply)
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)
    assert cache.stats()[0]["state"] == "up"  # it answered: not blacklisted


@pytest.mark.parametrize("command", ["get", "get_many"])
def test_declared_length_of_2_31_is_refused_before_reading(make_cache, fake_memcached, ignore_exc, command):
    # The server declares 2 GiB and sends nothing more: the call must end at
    # once (not wait for the data) and allocate nothing like the declared size.
    cache = _cache(make_cache, fake_memcached, ignore_exc, TIMEOUT=LONG_TIMEOUT)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(b"VALUE :1:k 0 %d\r\n" % 2**31)
    peak = _peak_memory(lambda: _sees(lambda: call(cache), ignore_exc, miss))
    assert peak < MB
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", ["get", "get_many"])
def test_length_above_max_value_size_is_refused_before_it_is_read(make_cache, fake_memcached, ignore_exc,
                                                                  command):
    # The header only: a client that tried to read the value would wait for TIMEOUT.
    cache = _cache(make_cache, fake_memcached, ignore_exc, TIMEOUT=LONG_TIMEOUT, MAX_VALUE_SIZE=1000)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(b"VALUE :1:k 0 1001\r\n")
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)
    # Exactly MAX_VALUE_SIZE is read.
    fake_memcached.reply(b"VALUE :1:k 0 1000\r\n" + b"x" * 1000 + b"\r\nEND\r\n")
    assert cache.get("k") == b"x" * 1000


def test_a_value_above_max_value_size_is_never_sent(make_cache, fake_memcached, ignore_exc):
    cache = _cache(make_cache, fake_memcached, ignore_exc, MAX_VALUE_SIZE=1000)
    cache.set("k", b"x" * 1001)  # not stored: the old value is deleted, as Django does
    assert cache.add("k", b"x" * 1001) is False
    assert cache.set_many({"k": b"x" * 1001, "small": b"x" * 1000}) == ["k"]
    assert fake_memcached.commands() == [b"delete", b"set"]
    assert fake_memcached.received[1][1] == b"x" * 1000


@pytest.mark.parametrize("command", ["get", "get_many"])
def test_memory_grows_with_the_bytes_received_not_the_declared_length(make_cache, fake_memcached, ignore_exc,
                                                                      command):
    # MAX_VALUE_SIZE raised to its largest: the server declares 2 GiB,
    # sends 4 MB of it, then hangs up.
    cache = _cache(make_cache, fake_memcached, ignore_exc, MAX_VALUE_SIZE=2**31 - 3)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply((b"VALUE :1:k 0 %d\r\n" % (2**31 - 3) + b"x" * (4 * MB), CLOSE))
    peak = _peak_memory(lambda: _sees(lambda: call(cache), ignore_exc, miss))
    assert peak < 16 * MB
    _dropped(cache, fake_memcached)


def test_a_large_value_dribbled_until_the_deadline_stays_bounded(make_cache, fake_memcached, ignore_exc):
    cache = _cache(make_cache, fake_memcached, ignore_exc, MAX_VALUE_SIZE=2**31 - 3)
    fake_memcached.reply(Dribble(b"VALUE :1:k 0 %d\r\n" % (2**31 - 3) + b"x" * (32 * MB), every_ms=10,
                                 size=256 * 1024))
    peak = _peak_memory(lambda: _sees(lambda: cache.get("k"), ignore_exc, None))
    assert peak < 64 * MB  # at most what arrived within TIMEOUT, not 2 GiB


# -- replies that are not what was asked --------------------------------------

@pytest.mark.parametrize("command", ["get", "get_many"])
@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\r\n",
    b"STORED\r\n",
    b"VALUE :1:k 0 1\r\nx\r\nVALUE :1:k 0 1\r\ny\r\nEND\r\n",
    b"VALUE :1:other 0 1\r\nx\r\nEND\r\n",
    b"VALUE :1:k 0 1\r\nx\r\nEND\r\nVALUE :1:k2 0 1\r\ny\r\nEND\r\n",
    b"END\r\nEND\r\n",
    b"END\r\nSTORED\r\n",
], ids=["garbage", "binary-garbage", "storage-reply", "duplicate-key", "value-for-another-key",
        "data-after-end", "two-ends", "miss-then-more"])
def test_a_reply_that_is_not_what_was_asked_is_a_protocol_error(make_cache, fake_memcached, ignore_exc, command,
                                                                 reply):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(reply)
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


def test_a_value_for_another_key_in_a_get_many_is_a_protocol_error(make_cache, fake_memcached, ignore_exc):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    fake_memcached.reply(b"VALUE :1:k 0 1\r\nx\r\nVALUE :1:not-asked 0 1\r\ny\r\nEND\r\n")
    _sees(lambda: cache.get_many(["k", "k2"]), ignore_exc, {})
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("key", [b":1:not-asked", b":1:k0"], ids=["not-asked", "asked-once"])
def test_a_value_for_a_key_not_asked_is_refused_at_its_line_not_after_the_whole_reply(
        make_cache, fake_memcached, ignore_exc, key):
    # 64 keys asked, 64 values of 1 MB answered, all for one key: the reply
    # fails at the first wrong VALUE line (for a key asked, the second), not
    # once 64 MB have been read and held.
    cache = _cache(make_cache, fake_memcached, ignore_exc, TIMEOUT=LONG_TIMEOUT, MAX_VALUE_SIZE=2 * MB)
    value = b"x" * MB
    fake_memcached.reply(b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key, MB, value) for _ in range(64))
                         + b"END\r\n")
    peak = _peak_memory(lambda: _sees(lambda: cache.get_many(["k%d" % i for i in range(64)]),
                                      ignore_exc, {}))
    assert peak < 8 * MB
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command, reply", [("get", b"END\r\n"), ("set", b"STORED\r\n")])
def test_data_after_a_reply_in_a_later_packet_is_never_read_as_the_next_reply(make_cache, fake_memcached,
                                                                              command, reply):
    # A complete reply, then 100 ms later a value for the key the next call
    # will ask for. (IGNORE_EXC: on a loaded machine both may come in one recv,
    # and the first call then fails; the next one is what this is about.)
    cache = _cache(make_cache, fake_memcached, True)
    fake_memcached.reply(Dribble(reply + b"VALUE :1:k2 0 6\r\nforged\r\nEND\r\n", every_ms=100, size=len(reply)))
    COMMANDS[command][0](cache)
    assert fake_memcached.wait_replied(1)  # the forged value is in the pooled connection's socket
    assert cache.get("k2") is None  # from a new connection, not the forged value
    assert fake_memcached.accepted == 2
    assert cache.stats()[0]["in_use"] == 0


@pytest.mark.parametrize("command", ["get", "get_many"])
def test_over_long_line_without_crlf_is_refused_without_waiting(make_cache, fake_memcached, ignore_exc, command):
    cache = _cache(make_cache, fake_memcached, ignore_exc, TIMEOUT=LONG_TIMEOUT)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(b"VALUE :1:k 0 1" + b"1" * (4 * MB))
    peak = _peak_memory(lambda: _sees(lambda: call(cache), ignore_exc, miss))
    assert peak < MB
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", [name for name in COMMANDS if name not in ("get", "get_many")])
def test_over_long_reply_line_of_any_command_is_refused_without_waiting(make_cache, fake_memcached, ignore_exc,
                                                                        command):
    cache = _cache(make_cache, fake_memcached, ignore_exc, TIMEOUT=LONG_TIMEOUT)
    call, miss, count = COMMANDS[command]
    fake_memcached.reply(*[b"1" * (4 * MB)] * count)
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", ["get", "get_many"])
def test_truncated_value_then_close_is_a_miss(make_cache, fake_memcached, ignore_exc, command):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply((b"VALUE :1:k 0 10\r\nabc", CLOSE))
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", ["get", "set", "delete", "touch"])
def test_a_server_that_always_hangs_up_costs_one_retry_at_most(make_cache, fake_memcached, ignore_exc, command):
    # get/set/delete/touch are retried once when a pooled connection turns
    # out closed; the fresh connection's failure is final.
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    cache.get("warm")  # one pooled connection
    call, miss, count = COMMANDS[command]
    fake_memcached.reply(*[CLOSE] * 10)
    _sees(lambda: call(cache), ignore_exc, miss)
    # The warm connection (the first try), one fresh one (the retry); with
    # IGNORE_EXC a failed set then deletes the old value, on one more.
    assert fake_memcached.accepted == 2 + (command == "set" and ignore_exc)
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", ["get_many", "set_many", "delete_many"])
def test_servers_that_all_stall_then_hang_up_are_retried_together_not_one_after_another(make_cache, command):
    """Each server stalls most of TIMEOUT and then closes the reused
    connection, and again on the fresh one: the retries run as one more
    pipeline, so the call costs about twice TIMEOUT, where retrying one
    server after another cost TIMEOUT more for each."""
    from fakeserver import FakeMemcached

    stall = 0.4
    arrivals = []

    def stall_then_hang_up(line, data):
        arrivals.append(time.monotonic())
        time.sleep(stall)
        return CLOSE

    servers = [FakeMemcached() for _ in range(4)]
    try:
        cache = make_cache([s.location for s in servers], {"TIMEOUT": 0.5, "IGNORE_EXC": True})
        keys = ["key%d" % i for i in range(40)]
        assert sorted(cache.client._group([cache.make_key(k) for k in keys])) == [0, 1, 2, 3]
        cache.get_many(keys)  # one idle connection per server: reused by the call below
        for server in servers:
            server.reply(stall_then_hang_up, stall_then_hang_up)
        call = {"get_many": lambda: cache.get_many(keys),
                "set_many": lambda: cache.set_many({k: k for k in keys}),
                "delete_many": lambda: cache.delete_many(keys)}[command]
        started = time.monotonic()
        outcome = call()
        elapsed = time.monotonic() - started
        if command == "set_many":
            outcome = sorted(outcome, key=keys.index)  # not stored: every key
        assert outcome == {"get_many": {}, "set_many": keys, "delete_many": None}[command]
        assert len(arrivals) == 8  # each server: the reused connection, then one fresh one
        first, retries = sorted(arrivals[:4]), sorted(arrivals[4:])
        assert retries[0] >= first[0] + stall  # after the first hang-up
        # All four retries under way before the first of them has hung up.
        assert retries[-1] - retries[0] < stall
        assert elapsed < LIMIT
        assert [s["in_use"] for s in cache.stats()] == [0, 0, 0, 0]
        assert [s["state"] for s in cache.stats()] == ["up"] * 4  # they answered: hung up, not timed out
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("hang_up", [False, True], ids=["stop-reading", "stop-reading-then-hang-up"])
def test_a_large_set_many_to_servers_that_stop_reading_costs_one_timeout_not_one_per_server(make_cache, hang_up):
    """The rest of each server's command, past what its socket takes at
    once, is sent to every server together (``send_unsent``): servers that
    all stop reading cost TIMEOUT once (twice when they then hang up and
    are retried), where sending to one after another cost TIMEOUT each."""
    from fakeserver import FakeMemcached

    timeout, count = 0.5, 6

    def stall(line, data):
        time.sleep(0.4 if hang_up else 3.0)  # reading nothing meanwhile
        return CLOSE

    servers = [FakeMemcached(recv_buffer=4096) for _ in range(count)]
    try:
        cache = make_cache([s.location for s in servers], {"TIMEOUT": timeout, "IGNORE_EXC": True})
        keys = ["key%d" % i for i in range(48)]
        assert sorted(cache.client._group([cache.make_key(k) for k in keys])) == list(range(count))
        cache.get_many(keys)  # one idle connection per server: reused by the call below
        for server in servers:
            server.reply(stall, stall)
        started = time.monotonic()
        failed = cache.set_many({key: b"x" * (900 * 1024) for key in keys})
        elapsed = time.monotonic() - started
        assert sorted(failed) == sorted(keys)
        assert [s["in_use"] for s in cache.stats()] == [0] * count
        # One server after another: 3 s, or 4.8 s with the retries.
        assert elapsed < 3.5 * timeout, "set_many took %.2f s with TIMEOUT %s" % (elapsed, timeout)
        states = {s["state"] for s in cache.stats()}
        assert states == ({"up"} if hang_up else {"blacklisted"}), states
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("command", ["get", "set", "delete", "touch", "get_many", "set_many", "delete_many"])
def test_after_pooled_connections_were_dropped_the_retry_is_on_a_fresh_connection(make_cache, fake_memcached,
                                                                                  command):
    """A NAT or firewall dropped every pooled connection (they fail only when
    used): the retry opens a fresh connection instead of taking another of
    the dropped ones, so the caller sees nothing."""
    cache = make_cache(fake_memcached.location, {"TIMEOUT": TIMEOUT, "IGNORE_EXC": False})
    pool = cache.client.pools[0]
    held = [pool.acquire() for _ in range(3)]
    for conn in held:
        pool.release(conn)
    assert cache.stats()[0]["idle"] == 3
    waited = time.monotonic() + 10
    while fake_memcached.accepted < 3 and time.monotonic() < waited:  # the server's side of them
        time.sleep(0.005)
    fake_memcached.hang_up_existing()
    accepted = fake_memcached.accepted
    COMMANDS[command][0](cache)  # no ServerError
    assert fake_memcached.accepted == accepted + 1
    status = cache.stats()[0]
    assert (status["in_use"], status["idle"], status["state"]) == (0, 1, "up")


@pytest.mark.parametrize("command", ["get", "set", "delete", "get_many", "set_many", "delete_many"])
def test_in_random_distribution_the_retry_after_dropped_connections_is_fresh_too(make_cache, command):
    """Every pooled connection to every server was dropped: the retry opens
    a new connection rather than taking another of the dropped ones."""
    from fakeserver import FakeMemcached

    servers = [FakeMemcached() for _ in range(2)]
    try:
        cache = make_cache([s.location for s in servers],
                           {"TIMEOUT": TIMEOUT, "IGNORE_EXC": False, "DISTRIBUTION": "random"})
        for pool in cache.client.pools:  # two idle connections to each server
            held = [pool.acquire() for _ in range(2)]
            for conn in held:
                pool.release(conn)
        waited = time.monotonic() + 10
        while sum(s.accepted for s in servers) < 4 and time.monotonic() < waited:
            time.sleep(0.005)
        for server in servers:
            server.hang_up_existing()
        COMMANDS[command][0](cache)  # no ServerError
        assert sum(s.accepted for s in servers) == 5
        assert [s["in_use"] for s in cache.stats()] == [0, 0]
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("command", ["get", "set", "delete", "get_many", "set_many", "delete_many"])
def test_in_random_distribution_a_proxy_that_hangs_up_and_restarts_costs_nothing(make_cache, monkeypatch, command):
    """A proxy of the fleet closes its pooled connections and refuses new
    ones for a while (restarting): it is blacklisted, the retry goes to
    another proxy, on a new connection, and the caller sees nothing."""
    import random

    from fakeserver import FakeMemcached

    servers = [FakeMemcached() for _ in range(2)]
    try:
        cache = make_cache([s.location for s in servers],
                           {"TIMEOUT": TIMEOUT, "IGNORE_EXC": False, "DISTRIBUTION": "random"})
        pool = cache.client.pools[0]
        pool.release(pool.acquire())  # one idle connection, to the first proxy only
        waited = time.monotonic() + 10
        while servers[0].accepted < 1 and time.monotonic() < waited:
            time.sleep(0.005)
        monkeypatch.setattr(random, "randrange", lambda n: 0)  # its idle connection is taken first
        servers[0].hang_up_existing()
        servers[0].stop_listening()
        COMMANDS[command][0](cache)  # no ServerError
        assert (servers[0].accepted, servers[1].accepted) == (1, 1)
        assert [(s["in_use"], s["state"]) for s in cache.stats()] == [(0, "blacklisted"), (0, "up")]
    finally:
        for server in servers:
            server.stop()


def test_a_connection_whose_deferred_send_failed_keeps_none_of_the_command(make_cache, monkeypatch):
    """The failure's traceback may keep the closed connection alive (a
    ServerError's cause, kept by an error reporter), but not the megabytes
    of its command."""
    from fakeserver import FakeMemcached

    from djmemcache import client as client_module

    server = FakeMemcached(recv_buffer=4096)
    seen = []

    def spy(conns, deadline):
        seen.extend(conns)
        return real(conns, deadline)

    real = client_module.send_unsent
    monkeypatch.setattr(client_module, "send_unsent", spy)
    try:
        cache = make_cache(server.location, {"TIMEOUT": TIMEOUT, "IGNORE_EXC": False})
        server.reply(lambda line, data: (time.sleep(0.2), CLOSE)[1])
        with pytest.raises(ServerError):
            cache.set_many({"k%d" % i: b"x" * (900 * 1024) for i in range(8)})
        assert seen, "the command fitted the socket buffer: nothing was deferred"
        assert [(conn.sock, conn.unsent) for conn in seen] == [(None, None)] * len(seen)
    finally:
        server.stop()


# -- error replies, for every command -----------------------------------------

@pytest.mark.parametrize("error", [b"SERVER_ERROR out of memory", b"CLIENT_ERROR bad command line format",
                                   b"ERROR"], ids=["SERVER_ERROR", "CLIENT_ERROR", "ERROR"])
@pytest.mark.parametrize("command", COMMANDS)
def test_error_reply_is_a_miss_or_server_error(make_cache, fake_memcached, ignore_exc, command, error):
    if command in STORES and error.startswith(b"SERVER_ERROR"):
        pytest.skip("memcached's refusal of one item: see the test below")
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, count = COMMANDS[command]
    fake_memcached.reply(*[error + b"\r\n"] * count)
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("command", STORES)
def test_server_error_to_a_store_is_that_item_refused_and_keeps_the_connection(make_cache, fake_memcached,
                                                                               ignore_exc, command):
    """memcached answers SERVER_ERROR to a store it refuses (object too large,
    out of memory) after reading the data block: the connection is in step.
    The caller sees the item not stored, whatever IGNORE_EXC, as with a
    value over 1 MB; set deletes the old value, as Django does."""
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(b"SERVER_ERROR object too large for cache\r\n")
    assert call(cache) == {"set": None, "add": False, "set_many": ["k"]}[command]
    assert fake_memcached.commands() == {"set": [b"set", b"delete"], "add": [b"add"],
                                         "set_many": [b"set", b"set"]}[command]
    status = cache.stats()[0]
    assert (status["in_use"], status["idle"], fake_memcached.accepted) == (0, 1, 1)


# -- a server that stalls -----------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_silent_server_costs_one_timeout_and_is_blacklisted(make_cache, fake_memcached, ignore_exc, command):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(SILENCE)
    elapsed = _sees(lambda: call(cache), ignore_exc, miss)
    assert elapsed >= TIMEOUT * 0.9
    assert fake_memcached.wait_all_closed()
    status = cache.stats()[0]
    assert (status["state"], status["in_use"], status["idle"]) == ("blacklisted", 0, 0)


@pytest.mark.parametrize("command", ["get", "get_many", "set", "incr", "touch"])
def test_reply_dribbled_a_byte_at_a_time_ends_at_the_deadline(make_cache, fake_memcached, ignore_exc, command):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    reply = {"get": b"VALUE :1:k 0 100\r\n" + b"x" * 100 + b"\r\nEND\r\n",
             "get_many": b"VALUE :1:k2 0 10\r\n0123456789\r\nEND\r\n",
             "set": b"STORED\r\n", "incr": b"1234567890\r\n", "touch": b"TOUCHED\r\n"}[command]
    # A byte at a time, slowly enough that the whole reply would take longer than LIMIT.
    fake_memcached.reply(Dribble(reply, every_ms=min(0.8 * TIMEOUT, 1.5 * LIMIT / len(reply)) * 1000))
    _sees(lambda: call(cache), ignore_exc, miss)
    assert fake_memcached.wait_all_closed()
    status = cache.stats()[0]
    assert (status["state"], status["in_use"], status["idle"]) == ("blacklisted", 0, 0)


# -- replies of the wrong shape to the other commands -------------------------

@pytest.mark.parametrize("command, replies", [
    ("set", [b"STORED\r\nSTORED\r\n"]),
    ("set", [b"STORED\r\nDELETED\r\n"]),
    ("set", [b"VALUE :1:k 0 1\r\nx\r\nEND\r\n"]),
    ("add", [b"NOT_STORED\r\nSTORED\r\n"]),
    ("set_many", [b"STORED\r\nSTORED\r\nSTORED\r\n"]),
    ("delete", [b"DELETED\r\nDELETED\r\n"]),
    ("delete", [b"STORED\r\n"]),
    ("delete_many", [b"DELETED\r\nDELETED\r\nNOT_FOUND\r\n"]),
    ("touch", [b"TOUCHED\r\nEND\r\n"]),
    ("touch", [b"DELETED\r\n"]),
    ("incr", [b"2\r\n3\r\n"]),
    ("clear", [b"OK\r\nOK\r\n"]),
])
def test_a_reply_of_the_wrong_shape_closes_the_connection(make_cache, fake_memcached, ignore_exc, command, replies):
    """A storage (or delete, touch, incr) reply must be exactly one status
    line per command: anything more means the server is out of step."""
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, count = COMMANDS[command]
    fake_memcached.reply(*replies, *[b"ERROR\r\n"] * (count - len(replies)))  # set: its delete fails too
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


@pytest.mark.parametrize("reply", [b"abc", b"-1", b"1.5", b"", b" 1", b"1 ", b"0x10", b"1" * 21,
                                   "\u0661".encode(), b"9" * 5000, b"9" * 20, b"18446744073709551616",
                                   b"00000000000000000042", b"01"])
@pytest.mark.parametrize("command", ["incr", "decr"])
def test_an_incr_reply_that_is_not_a_number_is_a_protocol_error(make_cache, fake_memcached, ignore_exc, command,
                                                                reply):
    cache = _cache(make_cache, fake_memcached, ignore_exc)
    call, miss, _ = COMMANDS[command]
    fake_memcached.reply(reply + b"\r\n")
    _sees(lambda: call(cache), ignore_exc, miss)
    _dropped(cache, fake_memcached)


def test_the_fake_server_speaks_enough_memcached_for_a_normal_call(make_cache, fake_memcached):
    cache = _cache(make_cache, fake_memcached, False)
    fake_memcached.reply(b"VALUE :1:k 0 5\r\nhello\r\nEND\r\n", b"STORED\r\n", b"1\r\n")
    assert cache.get("k") == b"hello"
    cache.set("k", "v")
    assert cache.incr("n") == 1
    line, data = fake_memcached.received[1]
    assert line.startswith(b"set :1:k ") and line.endswith(b" 300 1") and data == b"v"
    status = cache.stats()[0]
    assert (status["in_use"], status["idle"], fake_memcached.accepted) == (0, 1, 1)


def test_a_connection_made_again_for_a_closed_pooled_one_is_not_retried_when_it_is_closed_too(
        make_cache, fake_memcached):
    """The server closed the pooled connection while it was idle (a restart):
    acquire connects anew, and that brand-new connection is no reused one
    whose closing a retry could help: the server closing it too costs one
    connect and one command, not two of each."""
    cache = _cache(make_cache, fake_memcached, False)
    assert cache.get("k") is None
    fake_memcached.close_existing_now()
    time.sleep(0.1)
    fake_memcached.reply(CLOSE)
    with pytest.raises(ServerError):
        cache.get("k")
    assert fake_memcached.accepted == 2
    assert cache.stats()[0]["in_use"] == 0


def test_a_hostile_server_costs_only_its_own_keys_in_a_pipeline(make_cache, mc1, fake_memcached, ignore_exc):
    # One real server and one that answers garbage: set_many and get_many
    # still serve the real server's keys, and its connection goes back to the pool.
    cache = make_cache("%s;%s" % (mc1.location, fake_memcached.location),
                       {"TIMEOUT": TIMEOUT, "IGNORE_EXC": ignore_exc})
    keys = ["key-%d" % i for i in range(40)]
    fake_memcached.reply(*[b"HTTP/1.1 400 Bad Request\r\n"] * 100)
    if ignore_exc:
        failed = cache.set_many({key: key for key in keys})
        assert 0 < len(failed) < len(keys)
        assert cache.get_many(keys) == {key: key for key in keys if key not in failed}
    else:
        with pytest.raises(ServerError):
            cache.set_many({key: key for key in keys})
        with pytest.raises(ServerError):
            cache.get_many(keys)
    fake_memcached.forget()
    assert fake_memcached.wait_all_closed()
    real, hostile = cache.stats()
    assert (real["in_use"], real["idle"], real["opened"]) == (0, 1, 1)
    assert (hostile["in_use"], hostile["idle"], hostile["state"]) == (0, 0, "up")
