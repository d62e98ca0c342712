"""The embedded broker: a Redis-compatible server on 127.0.0.1, backed by fakeredis.

Celery, kombu and redis-py talk to it over a real TCP socket, exactly as they
talk to redis-server, so nothing in a lesson knows which one it got.

Why not fakeredis's own ``TcpFakeServer``: it closes the connection after any
error reply (kombu sends ``EVALSHA`` first and expects ``NOSCRIPT``), and its
replies wait on Nagle's algorithm (about 90 ms a task). This front end keeps
connections open on errors, sets ``TCP_NODELAY``, and works like redis-server:

- one event-loop thread reads every connection and runs their commands one at
  a time: each connection's commands in order and, like redis-server, commands
  of two connections that arrive together in the order epoll reports them. (So
  a result's PUBLISH can overtake a SUBSCRIBE sent just before it on another
  connection, on redis-server too: ``labkit.checks.result_of`` waits in slices
  that re-read the stored state, and bench/results_pubsub.py measures it);
- a blocking command (``BRPOP`` and friends) runs on a thread of its own
  client, so the loop goes on serving the others meanwhile;
- replies, and pushed pub/sub messages, are sent the moment they exist;
- a client that hangs up while blocked (a worker that was killed) has its
  ``BRPOP`` cancelled at once, so the next message pushed to that list is not
  handed to a dead connection and lost.
"""

from __future__ import annotations

import argparse
import collections
import select
import selectors
import signal
import socket
import ssl
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import fakeredis
from fakeredis._clients._sync import FakeRedisConnection
from fakeredis._clients._tcp_server import encode_reply  # pinned: fakeredis==2.40.0

from labkit.procs import ChildProcess, ProcessError, free_port, port_open
from labkit.tls import TLSFrontDoor, certificates

__all__ = ["EmbeddedBroker", "broker_process", "is_reachable", "same_redis", "with_db"]

_JOIN_TIMEOUT = 5.0
_SEND_TIMEOUT = 10.0  # a client that reads nothing for this long is dropped
BLOCKING_COMMANDS = {b"BLPOP", b"BRPOP", b"BRPOPLPUSH", b"BLMOVE", b"BLMPOP", b"BZPOPMIN", b"BZPOPMAX", b"BZMPOP", b"WAIT"}


def split_commands(buffer: bytearray) -> list[list[bytes]]:
    """Take every complete RESP command (an array of bulk strings) off the front of ``buffer``."""
    commands = []
    while buffer:
        if buffer[:1] != b"*":
            raise ValueError("Protocol error: expected '*'")
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        count, position, fields = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0 or buffer[position : position + 1] != b"$":
                if end >= 0:
                    raise ValueError("Protocol error: expected '$'")
                break
            length = int(buffer[position + 1 : end])
            start, stop = end + 2, end + 2 + length
            if len(buffer) < stop + 2:
                break
            fields.append(bytes(buffer[start:stop]))
            position = stop + 2
        if len(fields) < count:
            break  # incomplete: wait for more bytes
        del buffer[:position]
        commands.append(fields)
    return commands


def _encode(fields: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(fields) + b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)


def is_blocking(fields: list[bytes]) -> bool:
    name = fields[0].upper() if fields else b""
    if name in BLOCKING_COMMANDS:
        return True
    return name in (b"XREAD", b"XREADGROUP") and any(f.upper() == b"BLOCK" for f in fields[1:])


WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."  # redis-server's text


def _credentials(fields: list[bytes]) -> tuple[bytes, bytes] | None:
    """(user, password) of an ``AUTH`` or ``HELLO … AUTH`` command, else None."""
    name = fields[0].upper() if fields else b""
    if name == b"AUTH" and len(fields) in (2, 3):
        return (b"default", fields[1]) if len(fields) == 2 else (fields[1], fields[2])
    if name == b"HELLO" and len(fields) >= 5 and fields[2].upper() == b"AUTH":
        return fields[3], fields[4]
    return None


class _Replies:
    """Stands in for the fake socket's reply queue: each reply is sent at once.

    Replies come from the loop thread, from the client's blocking-command
    thread, and (pushed pub/sub messages) from a publisher's command. The lock
    keeps each one whole.
    """

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.lock = threading.Lock()

    def put(self, reply: Any) -> None:
        data = memoryview(encode_reply(reply, self.client.fake._client_info.protocol_version))
        with self.lock:
            try:
                while data:
                    try:
                        data = data[self.client.sock.send(data) :]
                    except BlockingIOError:
                        if not select.select([], [self.client.sock], [], _SEND_TIMEOUT)[1]:
                            raise TimeoutError("the client reads nothing") from None
            except OSError:
                # The peer has gone, or stopped reading. This may run inside a command, under
                # fakeredis's lock: only shut the socket, and the loop hangs the client up.
                self.client.shut()

    def qsize(self) -> int:
        return 0


class _Client:
    """One TCP connection: its socket, its fake-redis connection, and a thread while it blocks."""

    def __init__(self, server: EmbeddedBroker, sock: socket.socket, address: Any) -> None:
        self.server = server
        self.authenticated = server.credentials is None  # no password: every client may talk
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
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
        self._kill_fake = self.fake.kill
        self.fake.kill = self._killed
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.queued: collections.deque[list[bytes]] = collections.deque()  # for the blocking thread
        self.busy = False  # a blocking command (or what came after it) is running on self.thread
        self.closed = False
        self.killed = False  # by CLIENT KILL
        self.thread: threading.Thread | None = None

    def on_readable(self) -> None:
        """Runs on the loop thread when the socket has data (or the peer hung up)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or self.killed:
            self.hang_up()
            return
        self.buffer += data
        try:
            commands = split_commands(self.buffer)
        except ValueError as exc:  # like redis-server: reply, then hang up
            self.fake.responses.put(fakeredis._helpers.SimpleError(f"ERR {exc}"))
            self.hang_up()
            return
        for fields in commands:
            with self.lock:
                if self.busy or is_blocking(fields):
                    self._hand_over(fields)
                    continue
            self._run(fields)

    def _killed(self) -> None:
        """CLIENT KILL chose this client: like redis-server, close its connection.

        fakeredis alone only marks it, and answers its next command with an error
        reply; a real server closes the socket, which is what redis-py and kombu's
        health checks expect (a ConnectionError). Closing the read side makes the
        loop see the end of input and hang the client up, after any reply in flight.
        """
        self._kill_fake()
        self.killed = True  # whatever it sends from now on is never run
        try:
            self.sock.shutdown(socket.SHUT_RD)  # wakes the loop, which hangs the client up
        except OSError:
            pass

    def _refused(self, fields: list[bytes]) -> bool:
        """Answer AUTH (and check HELLO … AUTH) here, and NOAUTH before it, as redis-server does."""
        given = _credentials(fields)
        if given is not None:
            if not self.server.accepts(*given):
                self.fake.responses.put(fakeredis._helpers.SimpleError(WRONGPASS))
                return True
            self.authenticated = True
            self.fake._client_info["user"] = given[0].decode()
            if fields[0].upper() == b"AUTH":
                self.fake.responses.put(b"OK")  # a top-level bytes reply goes out as +OK
                return True
            del fields[2:5]  # HELLO <protocol> [SETNAME …]: fakeredis answers the rest
            return False
        if not self.authenticated and fields[0].upper() not in (b"HELLO", b"QUIT"):
            self.fake.responses.put(fakeredis._helpers.SimpleError("NOAUTH Authentication required."))
            return True
        return False

    def _run(self, fields: list[bytes]) -> None:
        if self.killed or self._refused(fields):
            return
        try:
            self.fake.sendall(_encode(fields))
        except Exception as exc:  # the connection was killed (CLIENT KILL) or broke
            self.fake.responses.put(exc)
            self.hang_up()
        if fields[0].upper() == b"SELECT":
            # fakeredis leaves CLIENT LIST's db=0 for ever; redis-server shows the selected database,
            # which a stopping test worker relies on to CLIENT UNBLOCK its BRPOP on database 15.
            self.fake._client_info["db"] = self.fake._db_num

    def _hand_over(self, fields: list[bytes]) -> None:
        """Queue a command for this client's own thread (called with self.lock held)."""
        self.busy = True
        self.queued.append(fields)
        if self.thread is None:
            self.thread = threading.Thread(target=self._run_queued, name="labkit-broker-blocking", daemon=True)
            self.thread.start()
        self.work.notify()

    def _run_queued(self) -> None:
        """This client's commands from its first blocking one on, in order, off the loop thread."""
        while True:
            with self.lock:
                while not self.queued and not self.closed:
                    self.busy = False  # caught up: the loop may run this client's commands again
                    self.work.wait()
                if self.closed:
                    break
                fields = self.queued.popleft()
            self._run(fields)
        self._release()

    def shut(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the loop sees the end of input
        except OSError:
            pass

    def hang_up(self) -> None:
        """The peer has gone (or we stop): cancel what blocks, then free everything."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.work.notify()
            has_thread = self.thread is not None
        self.server._forget(self)
        self.cancel_blocking_command()
        if not has_thread:
            self._release()

    def cancel_blocking_command(self) -> None:
        """Wake a blocked BRPOP with an empty reply, the way CLIENT UNBLOCK does."""
        with self.server.fake_server.lock:  # the lock a command holds
            if self.fake._blocked:
                self.fake._unblock_reason = b"timeout"
                self.fake._db.wake_all()

    def _release(self) -> None:
        self.fake.close()
        self.sock.close()


class EmbeddedBroker:
    """A Redis-compatible server in this process, on 127.0.0.1 and a free port.

    Use it as a context manager; ``url`` is what ``REDIS_URL`` should be::

        with EmbeddedBroker() as broker:
            app = Celery("demo", broker=broker.url, backend=broker.url)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        users: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``password``: like redis-server's ``requirepass`` (the ``default`` user's password);
        ``users``: more ACL users, ``{name: password}``, each allowed every command and key.
        With either, a client must AUTH before anything else (NOAUTH), and wrong credentials
        get redis-server's own WRONGPASS reply. ``tls``: a server context; the broker then also
        listens for TLS on a second port (``tls_url``, ``rediss://``), see labkit.tls."""
        self.tls = tls
        self._front_door: TLSFrontDoor | None = None
        self.credentials: dict[bytes, bytes] | None = None
        if password is not None or users:
            self.credentials = {name.encode(): secret.encode() for name, secret in (users or {}).items()}
            if password is not None:
                self.credentials[b"default"] = password.encode()
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.fake_server = fakeredis.FakeServer(version=(7, 4))
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # stop() writes, the loop wakes
        self._loop_thread: threading.Thread | None = None
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def accepts(self, user: bytes, password: bytes) -> bool:
        if self.credentials is None:
            return True  # like redis-server without requirepass: any AUTH succeeds for "default"
        return self.credentials.get(user) == password

    @property
    def tls_url(self) -> str:
        """The ``rediss://`` address of the TLS port (started with ``tls=``)."""
        if self._front_door is None:
            raise RuntimeError("the embedded broker was not started with tls=")
        return f"rediss://{self.host}:{self._front_door.port}/0"

    @property
    def url(self) -> str:
        """Where to connect, without credentials (add ``user:password@`` yourself)."""
        if self.port is None:
            raise RuntimeError("the embedded broker is not started")
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> EmbeddedBroker:
        self._listener = socket.create_server((self.host, self.requested_port), backlog=128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake[0], selectors.EVENT_READ, "wake")
        self._stopping.clear()
        self._loop_thread = threading.Thread(target=self._loop, name="labkit-broker-loop", daemon=True)
        self._loop_thread.start()
        if self.tls is not None:
            self._front_door = TLSFrontDoor(self.tls, self.port, self.host).start()
        return self

    def _loop(self) -> None:
        assert self._selector is not None
        while not self._stopping.is_set():
            for key, _ in self._selector.select():
                if key.data == "accept":
                    self._accept()
                elif isinstance(key.data, _Client):
                    try:
                        key.data.on_readable()
                    except Exception:  # a bug of ours in one client's command must not stop the broker
                        key.data.hang_up()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            client = _Client(self, sock, address)
            with self._lock:
                self._clients.add(client)
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)
            try:
                if self._selector is not None:
                    self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass

    def stop(self) -> None:
        """Close every connection and the port, and join every thread."""
        if self._loop_thread is None:
            return
        if self._front_door is not None:
            self._front_door.stop()
            self._front_door = None
        self._stopping.set()
        assert self._wake is not None and self._selector is not None
        self._wake[1].send(b"x")
        self._loop_thread.join(_JOIN_TIMEOUT)
        self._loop_thread = None
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.hang_up()
        for client in clients:
            if client.thread is not None:
                client.thread.join(_JOIN_TIMEOUT)
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        for sock in self._wake:
            sock.close()
        self._selector.close()

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
    """Run the embedded broker in a child process (``python -m labkit.broker``) and yield its URL.

    The grader uses this one: the broker gets a core and an interpreter lock of
    its own, like redis-server, so a busy test or a runaway task cannot slow it.
    The port is chosen here and the child is ready once it accepts connections.
    """
    for attempt in (1, 2):  # a port chosen here can be taken by someone else before the child binds it
        port = free_port()
        child = ChildProcess(
            [sys.executable, "-m", "labkit.broker", "--port", str(port)],
            name="embedded-broker",
            ready=port_open(port),
            start_timeout=start_timeout,
        )
        try:
            child.start()
        except ProcessError as exc:
            if attempt == 2 or "Address already in use" not in str(exc):
                raise RuntimeError(f"the embedded broker did not start: {exc}") from None
            continue
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            child.stop()
        return


def serve(
    port: int = 0,
    announce=print,
    password: str | None = None,
    users: dict[str, str] | None = None,
    tls_folder: Path | None = None,
) -> None:
    """Run the embedded broker in this process until SIGINT or SIGTERM.

    With ``tls_folder``, it also listens for TLS, with a throwaway CA written there.
    """
    context, ca_file = certificates(tls_folder) if tls_folder else (None, None)
    with EmbeddedBroker(port=port, password=password, users=users, tls=context) as server:
        announce(server.url)
        if ca_file is not None:
            announce(f"{server.tls_url} (TLS; clients trust {ca_file})")
        stop = threading.Event()
        # Ctrl-C, or SIGTERM from a script (background jobs ignore SIGINT).
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labkit.broker", description="The embedded Redis-compatible broker.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--requirepass", metavar="PASSWORD", help="the default user's password, as redis-server's")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="an ACL user (repeatable)")
    parser.add_argument("--tls", type=Path, metavar="FOLDER", help="also serve rediss://; the CA file goes in FOLDER")
    args = parser.parse_args(argv)
    users = dict(entry.split(":", 1) for entry in args.user)
    announce = lambda url: print(f"Embedded broker (fakeredis) listening on {url}", flush=True)  # noqa: E731
    serve(args.port, announce, password=args.requirepass, users=users, tls_folder=args.tls)


if __name__ == "__main__":
    main()
