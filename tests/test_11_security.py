"""Lesson 11 checks: pickle refused, signed messages, no secrets in Redis, validated inputs,
Redis over TLS with a password, and Flower behind a password.

The signing key and certificates are made here with trustme (an RSA key: Celery's signing
refuses others) and given to the lesson's app through SIGNING_KEY, SIGNING_CERT and
SIGNING_CERTS, which it reads when it is imported. Forged messages are written to the queue
by another app that shares only the broker: the worker must refuse them, so they stay
PENDING and the mail server is never asked. To know the worker has looked at a forged
message, a good message is sent after it: a solo worker handles them in order.

The TLS check starts its own embedded broker, with a password and TLS, on both legs (the
real-Redis leg too): this machine's redis-server may be built without TLS, and a broker of
our own can also be an impostor, with a certificate from a CA the app must not trust.
"""

import base64
import gc
import importlib.util
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
import warnings

import pytest
import redis
from celery import Celery
from kombu.exceptions import SerializerNotInstalled
from kombu.serialization import registry

from labkit.broker import EmbeddedBroker
from labkit.checks import call, fail, final_state, result_of
from labkit.procs import ChildProcess, ProcessError, free_port, port_open
from labkit.tls import certificates

# The TLS checks import a second copy of the lesson's module: its tasks have the same names.
COPY_WARNING = "ignore::celery.exceptions.DuplicateTaskNameWarning"

MODULE = "security1"
PASSWORD = "correct-horse-battery"  # Ada's mailbox password, in the lesson's ACCOUNTS
FORM = {"user_id": "u-1001", "email": "ada@example.com", "mailbox_password": PASSWORD, "folder": "Inbox"}
SEP = b"\x00\x01"  # how Celery's "auth" serializer joins signer, signature, type, encoding and body
WAIT = 10.0


# --- the signing key, made once for this file ------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def signing_files(tmp_path_factory):
    """An RSA key and certificate from a throwaway CA (trustme), in SIGNING_* for the lesson's app.

    setup_security() changes kombu's serializer registry for the whole process (it disables
    every decoder but "auth", and makes "auth" the default): put it back for the lessons after.
    """
    import trustme

    folder = tmp_path_factory.mktemp("signing")
    authority = trustme.CA(key_type=trustme.KeyType.RSA)
    signer = authority.issue_cert("celery-labs-signer", key_type=trustme.KeyType.RSA)
    signer.private_key_pem.write_to_path(str(folder / "signer.key"))
    signer.cert_chain_pems[0].write_to_path(str(folder / "signer.pem"))
    names = {"SIGNING_KEY": "signer.key", "SIGNING_CERT": "signer.pem", "SIGNING_CERTS": "*.pem"}
    saved_env = {name: os.environ.get(name) for name in names}
    saved_registry = (
        set(registry._disabled_content_types),
        registry._default_encode,
        registry._default_content_type,
        registry._default_content_encoding,
    )
    os.environ.update({name: str(folder / file) for name, file in names.items()})
    yield folder
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    registry._disabled_content_types = saved_registry[0]
    registry._default_encode, registry._default_content_type, registry._default_content_encoding = saved_registry[1:]


@pytest.fixture
def lesson(exercise):
    module = exercise(MODULE)
    module.FETCHED.clear()
    return module


# --- reading Redis as anyone with access to it could --------------------------------------------


def strings(data):
    """Every string inside a JSON value."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from strings(value)


def readable(raw):
    """Every layer of a Redis value that can be decoded without a key: JSON, base64, signed fields."""
    seen, todo = [], [raw]
    while todo and len(seen) < 200:
        blob = todo.pop()
        if blob in seen:
            continue
        seen.append(blob)
        try:
            todo.extend(text.encode() for text in strings(json.loads(blob)))
        except (ValueError, UnicodeDecodeError):
            pass
        try:
            decoded = base64.b64decode(blob, validate=True)
        except ValueError:
            continue
        if decoded:
            todo.append(decoded)
            todo.extend(decoded.split(SEP))
    return seen


def found_in(raw, secrets):
    """The secrets (str) that can be read in the Redis value ``raw``."""
    layers = readable(raw)
    return [secret for secret in secrets if any(secret.encode() in layer for layer in layers)]


def where_in_message(raw, secret):
    """Where a secret sits in a task message: 'its args', 'its kwargs', or 'its headers'."""
    places = []
    for layer in readable(raw):
        try:
            body = json.loads(layer)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, list) and len(body) == 3 and isinstance(body[1], dict):
            if any(secret in text for text in strings(body[0])):
                places.append("its args")
            if any(secret in text for text in strings(body[1])):
                places.append("its kwargs")
        if isinstance(body, dict) and "headers" in body:
            headers = json.dumps(body["headers"])
            if secret in headers:
                places.append("its headers (argsrepr/kwargsrepr)")
    order = ["its args", "its kwargs", "its headers (argsrepr/kwargsrepr)"]
    return ", ".join(place for place in order if place in places) or "the message"


def redis_values(redis_client):
    """{key: [raw values]} of everything in the check's database."""
    values = {}
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == b"string":
            values[key] = [redis_client.get(key)]
        elif kind == b"list":
            values[key] = redis_client.lrange(key, 0, -1)
        elif kind == b"hash":
            values[key] = redis_client.hvals(key)
        elif kind == b"set":
            values[key] = list(redis_client.smembers(key))
        elif kind == b"zset":
            values[key] = redis_client.zrange(key, 0, -1)
    return values


def queued(redis_client, task_id):
    """The messages of task ``task_id`` waiting in the default queue."""
    return [raw for raw in redis_client.lrange("celery", 0, -1) if task_id.encode() in raw]


# --- sending what the app should refuse ---------------------------------------------------------


def outsider(broker_url):
    """Another app on the same broker: it knows the task's name, not the signing key."""
    return Celery("outsider", broker=broker_url, backend=broker_url, set_as_current=False)


def start_import(lesson, form, shown=None, expected=()):
    """``lesson.start_import(form)``; a problem fails the check in one line (``expected`` errors are raised)."""
    shown = shown or f"start_import({form!r})"
    try:
        return call(shown, lesson.start_import, form, expected=(SerializerNotInstalled, *expected))
    except SerializerNotInstalled as exc:
        problem = (
            f"{shown} raised SerializerNotInstalled: {exc}. task_serializer is 'auth', but the signing serializer "
            "is only installed by app.setup_security() (TODO 2)."
        )
    fail(problem)


def send_marker(lesson, folder="Sent"):
    """A good message, sent after a forged one: once it has run, the worker has seen the forged one."""
    return start_import(lesson, {**FORM, "folder": folder})


def written_as(redis_client, sent, shown="start_import(form)"):
    """Fail at once when the app's own message is pickled while its workers refuse pickle: none would ever run."""
    accepted = {str(name).lower() for name in sent.app.conf.accept_content or ()}
    if accepted & {"pickle", "application/x-python-serialize"}:
        return  # it runs (that is TODO 1's problem, which its own check reports)
    for raw in queued(redis_client, sent.id):
        if json.loads(raw).get("content-type") == "application/x-python-serialize":
            fail(
                f"{shown} wrote its message with pickle: task_serializer is still 'pickle'. A worker that accepts "
                "no pickle (as it must) would refuse your own tasks: send JSON (TODO 1)."
            )


def ran(lesson, task_id):
    """How a message the worker should have refused ended: '' if it never ran."""
    state = lesson.app.AsyncResult(task_id).state
    return "" if state == "PENDING" else state


def tampered(raw, old=b"Inbox", new=b"Trash"):
    """The message ``raw`` with ``old`` changed to ``new`` in its body (signed or not), as an attacker would."""
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"])
    if envelope.get("content-type") == "application/data":  # signed: base64 of signer, signature, ..., body
        fields = base64.b64decode(body).split(SEP, 4)
        if len(fields) != 5 or old not in fields[4]:
            return None
        fields[4] = fields[4].replace(old, new)
        body = base64.b64encode(SEP.join(fields))
    elif old in body:
        body = body.replace(old, new)
    else:
        return None
    envelope["body"] = base64.b64encode(body).decode()
    return json.dumps(envelope).encode()


# --- TODO 1: no pickle ----------------------------------------------------------------------------


@pytest.mark.task(1)
def test_pickled_message_is_refused(lesson, thread_worker, redis_client, broker_url):
    forged = outsider(broker_url).send_task("security1.import_contacts", args=["u-1001", "Inbox"], serializer="pickle")
    marker = send_marker(lesson)
    written_as(redis_client, marker)
    thread_worker(lesson.app)
    result_of(marker, "start_import(form), sent after the pickled message")
    state = ran(lesson, forged.id)
    assert not state, (
        f"Wrote a pickled message for 'security1.import_contacts' to the queue; the worker decoded it and ran the task "
        f"(it ended {state}). Unpickling runs code chosen by whoever wrote the message: accept JSON only (TODO 1)."
    )


# --- TODO 2: signed messages ------------------------------------------------------------------------


@pytest.mark.task(2)
def test_unsigned_message_is_refused(lesson, thread_worker, redis_client, broker_url):
    forged = outsider(broker_url).send_task("security1.import_contacts", args=["u-1001", "Inbox"], serializer="json")
    marker = send_marker(lesson)
    written_as(redis_client, marker)
    thread_worker(lesson.app)
    result_of(marker, "start_import(form), sent after the unsigned message")
    state = ran(lesson, forged.id)
    if state:
        accepted = list(lesson.app.conf.accept_content)
        fail(
            f"Wrote an unsigned JSON message for 'security1.import_contacts' to the queue, as anyone with access to "
            f"Redis could; the worker ran it (it ended {state}; accept_content is {accepted}). Sign the messages and "
            "accept only signed ones, 'auth' (TODO 2)."
        )


@pytest.mark.task(2)
def test_tampered_message_is_refused(lesson, thread_worker, redis_client):
    sent = start_import(lesson, FORM)
    written_as(redis_client, sent)
    messages = queued(redis_client, sent.id)
    if len(messages) != 1:
        fail(
            f"start_import(form) with no worker running left {len(messages)} messages of its task in the queue "
            "'celery', expected 1."
        )
    changed = tampered(messages[0])
    if changed is None:
        fail(
            "start_import(form) sent a message without the folder 'Inbox' in its body: the folder the user chose "
            "must travel in the message (TODO 3)."
        )
    redis_client.lrem("celery", 1, messages[0])
    redis_client.rpush("celery", changed)  # the folder changed from 'Inbox' to 'Trash', in Redis
    marker = send_marker(lesson)
    thread_worker(lesson.app)
    result_of(marker, "start_import(form), sent after the changed message")
    state = ran(lesson, sent.id)
    trashed = [entry for entry in lesson.FETCHED if entry[1] == "Trash"]
    assert not state and not trashed, (
        f"Changed 'Inbox' to 'Trash' in the body of a queued message, in Redis; the worker ran it anyway (it ended "
        f"{state or 'PENDING'}, the mail server was asked for {lesson.FETCHED}). Sign the messages (task_serializer "
        "'auth'), so that a changed body no longer matches its signature (TODO 2)."
    )


# --- TODO 3: no secrets in the message ---------------------------------------------------------------


@pytest.mark.task(3)
def test_no_secret_in_redis(lesson, thread_worker, redis_client):
    secret = "pw-" + os.urandom(6).hex()
    lesson.ACCOUNTS["u-2002"] = {"email": "grace@example.com", "mailbox_password": secret}
    form = {"user_id": "u-2002", "email": "grace@example.com", "mailbox_password": secret, "folder": "Sent"}
    private = [secret, "grace@example.com"]
    try:
        sent = start_import(lesson, form)
        written_as(redis_client, sent)
        messages = queued(redis_client, sent.id)
        for raw in messages:
            seen = found_in(raw, private)
            if secret in seen:
                fail(
                    f"start_import({form!r}) queued a message with the mailbox password {secret!r} in "
                    f"{where_in_message(raw, secret)}: anyone who can read Redis can read it (base64 hides nothing, "
                    "a signature neither). Send the user id and look the password up inside the task (TODO 3)."
                )
            if seen:
                fail(
                    f"start_import({form!r}) queued a message with the e-mail address {seen[0]!r} in "
                    f"{where_in_message(raw, seen[0])}: personal data then sits in Redis, in Flower and in the logs. "
                    "Which fields must travel, and which can the task look up by user id (TODO 3)?"
                )
        thread_worker(lesson.app)
        result_of(sent, f"start_import({form!r})")
        assert ("grace@example.com", "Sent") in lesson.FETCHED, (
            f"start_import({form!r}) succeeded, but the mail server was asked for {lesson.FETCHED}, expected "
            "grace@example.com's 'Sent' folder: look the account up by the user id (TODO 3)."
        )
        leaks = {}
        for key, raws in redis_values(redis_client).items():
            seen = sorted({secret for raw in raws for secret in found_in(raw, private)})
            if seen:
                leaks[key.decode(errors="replace")] = seen
        assert not leaks, (
            f"start_import({form!r}) ran; afterwards Redis holds {leaks} (key: what can be read there). A task's "
            "result sits in Redis in clear too: return ids and counts, not the user's data (TODO 3)."
        )
    finally:
        lesson.ACCOUNTS.pop("u-2002", None)


# --- TODO 4: validated inputs ------------------------------------------------------------------------


BAD_FORMS = [
    ({**FORM, "folder": "../../etc/passwd"}, "a folder that is a path"),
    ({**FORM, "folder": "Inbox' OR '1'='1"}, "a folder with SQL in it"),
    ({**FORM, "user_id": "u-1001; DROP TABLE users"}, "a user id with SQL in it"),
    ({**FORM, "user_id": "u-9999"}, "a user id nobody has"),
]


@pytest.mark.task(4)
@pytest.mark.parametrize("form, what", BAD_FORMS, ids=["folder-path", "folder-sql", "user-sql", "user-unknown"])
def test_invalid_input_is_refused(lesson, thread_worker, redis_client, form, what):
    shown = f"start_import({form!r}) ({what})"
    try:
        sent = start_import(lesson, form, shown, expected=(ValueError, TypeError, KeyError))
    except (ValueError, TypeError, KeyError):
        sent = None  # refused before sending: fine
    if sent is not None:
        written_as(redis_client, sent)
    thread_worker(lesson.app)
    if sent is not None:
        state, value = final_state(sent, shown)
        if isinstance(value, NotImplementedError):
            fail(f"{shown} failed in the worker with NotImplementedError({str(value)!r}): that TODO is still to do.")
        if state == "SUCCESS":
            fail(
                f"{shown} succeeded with {value!r}; the mail server was asked for {lesson.FETCHED}. Refuse inputs "
                "no real request can hold, before using them: raise an error (TODO 4)."
            )
    assert not lesson.FETCHED, (
        f"{shown}: the mail server was asked for {lesson.FETCHED} before the input was refused. Check the inputs "
        "first, then use them (TODO 4)."
    )
    good = {**FORM, "folder": "Trash"}
    result_of(start_import(lesson, good), f"start_import({good!r}), a valid form")
    assert lesson.FETCHED == [("ada@example.com", "Trash")], (
        f"After refusing {what}, sent a valid form for Ada's 'Trash'; the mail server was asked for {lesson.FETCHED}. "
        "Your checks must let every real request through (TODO 4)."
    )


# --- TODO 5: Redis over TLS, with a password -----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_brokers(tmp_path_factory):
    """Our Redis (TLS, user 'labs' with a password) and an impostor, whose certificate another CA signed."""
    ours_context, ca_file = certificates(tmp_path_factory.mktemp("tls"))
    impostor_context, _ = certificates(tmp_path_factory.mktemp("impostor"))
    with EmbeddedBroker(password="default-pw", users={"labs": "labs-pw"}, tls=ours_context) as ours:
        with EmbeddedBroker(users={"labs": "labs-pw"}, tls=impostor_context) as impostor:
            yield ours, impostor, ca_file


@pytest.fixture
def load_copy(lesson, monkeypatch):
    """``load_copy(url, ca_file)``: a fresh copy of the lesson's module, imported with REDIS_URL and REDIS_CA.

    Its tasks are "shared": Celery would add them to every app made later in this process (the
    next lessons' apps), next to the originals of the same name. Forget them after the check.
    """
    from celery import _state

    before = set(_state._on_app_finalizers)
    apps = []

    def load(url, ca_file):
        monkeypatch.setenv("REDIS_URL", url)
        monkeypatch.setenv("REDIS_CA", str(ca_file))
        spec = importlib.util.spec_from_file_location(MODULE, lesson.module.__file__)
        module = importlib.util.module_from_spec(spec)
        call(f"importing {MODULE}.py with REDIS_URL={url!r}", spec.loader.exec_module, module)
        apps.append(module.app)
        return module

    yield load
    _state._on_app_finalizers.intersection_update(before)
    for app in apps:
        close(app)
    # Connections the copies dropped (a refused handshake, say) are freed now, not in a later check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def close(app):
    """Close the app's broker pool and its result backend's Redis connections."""
    try:
        app.backend.client.connection_pool.disconnect()
    except Exception:  # noqa: BLE001 - a backend that cannot start has nothing to close
        pass
    app.close()


def with_credentials(url, credentials):
    return url.replace("://", f"://{credentials}@", 1)


def connect(app):
    """Open the broker and the result backend connections of ``app``: '' or what went wrong."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=3)
        app.backend.client.ping()
    except Exception as exc:  # noqa: BLE001 - the check reports whatever refused it
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return ""


@pytest.mark.task(5)
@pytest.mark.filterwarnings(COPY_WARNING)
def test_app_connects_over_tls_with_a_password(tls_brokers, load_copy, redis_client):
    ours, impostor, ca_file = tls_brokers
    url = with_credentials(ours.tls_url, "labs:labs-pw")
    copy = load_copy(url, ca_file)
    try:
        problem = connect(copy.app)
        if problem:
            fail(
                f"With REDIS_URL={url!r} and REDIS_CA={str(ca_file)!r}, the app could not connect: {problem}. "
                "For a rediss:// URL, give the broker and the result backend ssl_cert_reqs and the CA (TODO 5)."
            )
        sent = start_import(copy, FORM, "start_import(form), over TLS")
        inside = redis.Redis.from_url(with_credentials(ours.url, "labs:labs-pw"), socket_timeout=5)
        with inside:
            queued_there = [raw for raw in inside.lrange("celery", 0, -1) if sent.id.encode() in raw]
        assert queued_there, (
            f"start_import(form) with REDIS_URL={url!r} returned, but its message is not in that Redis' queue: "
            "does the app send to REDIS_URL (TODO 5)?"
        )
    finally:
        close(copy.app)
    wrong = with_credentials(ours.tls_url, "labs:wrong-pw")
    copy = load_copy(wrong, ca_file)
    problem = connect(copy.app)
    assert "invalid username-password pair" in problem or "WRONGPASS" in problem, (
        f"Connected with REDIS_URL={wrong!r}, a wrong password; expected Redis to refuse it (WRONGPASS), got "
        f"{problem or 'a working connection'}. Do the broker and the backend both take REDIS_URL (TODO 5)?"
    )


@pytest.mark.task(5)
@pytest.mark.filterwarnings(COPY_WARNING)
def test_app_checks_the_servers_certificate(tls_brokers, load_copy, redis_client):
    ours, impostor, ca_file = tls_brokers
    url = with_credentials(impostor.tls_url, "labs:labs-pw")
    copy = load_copy(url, ca_file)
    problem = connect(copy.app)
    if "rediss:// URL must have parameter ssl_cert_reqs" in problem:
        fail(f"With a rediss:// REDIS_URL, the result backend refused to start: {problem} (TODO 5).")
    assert problem, (
        f"Pointed REDIS_URL at {url!r}, a server whose certificate was NOT signed by REDIS_CA (an impostor), and the "
        "app connected anyway: it would hand its password and messages to anyone in the middle. Require a "
        "certificate signed by REDIS_CA: ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=REDIS_CA (TODO 5)."
    )


# --- TODO 6: Flower behind a password -------------------------------------------------------------------


def get(url, credentials=None):
    """(status, body) of a GET, with HTTP basic auth when ``credentials`` ("user:password") is given."""
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:
        return None, str(error).encode()


def outside_address():
    """An address of this machine other than loopback, or None (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture
def flower(lesson, redis_client):
    """The real ``celery -A security1 flower --conf=flower1.py`` in the lesson's folder, on a free port."""
    folder = os.path.dirname(lesson.module.__file__)
    port = free_port()
    command = [sys.executable, "-m", "celery", "-A", MODULE, "flower", "--conf=flower1.py", f"--port={port}"]
    env = {"PYTHONPATH": folder, "FLOWER_USER": "grader", "FLOWER_PASSWORD": "flower-" + os.urandom(4).hex()}
    # Killed at the end (no check needs its shutdown): SIGTERM would cost Flower over a second.
    child = ChildProcess(
        command, name="flower", ready=port_open(port), cwd=folder, env=env, start_timeout=20, stop_signal=signal.SIGKILL
    )
    try:
        child.start()
    except ProcessError as exc:
        fail(f"Flower did not start with flower1.py (FLOWER_USER and FLOWER_PASSWORD set): {exc}")
    try:
        yield child, port, f"{env['FLOWER_USER']}:{env['FLOWER_PASSWORD']}"
    finally:
        child.stop()


@pytest.mark.task(6)
def test_flower_asks_for_a_password(flower):
    child, port, credentials = flower
    base = f"http://127.0.0.1:{port}"
    status, _ = get(base + "/")
    assert status == 401, (
        f"Started `celery -A security1 flower --conf=flower1.py`; GET / without credentials answered {status}, "
        "expected 401: anyone who reaches the port sees every task's arguments and can revoke tasks. Set basic_auth "
        "from FLOWER_USER and FLOWER_PASSWORD (TODO 6)."
    )
    status, _ = get(base + "/api/workers", credentials)
    assert status == 200, (
        f"GET /api/workers with FLOWER_USER:FLOWER_PASSWORD answered {status}, expected 200: the user and password "
        "come from those two environment variables (TODO 6)."
    )
    status, _ = get(base + "/api/workers", "grader:not-the-password")
    assert status == 401, f"GET /api/workers with a wrong password answered {status}, expected 401 (TODO 6)."
    elsewhere = outside_address()
    if elsewhere:
        status, _ = get(f"http://{elsewhere}:{port}/metrics")
        assert status is None, (
            f"Flower answered on {elsewhere}, an address other machines can reach: /metrics answers there without "
            f"a password (status {status}), whatever basic_auth says. Listen on 127.0.0.1 only (TODO 6)."
        )
