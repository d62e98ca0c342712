"""Lesson 03 checks: a FastAPI front door that queues Celery jobs and lets clients poll.

Most checks run twice, as their ids say: "in-process" (FastAPI's TestClient runs the
app inside this process) and "uvicorn" (the real server command, a subprocess on a
free port, shared by this file's checks). "redis-down" is a second uvicorn whose
REDIS_URL points at a port where nothing listens. Jobs run on a real worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import redis
import redis.asyncio

from labkit.checks import fail, final_state, wait_until
from labkit.manifest import lesson_of_test_file, load_course
from labkit.web import Servers, Web, app_client, collect_celery_leftovers, free_port, ignore_broker_sockets, json_of

REPORT = {"title": "Fruit", "items": ["apple", "pear", "fig"]}
REPORT_RESULT = {"title": "Fruit", "count": 3, "lines": ["1. apple", "2. pear", "3. fig"]}
SLOW_REPORT = {**REPORT, "pause": 0.1}  # about 0.3 s of work, in three steps (PROGRESS seen 4+ times on 2 busy cores)
ANSWER_WITHIN = 5.0  # seconds any one request may take
PROMPT = 2.0  # seconds POST /jobs may take when no worker runs
POLL_FOR = 10.0  # seconds a client polls GET /jobs/{id}


# --- the two ways to reach the app (labkit.web): in this process, or through uvicorn ----


@pytest.fixture(autouse=True)
def celery_leftovers(broker_url: str):
    """Ignore the broker connections Celery leaves to the garbage collector (see labkit.web)."""
    ignore_broker_sockets(broker_url)


@pytest.fixture(scope="module", autouse=True)
def collect_celery_leftovers_at_the_end(broker_url: str):
    """After this file's checks, collect that garbage here, so it cannot warn in another lesson's."""
    yield
    collect_celery_leftovers(broker_url)


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, broker_url: str, course_root: Path, target: str):
    """The real servers of this file: one on the grader's Redis, one on a dead port."""
    lesson = lesson_of_test_file(Path(__file__).stem, load_course(course_root / "course.toml"))
    folder = lesson.folder(target, course_root)  # the tree being graded, e.g. a gradebook workspace
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    servers = Servers("api1:app", folder, {"uvicorn": {}, "redis-down": {"REDIS_URL": dead_redis}})
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=["in-process", "uvicorn"])
def web(request: pytest.FixtureRequest, exercise, servers):
    """``web()`` connects to api1's app: in this process (TestClient), or through uvicorn."""
    with ExitStack() as stack:

        def connect() -> Web:
            api = exercise("api1")  # a broken import fails here, with the line that broke
            if request.param != "in-process":
                server = servers.start(request.param)
                # verify=False: plain http to 127.0.0.1, so no TLS context to build (that costs 30-80 ms a client)
                client = stack.enter_context(httpx.Client(base_url=server, timeout=ANSWER_WITHIN, verify=False))
                return Web(client, server, answer_within=ANSWER_WITHIN)
            client = app_client(api.app, raise_server_exceptions=True)
            problem = ""
            try:
                stack.enter_context(client)  # runs the app's lifespan startup (and its end, later)
            except Exception as exc:
                problem = f"Starting the app ran its lifespan, which raised {type(exc).__name__}: {exc} (TODO 2)."
            if problem:
                fail(problem)
            return Web(client, app_file=Path(api.module.__file__), answer_within=ANSWER_WITHIN)

        yield connect


def job_id_of(response: httpx.Response, did: str) -> str:
    body = json_of(response)
    job_id = body.get("id") if isinstance(body, dict) else None
    if not isinstance(job_id, str) or not job_id:
        fail(f'{did} answered {response.status_code} with {body!r}, expected a JSON object with the job\'s "id" (TODO 3).')
    return job_id


def submit(http: Web, report: dict) -> str:
    did = f"POST /jobs {json.dumps(report)}"
    response = http.post("/jobs", json=report)
    http.expect(response, 202, did, "Look at submit_job in api1.py (TODO 3).")
    return job_id_of(response, did)


def poll(http: Web, job_id: str, until: str) -> list[dict]:
    """GET /jobs/{id} until the state is ``until``; every answer seen, in order."""
    seen: list[dict] = []
    deadline = time.monotonic() + POLL_FOR
    while not seen or seen[-1].get("state") != until:
        if time.monotonic() > deadline:
            states = " -> ".join(dict.fromkeys(str(body.get("state")) for body in seen))
            fail(f"Polled GET /jobs/{job_id} for {POLL_FOR:g} s: states seen {states}, never {until}. Look at job_status (TODO 4).")
        response = http.get(f"/jobs/{job_id}")
        http.expect(response, 200, f"GET /jobs/{job_id} of a submitted job", "Look at job_status in api1.py (TODO 4).")
        body = json_of(response)
        seen.append(body if isinstance(body, dict) else {"state": None, "body": body})
        if seen[-1].get("state") == "FAILURE" != until:
            fail(f"Polled GET /jobs/{job_id}: the job failed, expected {until}. The last answer: {body!r}.")
        time.sleep(0.03)
    return seen


# --- TODO 1: the task -----------------------------------------------------------------


@pytest.mark.task(1)
def test_1_make_report_turns_a_dict_into_a_report(exercise, thread_worker):
    jobs = exercise("jobs1")
    task = jobs.make_report
    if not hasattr(task, "delay"):
        fail("`make_report` in jobs1.py is a plain function, not a Celery task: decorate it with @app.task(...) (TODO 1).")
    thread_worker(jobs.app)
    sent = f"make_report.delay({REPORT})"

    def not_ended(state):
        return f"{sent} gave no result within 10 s (state {state}): is make_report registered on jobs1's app?"

    state, value = final_state(task.delay(REPORT), sent, 10, not_ended)
    if state != "SUCCESS":
        fail(
            f"{sent} failed in the worker with {type(value).__name__}: {value}. "
            "bind=True gives the task `self`; pydantic=True turns the dict into a ReportRequest (TODO 1)."
        )
    assert value == REPORT_RESULT, f"{sent} returned {value!r}, expected the Report as a dict: {REPORT_RESULT!r} (TODO 1)."


# --- TODO 2: the lifespan ---------------------------------------------------------------


async def _run_lifespan(app, name: str, grader: redis.Redis) -> dict:
    """Start the app's lifespan, give a connection of the Redis client it made a name, stop it."""
    seen = {"key": "", "error": "", "on_grader": False}
    async with app.router.lifespan_context(app) as state:
        held = {**getattr(app.state, "_state", {}), **(state or {})}
        clients = {key: value for key, value in held.items() if isinstance(value, (redis.Redis, redis.asyncio.Redis))}
        if not clients:
            return seen
        seen["key"], client = next(iter(clients.items()))
        try:
            reply = client.client_setname(name)
            if inspect.isawaitable(reply):
                await reply
        except redis.RedisError as exc:
            seen["error"] = f"{type(exc).__name__}: {exc}"
        else:
            seen["on_grader"] = any(info.get("name") == name for info in grader.client_list())
    return seen


@pytest.mark.task(2)
def test_2_lifespan_opens_and_closes_a_redis_client(exercise, redis_client):
    api = exercise("api1")
    name = f"labkit-probe-{uuid.uuid4().hex[:8]}"
    problem = ""
    try:
        seen = asyncio.run(_run_lifespan(api.app, name, redis_client))
    except Exception as exc:
        problem = f"Started and stopped the app; its lifespan raised {type(exc).__name__}: {exc} (TODO 2)."
    if problem:
        fail(problem)
    where = f"app.state.{seen['key']}"
    if not seen["key"]:
        fail("Started the app (ran its lifespan): found no Redis client on app.state. Create one from REDIS_URL before the yield (TODO 2).")
    if seen["error"]:
        fail(f"Started the app: its Redis client {where} could not reach Redis ({seen['error']}). Build it from REDIS_URL (TODO 2).")
    if not seen["on_grader"]:
        fail(f"Started the app: its Redis client {where} answers, but not from the Redis at REDIS_URL. Build it from REDIS_URL (TODO 2).")
    wait_until(
        lambda: all(info.get("name") != name for info in redis_client.client_list()),
        5.0,
        f"Started the app, used its Redis client {where}, stopped the app: the client's connection was still open "
        "5 s later. Close the client after the yield (TODO 2).",
    )


# --- TODO 3: POST /jobs -----------------------------------------------------------------


@pytest.mark.task(3)
def test_3_post_answers_202_with_id_and_location(web):
    http = web()
    did = f"POST /jobs {json.dumps(REPORT)}"
    response = http.post("/jobs", json=REPORT)
    http.expect(response, 202, did, "Give the route status_code=202 and answer without waiting (TODO 3).")
    job_id = job_id_of(response, did)
    location = response.headers.get("location")
    assert location, f"{did} answered 202 with no Location header; expected Location: /jobs/{job_id} (TODO 3)."
    path = urlsplit(urljoin("http://server/jobs", location)).path
    assert path == f"/jobs/{job_id}", f"{did} answered Location: {location}; expected /jobs/{job_id} (TODO 3)."


INVALID = {
    "no-title": {"items": ["apple"]},
    "items-not-a-list": {"title": "Fruit", "items": "apple"},
    "no-items": {"title": "Fruit", "items": []},
}


@pytest.mark.task(3)
@pytest.mark.parametrize("body", INVALID.values(), ids=INVALID.keys())
def test_3_post_rejects_an_invalid_body_with_422(web, redis_client, body):
    http = web()
    did = f"POST /jobs {json.dumps(body)}"
    response = http.post("/jobs", json=body)
    http.expect(response, 422, did, "Declare the body as a ReportRequest and FastAPI checks it for you (TODO 3).")
    queued = redis_client.llen("celery")
    assert queued == 0, f"{did} answered 422 but queued {queued} job(s); an invalid body must not reach the queue (TODO 3)."


@pytest.mark.task(3)
def test_3_post_queues_the_job_without_waiting(web, redis_client):
    http = web()  # and no worker: the job can only wait in the queue
    started = time.monotonic()
    response = http.post("/jobs", json=REPORT, slow="With no worker running, it must queue the job and answer at once (TODO 3).")
    took = time.monotonic() - started
    did = f"POST /jobs {json.dumps(REPORT)} with no worker running"
    http.expect(response, 202, did, "Look at submit_job in api1.py (TODO 3).")
    assert took < PROMPT, f"{did} took {took:.1f} s, expected under {PROMPT:g} s: send the task, never wait for its result (TODO 3)."
    job_id = job_id_of(response, did)
    waiting = [json.loads(raw)["headers"].get("id") for raw in redis_client.lrange("celery", 0, -1)]
    assert job_id in waiting, (
        f"{did} answered id {job_id}, but the 'celery' queue holds {waiting or 'no message'}: "
        "send make_report with that id as its task_id (TODO 3)."
    )


# --- TODO 4: GET /jobs/{id} --------------------------------------------------------------


@pytest.mark.task(4)
def test_4_get_unknown_id_answers_404(web):
    http = web()
    job_id = str(uuid.uuid4())
    response = http.get(f"/jobs/{job_id}")
    http.expect(
        response, 404, f"GET /jobs/{job_id} (an id never submitted)", "Celery says PENDING for any id: check your record first (TODO 4)."
    )


@pytest.mark.task(4)
def test_4_get_shows_pending_while_no_worker_runs(web):
    http = web()
    job_id = submit(http, REPORT)
    did = f"GET /jobs/{job_id} with no worker running"
    response = http.get(f"/jobs/{job_id}")
    http.expect(response, 200, did, "A submitted id is known, even before a worker takes it: look at job_status (TODO 4).")
    body = json_of(response)
    assert isinstance(body, dict) and body.get("id") == job_id and body.get("state") == "PENDING" and "result" not in body, (
        f"{did} answered {body!r}, expected {{'id': '{job_id}', 'state': 'PENDING'}} and no result (TODO 4)."
    )


@pytest.mark.task(4)
def test_4_get_reaches_success_with_the_result(web, exercise, thread_worker):
    thread_worker(exercise("jobs1").app)
    http = web()
    job_id = submit(http, REPORT)
    final = poll(http, job_id, until="SUCCESS")[-1]
    assert final.get("id") == job_id and final.get("result") == REPORT_RESULT, (
        f"GET /jobs/{job_id} of a finished job answered {final!r}, expected its id, "
        f"'state': 'SUCCESS' and 'result': {REPORT_RESULT!r} (TODO 4)."
    )


@pytest.mark.task(4)
def test_4_get_shows_progress_while_the_task_runs(web, exercise, thread_worker):
    thread_worker(exercise("jobs1").app)
    http = web()
    job_id = submit(http, SLOW_REPORT)
    seen = poll(http, job_id, until="SUCCESS")
    progress = [body.get("progress") for body in seen if body.get("state") == "PROGRESS"]
    assert progress, (
        f"Polled GET /jobs/{job_id} while make_report worked through 3 items: never saw state PROGRESS "
        f"(states: {' -> '.join(dict.fromkeys(str(body.get('state')) for body in seen))}). Look at job_status (TODO 4)."
    )
    # Some, not all: state and progress are two reads, and the job may finish in between.
    expected = [{"current": n, "total": 3} for n in (1, 2, 3)]
    assert any(step in expected for step in progress), (
        f"GET /jobs/{job_id} showed PROGRESS with 'progress': {progress[0]!r}, expected the task's meta, "
        "e.g. {'current': 1, 'total': 3} (TODO 4)."
    )


# --- TODO 5: Redis is down ---------------------------------------------------------------


@pytest.mark.task(5)
@pytest.mark.parametrize("web", ["redis-down"], indirect=True)
def test_5_redis_down_answers_503(web):
    http = web()
    slow = "Something retries for too long: see 'When Redis is down' in the lesson README (TODO 5)."
    for method, path in (("POST", "/jobs"), ("GET", f"/jobs/{uuid.uuid4()}"), ("POST", "/jobs")):
        did = f"{method} {path} with REDIS_URL pointing at a port where nothing listens"
        response = http.request(method, path, slow=slow, **({"json": REPORT} if method == "POST" else {}))
        http.expect(response, 503, did, "Register queue_unavailable for Redis' and kombu's connection errors (TODO 5).")
        body = json_of(response)
        detail = body.get("detail") if isinstance(body, dict) else None
        assert detail, f"{did} answered 503 with {response.text!r}, expected a JSON body with a \"detail\" message (TODO 5)."
