"""The embedded broker speaks enough Redis, over real TCP, for redis-py, kombu and Celery.

Most checks share one ``EmbeddedBroker`` for the module and empty it first; the
checks about stopping and about the child process start their own.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import redis
from celery import Celery, chord, group
from redis.backoff import NoBackoff
from redis.retry import Retry

from labkit.checks import wait_until
from labkit.broker import EmbeddedBroker, broker_process
from labkit.workers import thread_worker

WAIT = 5.0  # the bound on every wait in this file, in seconds


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as server:
        yield server


@pytest.fixture
def url(broker) -> str:
    client = redis.Redis.from_url(broker.url, socket_timeout=WAIT)
    client.flushall()
    client.close()
    return broker.url


@pytest.fixture
def r(url):
    client = redis.Redis.from_url(url, socket_timeout=WAIT, decode_responses=True)
    yield client
    client.close()


def blocked_clients(broker: EmbeddedBroker) -> int:
    """How many connections are parked in a blocking command (the broker's own view)."""
    with broker._lock:
        return sum(1 for client in broker._clients if client.fake._blocked)


def resp_command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def pids_of_children(parent: int) -> dict[int, str]:
    """{pid: command line} of the live (not zombie) children of ``parent``, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            found[int(entry)] = cmdline
    return found


def process_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- plain Redis over TCP -----------------------------------------------------


def test_plain_commands(r):
    assert r.set("greeting", "hello") is True
    assert r.get("greeting") == "hello"
    assert r.incr("counter") == 1
    assert r.incr("counter", 41) == 42
    assert r.expire("greeting", 100) is True
    assert 0 < r.ttl("greeting") <= 100
    assert r.ttl("counter") == -1
    assert r.hset("user:1", mapping={"name": "ada", "lang": "py"}) == 2
    assert r.hgetall("user:1") == {"name": "ada", "lang": "py"}
    assert r.lpush("jobs", "a", "b", "c") == 3
    assert r.lrange("jobs", 0, -1) == ["c", "b", "a"]
    assert r.delete("greeting", "counter", "missing") == 2
    assert r.get("greeting") is None


def test_client_list_and_info_show_ip_port_addresses(url, r):
    info = r.client_info()  # redis-py parses "addr=ip:port ..."; a Python tuple there breaks it
    assert info["addr"].startswith("127.0.0.1:") and info["addr"].rsplit(":", 1)[1].isdigit()
    assert info["laddr"] == url.split("//")[1].split("/")[0]
    assert info["addr"] in {entry["addr"] for entry in r.client_list()}


def test_client_list_shows_the_database_each_client_selected(url):
    on_15 = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/15", socket_timeout=WAIT, single_connection_client=True)
    try:
        listed = {entry["id"]: entry["db"] for entry in on_15.client_list()}
        assert listed[str(on_15.client_id())] == "15"  # labkit.workers unblocks the BRPOPs of its own database
    finally:
        on_15.close()


def test_multi_exec_transaction(r):
    with r.pipeline(transaction=True) as pipe:
        pipe.set("balance", 10).incrby("balance", 5).lpush("log", "deposit").get("balance")
        assert pipe.execute() == [True, 15, 1, "15"]
    assert r.get("balance") == "15"


def test_brpop_is_woken_by_lpush_from_another_client(broker, url, r):
    popper = redis.Redis.from_url(url, socket_timeout=WAIT + 5)
    got: list = []
    done = threading.Event()

    def pop() -> None:
        got.append(popper.brpop("wake-me", timeout=WAIT))
        done.set()

    thread = threading.Thread(target=pop, name="test-brpop")
    thread.start()
    wait_until(lambda: blocked_clients(broker) == 1, WAIT, "timed out waiting for the BRPOP to block")
    assert not done.is_set()
    r.lpush("wake-me", "job-1")
    assert done.wait(WAIT), "the blocked BRPOP was not woken by LPUSH"
    thread.join(WAIT)
    popper.close()
    assert got == [(b"wake-me", b"job-1")]
    assert r.llen("wake-me") == 0


def test_pubsub_delivers_a_message_published_by_another_client(url, r):
    subscriber = redis.Redis.from_url(url, socket_timeout=WAIT, decode_responses=True)
    pubsub = subscriber.pubsub()
    pubsub.subscribe("news")
    confirmation = pubsub.get_message(timeout=WAIT)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    assert r.publish("news", "hello") == 1
    message = pubsub.get_message(timeout=WAIT)
    pubsub.close()
    subscriber.close()
    assert message is not None, "the published message did not arrive"
    assert (message["channel"], message["data"]) == ("news", "hello")


# --- errors keep the connection (stock TcpFakeServer hangs up here) ---------


def test_noscript_then_eval_on_the_same_connection(url):
    single = redis.Redis.from_url(url, socket_timeout=WAIT, single_connection_client=True)
    try:
        # redis-py reconnects silently when a server hangs up, so compare the server's id
        # of this connection: a reconnect would give a new one.
        client_id = single.client_id()
        with pytest.raises(redis.exceptions.NoScriptError):
            single.evalsha("0" * 40, 0)
        assert single.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "via-lua", 3) == 3
        sha = single.script_load("return ARGV[1]")
        assert single.evalsha(sha, 0, "cached") == b"cached"
        assert single.incr("via-lua") == 4
        assert single.client_id() == client_id, "the server closed the connection after NOSCRIPT"
    finally:
        single.close()


def test_error_reply_keeps_the_connection_usable(url):
    single = redis.Redis.from_url(url, socket_timeout=WAIT, single_connection_client=True)
    try:
        single.set("word", "abc")
        client_id = single.client_id()
        with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
            single.incr("word")
        assert single.client_id() == client_id, "the server closed the connection after an error reply"
        with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
            single.execute_command("NOSUCHCOMMAND", "x")
        assert single.client_id() == client_id, "the server closed the connection after an unknown command"
        assert single.get("word") == b"abc"
        assert single.incr("n") == 1
    finally:
        single.close()


# --- protocols and concurrency -------------------------------------------------


def test_resp3_client_negotiates_hello(url):
    client = redis.Redis.from_url(url, socket_timeout=WAIT, protocol=3, single_connection_client=True)
    try:
        assert client.client_info()["resp"] == "3"  # HELLO 3 was accepted on this connection
        client.hset("h", mapping={"a": "1"})
        assert client.hgetall("h") == {b"a": b"1"}  # a RESP3 map
        client.zadd("z", {"m": 1.5})
        assert client.zscore("z", "m") == 1.5  # a RESP3 double
        assert client.get("missing") is None  # a RESP3 null
    finally:
        client.close()
    plain = redis.Redis.from_url(url, socket_timeout=WAIT, protocol=2, single_connection_client=True)
    try:
        assert plain.client_info()["resp"] == "2"  # no HELLO: RESP2, as on a real server
        assert plain.hgetall("h") == {b"a": b"1"}
    finally:
        plain.close()


def test_50_concurrent_connections_count_exactly(url, r):
    connections, increments = 50, 40
    start = threading.Barrier(connections, timeout=WAIT)
    errors: list[BaseException] = []

    def count() -> None:
        client = redis.Redis.from_url(url, socket_timeout=WAIT, single_connection_client=True)
        try:
            client.ping()  # connected before anyone starts counting
            start.wait()
            for _ in range(increments):
                client.incr("hits")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=count, name=f"test-incr-{i}") for i in range(connections)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "some counting threads never finished"
    assert errors == []
    assert int(r.get("hits")) == connections * increments


# --- a client that dies while blocked must not swallow the next message -----


def test_client_killed_while_blocked_does_not_steal_the_next_message(broker, url, r):
    dead = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    dead_port = dead.getsockname()[1]
    dead.sendall(resp_command(b"BRPOP", b"work", b"0"))  # block forever, like an idle worker
    wait_until(lambda: blocked_clients(broker) == 1, WAIT, "timed out waiting for the raw client's BRPOP to block")
    dead.close()  # the worker is killed while it waits

    def dead_client_listed() -> bool:
        return any(entry["addr"] == f"127.0.0.1:{dead_port}" for entry in r.client_list())

    # The watchdog cancels the dead client's pop; then its connection goes away.
    wait_until(lambda: not dead_client_listed(), WAIT, "timed out waiting for the broker to drop the dead client")

    survivor = redis.Redis.from_url(url, socket_timeout=WAIT + 5)
    got: list = []
    thread = threading.Thread(target=lambda: got.append(survivor.brpop("work", timeout=WAIT)), name="test-survivor")
    thread.start()
    wait_until(lambda: blocked_clients(broker) == 1, WAIT, "timed out waiting for the surviving client's BRPOP to block")
    r.lpush("work", "task-1")
    thread.join(WAIT + 1)
    survivor.close()
    assert got == [(b"work", b"task-1")], "the message pushed after the dead client left was lost"
    assert r.llen("work") == 0


# --- Celery end to end ----------------------------------------------------------


def test_subscribers_that_vanish_do_not_stall_the_server(url, r):
    """Replies to a peer that reset its connection fail under fakeredis's lock: the server must go on."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for _ in range(20):
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        raw.sendall(resp_command(b"SUBSCRIBE", b"vanishing"))
        raw.recv(1024)  # the subscribe confirmation
        raw.sendall(resp_command(b"UNSUBSCRIBE", b"vanishing"))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # with a zero linger: a reset, so the server's reply cannot be sent
        r.publish("vanishing", "anyone?")
    assert r.ping() and r.publish("vanishing", "still serving") == 0


def test_celery_round_trip_and_chord(url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", url)
    app = Celery("broker_probe", broker=url, backend=url)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def total(numbers):
        return sum(numbers)

    try:
        with thread_worker(app, start_timeout=WAIT, stop_timeout=WAIT):
            assert add.delay(2, 3).get(timeout=WAIT) == 5
            result = chord(group(add.s(i, i) for i in range(5)))(total.s())
            assert result.get(timeout=WAIT) == 20
    finally:
        app.close()


# --- passwords, ACL users and CLIENT KILL, as redis-server does them ----------------


@pytest.fixture(scope="module")
def locked():
    """A broker with a password for the default user and an ACL user ``alice``."""
    with EmbeddedBroker(password="s3cret", users={"alice": "pw"}) as server:
        yield server


def with_credentials(url: str, credentials: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{credentials}@{rest}"


@pytest.mark.parametrize(
    "credentials, expected",
    [
        ("", "Authentication required."),
        (":wrong", "invalid username-password pair or user is disabled."),
        ("alice:bad", "invalid username-password pair or user is disabled."),
        ("nobody:s3cret", "invalid username-password pair or user is disabled."),
    ],
    ids=["no-password", "wrong-password", "wrong-user-password", "unknown-user"],
)
def test_a_locked_broker_refuses_wrong_credentials_like_redis(locked, credentials, expected):
    url = with_credentials(locked.url, credentials) if credentials else locked.url
    client = redis.Redis.from_url(url, socket_timeout=WAIT)
    with pytest.raises(redis.AuthenticationError) as refused:
        client.ping()
    assert str(refused.value) == expected
    client.close()


@pytest.mark.parametrize("credentials", [":s3cret", "default:s3cret", "alice:pw"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_a_locked_broker_accepts_its_password_and_acl_users(locked, credentials, protocol):
    client = redis.Redis.from_url(with_credentials(locked.url, credentials), socket_timeout=WAIT, protocol=protocol, decode_responses=True)
    assert client.ping()
    assert client.acl_whoami() == (credentials.split(":")[0] or "default")
    client.close()


def add_through_a_worker(name: str, url: str, **settings) -> int:
    """2 + 3, sent through ``url`` to a worker thread of a new app (``settings`` go in its conf)."""
    app = Celery(name, broker=url, backend=url)
    app.conf.update(settings)

    @app.task(name=f"{name}.add")
    def add(x, y):
        return x + y

    try:
        with thread_worker(app, start_timeout=WAIT, stop_timeout=WAIT):
            return add.delay(2, 3).get(timeout=WAIT)
    finally:
        app.close()


def test_celery_runs_on_a_locked_broker(locked, monkeypatch):
    url = with_credentials(locked.url, "alice:pw")
    monkeypatch.setenv("REDIS_URL", url)
    assert add_through_a_worker("locked_probe", url) == 5


def test_client_kill_closes_the_killed_connection(url, r):
    """redis-server closes a killed client's socket (redis-py then raises ConnectionError);
    fakeredis alone kept it open and answered its next command with an error reply."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])), timeout=WAIT) as victim:
        victim.sendall(resp_command(b"CLIENT", b"ID"))
        victim_id = int(victim.recv(100)[1:].strip())
        assert r.client_kill_filter(_id=victim_id) == 1
        victim.sendall(resp_command(b"PING"))
        assert victim.recv(100) == b"", "the killed connection answered instead of closing"
    assert victim_id not in [int(client["id"]) for client in r.client_list()]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """A locked broker that also speaks TLS, with a throwaway CA (trustme) its clients trust."""
    from labkit.tls import certificates

    context, ca_file = certificates(tmp_path_factory.mktemp("tls"))
    with EmbeddedBroker(password="s3cret", tls=context) as server:
        yield server, ca_file


def test_rediss_works_with_the_ca_and_fails_without_it(tls_broker):
    broker, ca_file = tls_broker
    url = with_credentials(broker.tls_url, ":s3cret")
    trusted = redis.Redis.from_url(url, ssl_ca_certs=str(ca_file), socket_timeout=WAIT)
    assert trusted.ping() and trusted.set("tls-key", "v") and trusted.get("tls-key") == b"v"
    trusted.close()
    untrusted = redis.Redis.from_url(url, socket_timeout=WAIT)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.ping()


def test_celery_runs_over_tls_with_a_password(tls_broker, monkeypatch):
    import ssl

    broker, ca_file = tls_broker
    url = with_credentials(broker.tls_url, ":s3cret")
    monkeypatch.setenv("REDIS_URL", url)
    verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca_file)}
    assert add_through_a_worker("tls_probe", url, broker_use_ssl=verify, redis_backend_use_ssl=verify) == 5


# --- stopping ---------------------------------------------------------------------


def test_stop_joins_every_thread_and_frees_the_port():
    before = {t for t in threading.enumerate() if t.name.startswith("labkit-")}
    server = EmbeddedBroker().start()
    port = server.port
    idle = redis.Redis(host=server.host, port=port, socket_timeout=WAIT)
    idle.set("k", "v")
    # No reconnect attempts: the point is to see the blocked call end when the broker stops.
    blocked = redis.Redis(host=server.host, port=port, socket_timeout=WAIT + 5, retry=Retry(NoBackoff(), 0))
    outcome: list = []

    def wait_forever() -> None:
        try:
            outcome.append(blocked.brpop("never", timeout=0))
        except redis.ConnectionError as exc:
            outcome.append(exc)

    popper = threading.Thread(target=wait_forever, name="test-blocked")
    popper.start()
    try:
        wait_until(lambda: blocked_clients(server) == 1, WAIT, "timed out waiting for the BRPOP to block")
    finally:
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
    popper.join(WAIT)
    idle.close()
    blocked.close()
    assert not popper.is_alive(), "a client blocked in BRPOP was not released by stop()"
    assert took < 3, f"stop() took {took:.1f} s"
    left = [t.name for t in threading.enumerate() if t.name.startswith("labkit-") and t not in before]
    assert left == []
    # The listener is closed: the port can be bound again (with SO_REUSEADDR, as any server
    # would bind it: the connections the broker closed may sit in TIME_WAIT on that port).
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, port))
        probe.listen()


def test_broker_process_answers_ping_and_exits():
    before = set(pids_of_children(os.getpid()))
    with broker_process(start_timeout=20) as child_url:
        client = redis.Redis.from_url(child_url, socket_timeout=WAIT)
        assert client.ping() is True
        client.close()
        children = {
            pid: cmd for pid, cmd in pids_of_children(os.getpid()).items() if pid not in before and "labkit" in cmd
        }
        assert len(children) == 1, f"expected one broker child process, found {children}"
        (pid,) = children
    assert process_is_gone(pid), f"the broker child process {pid} is still alive"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(child_url, socket_connect_timeout=1, socket_timeout=1).ping()
