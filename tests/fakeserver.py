"""A scripted stand-in for memcached, to play the hostile server in tests.

Each command the client sends (its line, and the data block of a storage
command) is answered by the next reply of the script, shared by all the
connections in the order commands arrive; once the script is used up, a
command gets the reply an empty memcached would give (END, STORED,
NOT_FOUND...). A reply is one of:

- ``bytes``: sent as they are;
- a callable ``reply(line, data)``: its result is the reply;
- a tuple of replies, acted on in turn (``(b"VALUE k 0 9\\r\\nabc", CLOSE)``);
- ``CLOSE``: the server closes the connection;
- ``SILENCE``: the server reads on and never answers this connection again;
- ``Dribble(data, every_ms, size)``: ``data`` in pieces of ``size`` bytes,
  one every ``every_ms`` milliseconds, until sent or the client hangs up.
"""

import collections
import socket
import threading
import time

CLOSE = "close"
SILENCE = "silence"
STORAGE = (b"set", b"add", b"replace", b"append", b"prepend", b"cas")
_POLL = 0.02  # seconds between checks of the stop flag

_DEFAULT = {b"get": b"END\r\n", b"gets": b"END\r\n", b"delete": b"NOT_FOUND\r\n",
            b"touch": b"NOT_FOUND\r\n", b"incr": b"NOT_FOUND\r\n", b"decr": b"NOT_FOUND\r\n",
            b"version": b"VERSION 1.6.0-fake\r\n", b"flush_all": b"OK\r\n"}


class Dribble:
    """Send ``data`` ``size`` bytes at a time, one piece every ``every_ms`` ms."""

    def __init__(self, data, every_ms=50, size=1):
        self.data, self.every, self.size = data, every_ms / 1000, size


def default_reply(line, data=None):
    command = line.split(b" ", 1)[0]
    return b"STORED\r\n" if command in STORAGE else _DEFAULT.get(command, b"ERROR\r\n")


class FakeMemcached:
    """A server on a free loopback port; ``reply(...)`` queues its answers."""

    def __init__(self, recv_buffer=None):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if recv_buffer is not None:  # inherited by what it accepts: a server that stops reading fills it soon
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.location = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self.received = []  # (command line, data block or None), in arrival order
        self.accepted = 0  # connections accepted so far
        self.replied = 0  # replies sent in full
        self._open = 0  # connections neither side has closed yet
        self._live = set()  # the sockets of those connections
        self._doomed = set()  # sockets to close on their next command (hang_up_existing)
        self._script = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def reply(self, *replies):
        """Queue replies, one per command to come."""
        with self._lock:
            self._script.extend(replies)
        return self

    def hang_up_existing(self):
        """Close each connection open now on its next command, as a NAT or
        firewall that dropped them does; new connections are served."""
        with self._lock:
            self._doomed |= self._live

    def close_existing_now(self):
        """Close each connection open now, at once, as a server that restarts does."""
        with self._lock:
            live = list(self._live)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop_listening(self):
        """Refuse new connections (a restarting proxy); open ones are still served."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # out of LISTEN now, even with accept() under way
        except OSError:
            pass
        self._listener.close()

    def forget(self):
        """Drop the replies not used (a call that failed before sending them all)."""
        with self._lock:
            self._script.clear()

    def commands(self):
        """The command words received so far (b"get", b"set"...)."""
        with self._lock:
            return [line.split(b" ", 1)[0] for line, _ in self.received]

    def wait_replied(self, count, timeout=10.0):
        """True once ``count`` replies have been sent in full."""
        deadline = time.monotonic() + timeout
        while self.replied < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.replied >= count

    def wait_all_closed(self, timeout=10.0):
        """True once every connection is closed (by the client or by a CLOSE)."""
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._open == 0

    def stop(self):
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    # -- the server side ------------------------------------------------------

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop_listening: wait for stop()
                self._stop.wait(_POLL)
                continue
            with self._lock:
                self.accepted += 1
                self._open += 1
                self._live.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        conn.settimeout(_POLL)
        reader = _Reader(conn, self._stop)
        try:
            while True:
                line = reader.line()
                if line is None:
                    return  # the client hung up
                data = None
                parts = line.split(b" ")
                if parts[0] in STORAGE and len(parts) >= 5 and parts[4].isdigit():
                    data = reader.exactly(int(parts[4]) + 2)
                    if data is None:
                        return
                    data = data[:-2]
                with self._lock:
                    if conn in self._doomed:
                        return
                    self.received.append((line, data))
                    reply = self._script.popleft() if self._script else default_reply
                if callable(reply):
                    reply = reply(line, data)
                for part in reply if isinstance(reply, tuple) else (reply,):
                    if part == CLOSE:
                        return
                    if part == SILENCE:
                        while reader.more():  # read and drop until the client hangs up
                            pass
                        return
                    if not _send(conn, part, self._stop):
                        return
                with self._lock:
                    self.replied += 1
        finally:
            conn.close()
            with self._lock:
                self._open -= 1
                self._live.discard(conn)
                self._doomed.discard(conn)


def _send(conn, reply, stop):
    """Send a reply; False once the client has gone or the server stops."""
    try:
        if not isinstance(reply, Dribble):
            conn.sendall(reply)
            return True
        for start in range(0, len(reply.data), reply.size):
            if stop.wait(reply.every):
                return False
            conn.sendall(memoryview(reply.data)[start:start + reply.size])
        return True
    except OSError:
        return False


class _Reader:
    """Buffered reads of one connection that give up when the server stops."""

    def __init__(self, conn, stop):
        self.conn, self.stop, self.buf = conn, stop, b""

    def more(self):
        """Read what arrives next into the buffer; False on EOF or stop."""
        while not self.stop.is_set():
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return False
            self.buf += chunk
            return bool(chunk)
        return False

    def line(self):
        while b"\r\n" not in self.buf:
            if not self.more():
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, size):
        while len(self.buf) < size:
            if not self.more():
                return None
        data, self.buf = self.buf[:size], self.buf[size:]
        return data
