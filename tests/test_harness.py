"""The test harness itself: real memcached and twemproxy processes, real faults."""

import socket

import pytest

from helpers import raw_command


def roundtrip(location, key=b"k", value=b"v"):
    stored = raw_command(location, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value), until=b"\r\n")
    assert stored == b"STORED\r\n"
    return raw_command(location, b"get %s\r\n" % key)


def test_shared_servers_listen_on_distinct_loopback_ports(mc3):
    assert len({server.port for server in mc3}) == 3
    for server in mc3:
        assert server.location == "127.0.0.1:%d" % server.port
        assert roundtrip(server.location) == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_a_test_may_break_the_shared_servers(mc3):
    mc3[1].kill()
    mc3[2].pause()


def test_shared_servers_are_revived_and_flushed_for_the_next_test(mc3):
    for server in mc3:
        assert server.running
        assert raw_command(server.location, b"get k\r\n") == b"END\r\n"


def test_stats_are_parsed_with_numbers_as_ints(mc1):
    roundtrip(mc1.location)
    stats = mc1.stats()
    assert stats["pid"] == mc1.pid
    assert isinstance(stats["curr_items"], int) and stats["curr_items"] >= 1
    assert isinstance(stats["version"], str)


def test_flush_empties_the_server(mc1):
    roundtrip(mc1.location)
    mc1.flush()
    assert raw_command(mc1.location, b"get k\r\n") == b"END\r\n"


def test_a_paused_server_accepts_but_does_not_answer_until_resumed(memcached_factory):
    server = memcached_factory()
    server.pause()
    with pytest.raises(socket.timeout):
        raw_command(server.location, b"version\r\n", until=b"\r\n", timeout=0.5)
    server.resume()
    assert raw_command(server.location, b"version\r\n", until=b"\r\n").startswith(b"VERSION ")


def test_restart_keeps_the_same_port(memcached_factory):
    server = memcached_factory()
    port, pid = server.port, server.pid
    roundtrip(server.location)
    server.restart()
    assert server.port == port and server.pid != pid
    assert raw_command(server.location, b"get k\r\n") == b"END\r\n"  # a new, empty memcached


def test_restart_after_a_kill_keeps_the_same_port(memcached_factory):
    server = memcached_factory()
    port = server.port
    server.kill()
    assert not server.running
    with pytest.raises(OSError):
        raw_command(server.location, b"version\r\n", until=b"\r\n", timeout=1)
    server.restart()
    assert server.port == port
    assert roundtrip(server.location) == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_stop_is_idempotent_and_works_on_a_paused_server(memcached_factory):
    server = memcached_factory()
    server.pause()
    server.stop()
    server.stop()
    server.kill()
    assert not server.running


def test_unix_socket_server(unix_memcached):
    assert unix_memcached.location.startswith("unix:/")
    assert unix_memcached.port is None
    assert roundtrip(unix_memcached.location) == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_ipv6_loopback_server(ipv6_memcached):
    assert ipv6_memcached.location == "[::1]:%d" % ipv6_memcached.port
    assert roundtrip(ipv6_memcached.location) == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_a_key_set_through_one_twemproxy_is_read_through_another(memcached_factory, twemproxy_factory):
    servers = [memcached_factory() for _ in range(3)]
    first, second = twemproxy_factory(servers), twemproxy_factory(servers)
    keys = [b"key-%d" % i for i in range(30)]
    for key in keys:
        reply = raw_command(first.location, b"set %s 0 0 1\r\nx\r\n" % key, until=b"\r\n")
        assert reply == b"STORED\r\n"
    for key in keys:
        assert raw_command(second.location, b"get %s\r\n" % key) == b"VALUE %s 0 1\r\nx\r\nEND\r\n" % key
    # the items live in the memcached servers behind the proxies
    assert sum(server.stats()["curr_items"] for server in servers) == len(keys)
