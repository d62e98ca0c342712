"""The embedded broker: a Redis-compatible server on 127.0.0.1, backed by fakeredis.

Celery, kombu and redis-py talk to it over a real TCP socket, exactly as they
talk to redis-server, so nothing in a lesson knows which one it got.

Why not fakeredis's own ``TcpFakeServer``: it closes the connection after any
error reply (kombu sends ``EVALSHA`` first and expects ``NOSCRIPT``), and its
replies wait on Nagle's algorithm (about 90 ms a task). This front end keeps
the connection open on errors, sets ``TCP_NODELAY`` and runs one thread per
client connection that reads commands with a blocking ``recv``, runs them, and
sends every reply (and every pushed pub/sub message) the moment it exists.

A watchdog thread looks at the clients blocked in ``BRPOP``: when one has hung
up (a worker that was killed), its pop is cancelled, so the next message pushed
to that list is not handed to a dead connection and lost.
"""

from __future__ import annotations

import ctypes
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from typing import Any, Iterator

import fakeredis
from fakeredis._clients._sync import FakeRedisConnection
from fakeredis._clients._tcp_server import encode_reply  # pinned: fakeredis==2.40.0

__all__ = ["EmbeddedBroker", "broker_process", "is_reachable", "same_redis", "with_db"]

_JOIN_TIMEOUT = 5.0
_WATCH_INTERVAL = 0.1  # how often blocked clients are checked for a hang-up


class _Replies:
    """Stands in for the fake socket's reply queue: each reply is sent at once.

    Replies to a client's own commands come from its thread; pushed pub/sub
    messages come from the publisher's thread. The lock keeps them whole.
    """

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.lock = threading.Lock()

    def put(self, reply: Any) -> None:
        data = encode_reply(reply, self.client.fake._client_info.protocol_version)
        with self.lock:
            try:
                self.client.sock.sendall(data)
            except OSError:
                pass  # the peer has gone; its thread notices on its next recv

    def qsize(self) -> int:
        return 0


class _Client:
    """One TCP client: its socket, its fake-redis connection and one thread."""

    def __init__(self, server: EmbeddedBroker, sock: socket.socket, address: Any) -> None:
        self.server = server
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Keep the connection object: when it is garbage-collected it closes its socket.
        # RESP2 until the client itself sends HELLO, as with a real server.
        self.connection = FakeRedisConnection(
            server=server.fake_server,
            protocol=2,
            # "ip:port", as redis-server writes them in CLIENT LIST/INFO (a tuple's repr breaks parsers).
            client_info={"laddr": "%s:%d" % sock.getsockname()[:2], "addr": "%s:%d" % address[:2], "fd": sock.fileno()},
        )
        self.fake = self.connection.get_socket()
        self.fake.responses = _Replies(self)
        self.thread = threading.Thread(target=self._serve, name=f"labkit-broker-{address[1]}", daemon=True)

    def _serve(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.fake.sendall(data)  # runs the commands; a BRPOP blocks here
        except OSError:
            pass  # reset by the peer, or shut down by stop()
        except Exception as exc:  # a protocol error: like redis-server, reply and hang up
            self.fake.responses.put(exc)
        finally:
            self.fake.close()
            self.sock.close()
            self.server._forget(self)

    def hung_up(self) -> bool:
        """True when the peer has closed its end (asked while it is blocked, so nothing else reads)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def cancel_blocking_command(self) -> None:
        """Wake a blocked BRPOP with an empty reply, the way CLIENT UNBLOCK does."""
        with self.server.fake_server.lock:  # the lock a command holds
            if self.fake._blocked:
                self.fake._unblock_reason = b"timeout"
                self.fake._db.wake_all()

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes recv()
        except OSError:
            pass
        self.cancel_blocking_command()


class EmbeddedBroker:
    """A Redis-compatible server in this process, on 127.0.0.1 and a free port.

    Use it as a context manager; ``url`` is what ``REDIS_URL`` should be::

        with EmbeddedBroker() as broker:
            app = Celery("demo", broker=broker.url, backend=broker.url)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.fake_server = fakeredis.FakeServer(version=(7, 4))
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded broker is not started")
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> EmbeddedBroker:
        self._listener = socket.create_server((self.host, self.requested_port), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._accept, name="labkit-broker-accept", daemon=True),
            threading.Thread(target=self._watch_blocked_clients, name="labkit-broker-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError:  # the listener was shut down: stop accepting
                return
            client = _Client(self, sock, address)
            with self._lock:
                self._clients.add(client)
            client.thread.start()

    def _watch_blocked_clients(self) -> None:
        while not self._stopping.wait(_WATCH_INTERVAL):
            with self._lock:
                blocked = [client for client in self._clients if client.fake._blocked]
            for client in blocked:
                if client.hung_up():
                    client.cancel_blocking_command()

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def stop(self) -> None:
        """Close every connection and the port, and join every thread."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.stop()
        for thread in self._threads + [client.thread for client in clients]:
            thread.join(_JOIN_TIMEOUT)
        self._threads = []

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def with_db(url: str, db: int) -> str:
    """The same Redis URL, pointing at database ``db``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


def same_redis(url_a: str | None, url_b: str | None) -> bool:
    """True when two Redis URLs name the same server and database."""
    if not url_a or not url_b:
        return False
    a, b = urllib.parse.urlsplit(url_a), urllib.parse.urlsplit(url_b)
    db = lambda parts: parts.path.strip("/") or "0"  # noqa: E731
    return (a.scheme, a.hostname, a.port or 6379, db(a)) == (b.scheme, b.hostname, b.port or 6379, db(b))


def is_reachable(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


@contextmanager
def broker_process(start_timeout: float = 20.0) -> Iterator[str]:
    """Run the embedded broker in a child process and yield its URL.

    The grader uses this one: the broker gets a core and an interpreter lock of
    its own, like redis-server, so a busy test or a runaway task cannot slow it.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "labkit", "broker"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], start_timeout)
        first_line = process.stdout.readline() if readable else ""
        match = re.search(r"redis://\S+", first_line)
        if not match:
            raise RuntimeError(f"the embedded broker did not start within {start_timeout:.0f} s: {first_line!r}")
        yield match.group(0)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _die_with_parent() -> None:  # runs in the child, before exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
