"""TIMEOUT ends a call however the process is interrupted and however much the server sends."""

import signal
import threading
import time

from fakeserver import SILENCE

SLACK = 3.0  # a loaded 2-core machine stalls threads for seconds at times


def test_periodic_signals_do_not_restart_the_timeout_of_a_call_to_a_hung_server(
        memcached_factory, make_cache):
    """A profiler's or watchdog's periodic signal used to restart the kernel
    receive timeout each time: a get on a hung server lasted until the signals
    stopped (6.5 s with TIMEOUT 0.5 and a 100 ms timer)."""
    server = memcached_factory()
    cache = make_cache(server.location, {"TIMEOUT": 0.5})
    cache.set("k", "v")
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    server.pause()
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        started = time.monotonic()
        assert cache.get("k", "missed") == "missed"
        took = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        server.resume()
    assert len(ticks) >= 3  # the call was interrupted, repeatedly
    assert took < 0.5 + SLACK


def test_a_signal_during_the_blocking_first_read_runs_its_handler_and_the_reply_is_still_read(
        fake_memcached, make_cache):
    """A one-server command waits for its reply in one blocking recv (bounded
    by SO_RCVTIMEO = TIMEOUT). A signal ends that recv early: its handler must
    run, and the call must go on reading the same reply, not call it a miss."""
    def slow_value(line, data):
        time.sleep(0.3)
        return b"VALUE %s 0 5\r\nhello\r\nEND\r\n" % line.split(b" ")[1]

    cache = make_cache(fake_memcached.location, {"TIMEOUT": 2.0})
    fake_memcached.reply(slow_value)
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        value = cache.get("k")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(ticks) >= 2
    assert value == b"hello"
    assert cache.stats()[0]["in_use"] == 0 and cache.stats()[0]["state"] == "up"


def test_the_blocking_first_read_ends_at_timeout_on_a_silent_server(fake_memcached, make_cache):
    fake_memcached.reply(SILENCE)
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 0.3})
    started = time.monotonic()
    assert cache.get("k", "missed") == "missed"
    took = time.monotonic() - started
    assert 0.3 * 0.9 <= took < 0.3 + SLACK
    assert cache.stats()[0]["in_use"] == 0


def test_a_reply_flooding_in_ends_at_twice_timeout_without_starving_other_threads(
        fake_memcached, make_cache):
    """A server answering a set_many of 10,000 keys with 40 MB of long lines
    held the call for 104 s (counted again per chunk, deadline unchecked while
    bytes kept coming), and the GIL with it."""
    keys = 10_000
    fake_memcached.reply((b"A" * 4000 + b"\r\n") * (keys - 1), SILENCE)
    cache = make_cache(fake_memcached.location, {"TIMEOUT": 0.5})
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.wait(0.01):
            ticks.append(1)

    thread = threading.Thread(target=ticker)
    thread.start()
    started = time.monotonic()
    try:
        failed = cache.set_many({"k%d" % i: 1 for i in range(keys)})
    finally:
        took = time.monotonic() - started
        stop.set()
        thread.join()
    assert len(failed) == keys
    assert took < 2 * 0.5 + SLACK
    assert len(ticks) >= took * 100 / 4  # the other thread kept running
    assert cache.stats()[0]["in_use"] == 0
