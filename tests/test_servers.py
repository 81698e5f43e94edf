"""Placement identical to pymemcache's HashClient; blacklist with an injected clock."""

import doctest
import logging
import random
import string

import pytest
from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash

from djmemcache import servers
from djmemcache.servers import Blacklist, Rendezvous, parse_server


def test_parse_server_doctests():
    result = doctest.testmod(servers)
    assert result.failed == 0 and result.attempted > 0


def test_node_names_match_pymemcache_hashclient():
    specs = ["10.0.0.1:11211", "cache.local", "[::1]:11311", "unix:/run/mc.sock", "/tmp/x.sock"]
    client = HashClient(specs)
    try:
        assert sorted(parse_server(s).node for s in specs) == sorted(client.clients)
    finally:
        client.close()


def _random_keys(n, seed=7):
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + ":_-."
    keys = [":1:" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    keys += [":1:Iñtërnâtiônàlizætiøn", ":1:ąćęłńóśźż", ":1:清清", ":1:😀key", ""]
    return keys


@pytest.mark.parametrize("use_c", [True, False])
def test_placement_matches_pymemcache_rendezvous_over_100000_keys(use_c):
    nodes = ["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"]
    theirs = RendezvousHash(nodes=list(nodes))
    ours = Rendezvous(nodes, use_c=use_c)
    everyone = (0, 1, 2)
    n = 100_000 if use_c else 5_000
    mismatches = [k for k in _random_keys(n) if nodes[ours.choose(k, everyone)] != theirs.get_node(k)]
    assert mismatches == []


def test_placement_over_remaining_servers_matches_pymemcache_after_removal():
    nodes = ["a:1", "b:2", "c:3", "d:4"]
    theirs = RendezvousHash(nodes=list(nodes))
    theirs.remove_node("b:2")
    ours = Rendezvous(nodes)
    for key in _random_keys(5_000):
        assert nodes[ours.choose(key, (0, 2, 3))] == theirs.get_node(key)


def test_single_live_server_is_chosen_without_hashing():
    assert Rendezvous(["a:1", "b:2"]).choose("anything", (1,)) == 1


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_blacklist_bans_for_the_configured_time_then_allows_one_probe():
    clock = FakeClock()
    bl = Blacklist(["a:1", "b:2"], blacklist_time=30, clock=clock)
    assert bl.live == (0, 1)
    assert bl.ban(1, "timed out") is True
    assert bl.live == (0,) and bl.next_probe == 1030.0
    assert bl.claim_probe() is None  # period not over
    clock.now = 1030.0
    assert bl.claim_probe() == 1
    assert bl.claim_probe() is None  # only one caller probes
    bl.restore(1)
    assert bl.live == (0, 1) and bl.next_probe is None


def test_failed_probe_restarts_the_period():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=10, clock=clock)
    bl.ban(0, "connection refused")
    clock.now += 10
    assert bl.claim_probe() == 0
    assert bl.ban(0, "probe failed") is False  # still banned: no new state
    assert bl.state(0) == (clock.now + 10, "probe failed")
    assert bl.live == ()


def test_blacklist_logs_state_changes_only(caplog):
    bl = Blacklist(["a:1"], blacklist_time=10, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="djmemcache"):
        bl.ban(0, "timed out")
        bl.ban(0, "timed out")
        bl.ban(0, "timed out")
        bl.restore(0)
        bl.restore(0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "a:1 blacklisted for 10s: timed out" in messages[0]
    assert "a:1 is back in service" in messages[1]
