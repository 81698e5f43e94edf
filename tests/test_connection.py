"""The socket layer: commands sent without releasing the GIL, and when not."""

import threading
import time

import pytest

from djmemcache.connection import SEND_NOW_MAX, Connection, ErrorReply, ProtocolError
from djmemcache.options import parse_options

# Every test runs on both I/O paths: djmemcache._speedups (C) and pure Python.
pytestmark = pytest.mark.usefixtures("io_path")


def _connection(location, **options):
    opts = parse_options(location, options)
    conn = Connection(opts.servers[0], opts)
    conn.connect()
    return conn


def test_plain_connections_send_small_commands_without_releasing_the_gil(mc1):
    conn = _connection(mc1.location)
    try:
        assert conn._send_now
        assert conn.store_one(b"set", "k", (b"v", 0), 0) is None
        assert conn.get("k") == (b"v", 0)
    finally:
        conn.close()


def test_a_full_socket_buffer_blocks_only_the_sender_and_loses_no_byte(memcached_factory):
    """Commands just under SEND_NOW_MAX to a stopped server fill the socket
    buffers; the send that finds them full must fall back to ``sendall``
    (GIL released, the rest of the process runs) and, once the server
    resumes, every command must arrive whole and in order."""
    server = memcached_factory()
    conn = _connection(server.location, TIMEOUT=30)
    block = SEND_NOW_MAX - 100
    count = 300  # about 20 MB: more than loopback socket buffers hold
    values = [bytes([65 + i % 26]) * block for i in range(count)]
    commands = [b"set k%d 0 0 %d\r\n%s\r\n" % (i, block, value) for i, value in enumerate(values)]
    assert all(len(c) <= SEND_NOW_MAX for c in commands)
    sent = []

    def sender():
        for command in commands:
            conn._send(command)
            sent.append(1)

    server.pause()
    thread = threading.Thread(target=sender)
    try:
        thread.start()
        deadline = time.monotonic() + 10
        progress = -1
        while (not sent or len(sent) != progress) and time.monotonic() < deadline:  # until it is stuck
            progress = len(sent)
            time.sleep(0.3)
        # This thread ran while the sender waited on a full buffer: the GIL was free.
        assert thread.is_alive() and 0 < len(sent) < count
    finally:
        server.resume()
        thread.join(30)
    assert not thread.is_alive() and len(sent) == count
    try:
        assert conn._read_lines(count) == [b"STORED"] * count
        for i in (0, count // 2, count - 1):
            assert conn.get("k%d" % i) == (values[i], 0)
    finally:
        conn.close()


def test_commands_larger_than_send_now_max_go_through_sendall(mc1):
    conn = _connection(mc1.location)
    try:
        value = b"x" * (SEND_NOW_MAX * 3)
        assert conn.store_one(b"set", "big", (value, 0), 0) is None
        assert conn.get("big") == (value, 0)
    finally:
        conn.close()


def _parse(reply, keys=("k", "j")):
    options = parse_options("127.0.0.1:1", {"MAX_VALUE_SIZE": 1000})
    conn = Connection(options.servers[0], options)  # never connected: the reply is all there
    return conn._read_values({key.encode(): key for key in keys}, reply, None)


def test_a_multi_value_reply_is_parsed_in_one_pass():
    reply = b"VALUE k 1 3\r\nabc\r\nVALUE j 4294967295 0\r\n\r\nEND\r\n"
    assert _parse(reply) == {"k": (b"abc", 1), "j": (b"", 4294967295)}
    assert _parse(b"END\r\n") == {}


@pytest.mark.parametrize("reply, error", [
    (b"VALUE k 1x 3\r\nabc\r\nEND\r\n", ProtocolError),          # flags not digits
    (b"VALUE k -1 3\r\nabc\r\nEND\r\n", ProtocolError),          # a sign
    (b"VALUE k 1 +3\r\nabc\r\nEND\r\n", ProtocolError),
    (b"VALUE k 1 3 9\r\nabc\r\nEND\r\n", ProtocolError),         # five fields
    (b"VALUE k 1\r\nabc\r\nEND\r\n", ProtocolError),             # three
    (b"VALUE k 1 %s\r\n" % (b"9" * 21), ProtocolError),          # 21 digits
    (b"VALUE k 1 1001\r\n", ProtocolError),                      # over MAX_VALUE_SIZE
    (b"VALUE x 1 3\r\nabc\r\nEND\r\n", ProtocolError),           # not asked for
    (b"VALUE k 1 3\r\nabc\r\nVALUE k 1 3\r\nabc\r\nEND\r\n", ProtocolError),  # twice
    (b"VALUE  k 1 3\r\nabc\r\nEND\r\n", ProtocolError),          # two spaces
    (b"VALUE k\r 1 3\r\nabc\r\nEND\r\n", ProtocolError),         # a lone CR in the key
    (b"VALUE k 1 3\r\nabcd\r\nEND\r\n", ProtocolError),          # block longer than declared
    (b"VALUE k 1 3\r\nabc\r\nEND\r\nVALUE", ProtocolError),      # data after END
    (b"SERVER_ERROR out of memory\r\n", ErrorReply),
    (b"ERROR\r\n", ErrorReply),
])
def test_a_malformed_multi_value_reply_is_a_protocol_error(reply, error):
    with pytest.raises(error):
        _parse(reply)
