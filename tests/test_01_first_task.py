"""Lesson 01 checks: a Celery app, two tasks, apply_async and results by id."""

import json
import time
from datetime import datetime

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from labkit.checks import call, fail, result_of
from labkit.workers import broker_mismatch

MODULE = "first_task1"


def require_task(lesson, name, todo):
    task = getattr(lesson, name)
    if not hasattr(task, "delay"):
        fail(f"`{name}` is a plain function, not a Celery task: decorate it with @app.task (TODO {todo}).")
    return task


def require_grader_broker(lesson):
    """Fail before sending anything if the app would publish somewhere else (TODO 1)."""
    problem = broker_mismatch(lesson.app)
    if problem:
        fail(f"Tasks would not reach the grader's Redis (TODO 1): {problem}")


@pytest.mark.task(1)
def test_app_sends_tasks_through_redis_url(exercise, redis_client):
    lesson = exercise(MODULE)
    require_grader_broker(lesson)
    lesson.count_words.delay("one two")
    queued = redis_client.llen("celery")
    assert queued == 1, (
        f"Sent count_words.delay('one two') with no worker running; the Redis at REDIS_URL holds {queued} "
        "message(s) in the 'celery' queue, expected 1. Is broker= set to REDIS_URL?"
    )


@pytest.mark.task(1)
def test_app_stores_results_in_redis_url(exercise, redis_client, thread_worker):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    result = lesson.count_words.delay("one two")
    try:
        result.get(timeout=10)
    except Exception:
        pass  # this check is about where the result goes, not about the task's code
    stored = redis_client.get(f"celery-task-meta-{result.id}")
    assert stored is not None, (
        "Ran count_words on a worker; no result was stored in the Redis at REDIS_URL "
        f"(no key celery-task-meta-{result.id}). Is backend= set to REDIS_URL?"
    )


@pytest.mark.task(2)
@pytest.mark.parametrize("x, y", [(2, 3), (-1, 1), (10, 32)], ids=["small", "negative", "larger"])
def test_add_returns_the_sum(exercise, thread_worker, x, y):
    lesson = exercise(MODULE)
    add = require_task(lesson, "add", todo=2)
    thread_worker(lesson.app)
    value = result_of(add.delay(x, y), f"add.delay({x}, {y})")
    assert value == x + y, f"add.delay({x}, {y}) returned {value!r}, expected {x + y}."


@pytest.mark.task(3)
@pytest.mark.parametrize(
    "text, words", [("the quick brown fox", 4), ("  spaced   out ", 2), ("", 0)], ids=["plain", "spaces", "empty"]
)
def test_count_words_counts_words(exercise, thread_worker, text, words):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    value = result_of(lesson.count_words.delay(text), f"count_words.delay({text!r})")
    assert value == words, f"count_words.delay({text!r}) returned {value!r}, expected {words}."


@pytest.mark.task(4)
def test_add_later_sends_a_countdown(exercise, redis_client):
    lesson = exercise(MODULE)
    require_task(lesson, "add", todo=2)
    require_grader_broker(lesson)
    sent_at = time.time()
    call("add_later(2, 3, 30)", lesson.add_later, 2, 3, 30)
    raw = redis_client.lindex("celery", 0)
    assert raw is not None, "Called add_later(2, 3, 30) with no worker running; no message reached the 'celery' queue."
    message = json.loads(raw)
    headers = message["headers"]
    assert headers.get("task", "").endswith(".add"), f"add_later queued {headers.get('task')!r}, expected the add task."
    eta = headers.get("eta")
    assert eta, "add_later(2, 3, 30) queued add with no ETA: pass countdown=seconds to apply_async."
    delay = datetime.fromisoformat(eta).timestamp() - sent_at
    assert 25 <= delay <= 35, f"add_later(2, 3, 30) queued add to run in {delay:.0f} s, expected about 30 s."


@pytest.mark.task(4)
def test_add_later_result_arrives_after_the_countdown(exercise, thread_worker):
    lesson = exercise(MODULE)
    require_task(lesson, "add", todo=2)
    thread_worker(lesson.app)
    started = time.monotonic()
    result = call("add_later(20, 22, 0.2)", lesson.add_later, 20, 22, 0.2)
    value = result_of(result, "add_later(20, 22, 0.2)")
    waited = time.monotonic() - started
    assert value == 42, f"add_later(20, 22, 0.2) gave {value!r}, expected 42."
    assert waited >= 0.15, f"add_later(20, 22, 0.2) gave its result after {waited:.2f} s, expected to wait about 0.2 s."


@pytest.mark.task(5)
def test_fetch_result_reads_a_finished_task(exercise, thread_worker):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    sent = lesson.count_words.delay("a b c")
    result_of(sent, "count_words.delay('a b c')")
    value = call("fetch_result(task_id, 5)", lesson.fetch_result, sent.id, 5)
    assert value == 3, f"fetch_result(<id of count_words('a b c')>, 5) returned {value!r}, expected 3."


@pytest.mark.task(5)
def test_fetch_result_gives_up_after_the_timeout(exercise):
    lesson = exercise(MODULE)
    started = time.monotonic()
    try:
        value = call("fetch_result(unknown_id, 0.5)", lesson.fetch_result, "never-sent", 0.5, expected=(CeleryTimeoutError,))
    except CeleryTimeoutError:
        value = None
    else:
        fail(f"fetch_result(unknown_id, 0.5) returned {value!r}; expected celery.exceptions.TimeoutError after 0.5 s.")
    waited = time.monotonic() - started
    assert waited < 5, f"fetch_result(unknown_id, 0.5) gave up after {waited:.1f} s, expected about 0.5 s."
