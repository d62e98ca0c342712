"""Waiting for a task's result (labkit.checks) never depends on one pub/sub message.

``AsyncResult.get()`` subscribes to the result's channel on one connection, reads the
stored state on another, then waits for a message. redis-server and the embedded
broker may run the read before the SUBSCRIBE (neither orders two connections'
commands by arrival), so a PUBLISH falling between them is lost to that ``get()``.
``result_of`` and ``final_state`` wait in slices, and each slice reads the stored
state again. Here every message is lost on purpose, on both brokers.

bench/results_pubsub.py is the big version of the round-trip check below
(thousands of round trips; it counts the messages plain ``get()`` misses).
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from labkit import checks
from labkit.broker import broker_process, is_reachable, with_db
from labkit.checks import final_state, result_of
from labkit.workers import thread_worker

REAL_REDIS = os.environ.get("LABKIT_REAL_REDIS", "redis://127.0.0.1:6379")
REAL_DB = 14  # not the graded checks' 15 (emptied before each check)
WAIT = 5.0
HOLDS: dict[str, tuple[threading.Event, threading.Event]] = {}  # hold id -> (reached, released)


@pytest.fixture(scope="module")
def embedded():
    with broker_process() as url:
        yield url


@pytest.fixture
def app(embedded, monkeypatch):
    """An app on the embedded broker, with a worker (dropping messages is the client's doing: one broker is enough)."""
    yield from running_app(embedded, monkeypatch)


@pytest.fixture(params=["embedded", "real-redis"])
def any_app(request, embedded, monkeypatch):
    """The same, on each broker."""
    url = embedded
    if request.param == "real-redis":
        url = with_db(REAL_REDIS, REAL_DB)
        if not is_reachable(url):
            pytest.skip(f"no Redis answers at {REAL_REDIS}")
    yield from running_app(url, monkeypatch)


def running_app(url, monkeypatch):
    """An app with three tasks and a threads-pool worker, on a queue of its own.

    The real Redis is shared (other runs may use the same database at the same time):
    task ids and the queue name are unique, so nothing is emptied and nothing collides.
    """
    monkeypatch.setenv("REDIS_URL", url)
    app = Celery(f"pubsub_probe_{uuid.uuid4().hex[:8]}", broker=url, backend=url)  # task names unique per app
    app.conf.update(task_track_started=True, task_default_queue=app.main, result_expires=60)

    @app.task(name=f"{app.main}.add_slowly")
    def add_slowly(x, y, pause=0.0):
        time.sleep(pause)
        return x + y

    @app.task(name=f"{app.main}.fail_slowly")
    def fail_slowly(pause=0.0):
        time.sleep(pause)
        raise ValueError("as planned")

    @app.task(name=f"{app.main}.steps", bind=True)
    def steps(self, n, hold_id=None):
        for i in range(n):
            self.update_state(state="PROGRESS", meta={"current": i, "total": n})
        if hold_id:
            reached, released = HOLDS[hold_id]
            reached.set()
            released.wait(WAIT)
        return n

    try:
        with thread_worker(app, pool="threads", concurrency=4, start_timeout=WAIT * 2, stop_timeout=WAIT):
            yield app
    finally:
        app.close()


def task(app, name):
    return app.tasks[f"{app.main}.{name}"]


def lose_every_message(app, monkeypatch):
    """From now on, this thread's result consumer drops what pub/sub brings (reads of the stored state pass)."""
    consumer = app.backend.result_consumer  # one backend per thread: this thread's
    real = consumer.on_state_change

    def on_state_change(meta, message):
        if message is None:  # a read of the stored state
            return real(meta, message)

    monkeypatch.setattr(consumer, "on_state_change", on_state_change)


def test_result_of_and_final_state_see_a_result_whose_message_was_lost(app, monkeypatch):
    lose_every_message(app, monkeypatch)
    add, fail = task(app, "add_slowly"), task(app, "fail_slowly")

    # The premise: a plain get() never sees a result that was stored after it began.
    lost = add.delay(2, 3, 0.2)
    with pytest.raises(CeleryTimeoutError):
        lost.get(timeout=1.0)
    stored = AsyncResult(lost.id, app=app)
    assert stored.state == "SUCCESS" and stored.result == 5, "the task had not ended: the premise is not shown"

    started = time.monotonic()
    assert result_of(add.delay(2, 3, 0.2), "add_slowly.delay(2, 3, 0.2)", timeout=WAIT) == 5
    state, value = final_state(fail.delay(0.2), "fail_slowly.delay(0.2)", timeout=WAIT)
    assert state == "FAILURE" and isinstance(value, ValueError), (state, value)
    took = time.monotonic() - started
    assert took < 2 * (checks.GET_SLICE + 1.0), f"two lost messages cost {took:.1f} s, expected about a slice each"


def test_a_task_that_never_ends_still_fails_in_one_line_at_the_timeout(app):
    hold_id = uuid.uuid4().hex
    HOLDS[hold_id] = (threading.Event(), threading.Event())
    result = task(app, "steps").delay(1, hold_id)
    started = time.monotonic()
    try:
        with pytest.raises(pytest.fail.Exception, match=r"^steps\.delay\(1\) had not ended after 1 s: does the task return\?$"):
            final_state(result, "steps.delay(1)", timeout=1.0)
        took = time.monotonic() - started
        assert 1.0 <= took < 1.0 + 2 * checks.GET_SLICE, f"final_state(timeout=1.0) gave up after {took:.2f} s"
    finally:
        HOLDS.pop(hold_id)[1].set()


def test_many_round_trips_all_arrive(any_app):
    """Lesson 02's ways of looking at a task, 40 times each; bench/results_pubsub.py runs thousands."""
    app = any_app
    add, steps = task(app, "add_slowly"), task(app, "steps")
    for i in range(40):
        assert result_of(add.delay(i, 1), f"add_slowly.delay({i}, 1)", timeout=WAIT) == i + 1

        peeked = steps.delay(3)
        AsyncResult(peeked.id, app=app).state  # a second result object: dropping it unsubscribes the channel
        assert final_state(peeked, "steps.delay(3)", timeout=WAIT) == ("SUCCESS", 3)

        hold_id = uuid.uuid4().hex
        HOLDS[hold_id] = reached, released = threading.Event(), threading.Event()
        held = steps.delay(2, hold_id)
        assert reached.wait(WAIT), "the held task never ran"
        assert AsyncResult(held.id, app=app).state == "PROGRESS"
        released.set()  # it ends and publishes while result_of subscribes again
        assert result_of(held, "steps.delay(2, <held>)", timeout=WAIT) == 2
        HOLDS.pop(hold_id)
