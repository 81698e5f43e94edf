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
    keys += [":1:" + "long" * 200, ":1:" + "清" * 600]  # past the C placement's stack buffer
    return keys


# Placement three ways: _speedups (C murmur3), mmh3, pymemcache's pure Python.
IMPLS = ["native", "mmh3", "pure"]


def _ring(nodes, impl):
    if impl == "native" and servers._speedups is None:
        pytest.skip("djmemcache._speedups is not built")
    ring = Rendezvous(nodes, use_c=impl != "pure", native=impl == "native")
    assert (ring._native is not None) == (impl == "native")
    return ring


@pytest.mark.parametrize("impl", IMPLS)
def test_placement_matches_pymemcache_rendezvous_over_100000_keys(impl):
    nodes = ["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"]
    theirs = RendezvousHash(nodes=list(nodes))
    ours = _ring(nodes, impl)
    everyone = (0, 1, 2)
    n = 100_000 if impl != "pure" else 5_000
    mismatches = [k for k in _random_keys(n) if nodes[ours.choose(k, everyone)] != theirs.get_node(k)]
    assert mismatches == []


def test_placement_over_remaining_servers_matches_pymemcache_after_removal():
    nodes = ["a:1", "b:2", "c:3", "d:4"]
    theirs = RendezvousHash(nodes=list(nodes))
    theirs.remove_node("b:2")
    ours = Rendezvous(nodes)
    for key in _random_keys(5_000):
        assert nodes[ours.choose(key, (0, 2, 3))] == theirs.get_node(key)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nodes, live", [
    (["127.0.0.1:11211", "127.0.0.1:11212", "127.0.0.1:11213"], (0, 1, 2)),
    (["a:1", "b:2", "c:3", "d:4"], (0, 2, 3)),
    (["a:1", "a:1", "b:2"], (0, 1, 2)),  # equal names, equal scores: the tie-break decides
    (["a:1", "b:2"], (1,)),
])
def test_batch_placement_puts_every_key_where_choose_does(impl, nodes, live):
    ours = _ring(nodes, impl)
    keys = _random_keys(20_000 if impl != "pure" else 2_000)
    expected = {}
    for key in keys:
        expected.setdefault(ours.choose(key, live), []).append(key)
    # A fresh ring: group's own placement, not what choose left in the memo.
    assert _ring(nodes, impl).group(keys, live) == expected
    assert ours.group(keys, live) == expected  # and from the memo


@pytest.mark.parametrize("impl", IMPLS)
def test_remembered_placement_follows_the_live_servers(impl):
    nodes = ["a:1", "b:2", "c:3", "d:4"]
    everyone = RendezvousHash(nodes=list(nodes))
    without_b = RendezvousHash(nodes=list(nodes))
    without_b.remove_node("b:2")
    ours = _ring(nodes, impl)
    keys = _random_keys(servers.PLACEMENT_MEMO + 500 if impl != "pure" else 1_000)
    for live, theirs in [((0, 1, 2, 3), everyone), ((0, 2, 3), without_b), ([0, 1, 2, 3], everyone)]:
        for _ in range(2):  # placed, then remembered
            assert [nodes[ours.choose(k, live)] for k in keys] == [theirs.get_node(k) for k in keys]
            grouped = ours.group(keys, live)
            assert {key: nodes[i] for i, members in grouped.items() for key in members} == {
                k: theirs.get_node(k) for k in keys}


def test_single_live_server_is_chosen_without_hashing():
    assert Rendezvous(["a:1", "b:2"]).choose("anything", (1,)) == 1


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_banned_server_is_probed_after_a_second_by_one_caller_only():
    clock = FakeClock()
    bl = Blacklist(["a:1", "b:2"], blacklist_time=30, clock=clock)
    assert bl.live == (0, 1)
    assert bl.ban(1, "timed out") is True
    assert bl.live == (0,) and bl.next_probe == 1001.0
    assert bl.claim_probe(hold=5) == []  # not due yet
    clock.now = 1001.0
    assert bl.claim_probe(hold=5) == [1]
    assert bl.claim_probe(hold=5) == []  # only one caller probes
    assert bl.next_probe == 1006.0  # the claim holds it while the probe runs
    bl.restore(1)
    assert bl.live == (0, 1) and bl.next_probe is None


def test_failed_probes_back_off_exponentially_up_to_blacklist_time():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=10, clock=clock)
    bl.ban(0, "connection refused")
    delays = []
    for _ in range(6):
        clock.now = bl.next_probe
        assert bl.claim_probe(hold=5) == [0]
        bl.probe_failed(0, "probe failed: connection refused")
        delays.append(bl.next_probe - clock.now)
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert bl.report(0)[:2] == (clock.now + 10, "probe failed: connection refused")
    assert bl.live == ()
    bl.restore(0)
    clock.now += 10  # in service for BLACKLIST_TIME (its last delay): healthy again
    assert bl.ban(0, "timed out") and bl.next_probe == clock.now + 1.0  # back-off starts over


def _restored_then_banned(bl, clock, in_service):
    """The probe due passes; ``in_service`` seconds later a call times out:
    the delay until the next probe."""
    clock.now = bl.next_probe
    assert bl.claim_probe(hold=5) == [0]
    bl.restore(0)
    clock.now += in_service
    assert bl.ban(0, "timed out")
    return bl.next_probe - clock.now


def test_a_server_banned_again_soon_after_its_probe_passed_keeps_its_back_off():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=30, clock=clock)
    bl.ban(0, "timed out")
    delays = [_restored_then_banned(bl, clock, 0.5) for _ in range(6)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert _restored_then_banned(bl, clock, 29) == 30.0  # less than its last delay: not settled
    assert _restored_then_banned(bl, clock, 30) == 1.0  # in service that long: starts over


def test_back_off_after_a_passed_probe_settles_after_ten_seconds_when_delays_are_short():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=60, clock=clock)
    bl.ban(0, "timed out")
    assert _restored_then_banned(bl, clock, 9.9) == 2.0  # within settle_time: the same fault
    assert _restored_then_banned(bl, clock, 10.0) == 1.0


def test_a_ban_while_banned_keeps_the_probe_schedule():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=10, clock=clock)
    bl.ban(0, "timed out")
    clock.now += 0.5
    assert bl.ban(0, "timed out") is False  # a late failure of a call already under way
    assert bl.next_probe == 1001.0


def test_blacklist_time_zero_never_bans():
    bl = Blacklist(["a:1"], blacklist_time=0, clock=FakeClock())
    assert bl.ban(0, "timed out") is False and bl.live == (0,)


def test_a_probe_claimed_by_a_parent_process_is_claimed_again_in_the_child():
    clock = FakeClock()
    bl = Blacklist(["a:1"], blacklist_time=10, clock=clock)
    bl.ban(0, "timed out")
    clock.now += 1
    assert bl.claim_probe(hold=5) == [0]
    bl._banned[0].prober = -1  # as a forked child sees its parent's claim
    assert bl.claim_probe(hold=5) == [0]


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
    assert "a:1 blacklisted (first probe in 1.0s): timed out" in messages[0]
    assert "a:1 is back in service" in messages[1]
