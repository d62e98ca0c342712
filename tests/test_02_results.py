"""Lesson 02 checks: task states, progress seen from outside, status by id, expiry, ignored results.

To look at a task *while it runs*, a check holds it at a known point (a Hold: two
threading events) and releases it afterwards. The worker is a thread of this
process, so it sees the checks' events and their patched `process_one`.
"""

import threading
import uuid

import pytest
from celery.result import AsyncResult

from labkit.checks import call, fail, final_state, result_of, wait_until

MODULE = "results1"
ITEMS = ["tea", "jam", "bread", "milk"]
HOLD_LIMIT = 10.0  # the longest a task waits at a Hold, even if nothing releases it
PROBE = "labkit.results_probe"  # the grader's own task, added to the lesson's app
HOLDS = {}  # Hold.id -> Hold, for the probe task


class Hold:
    """A point where a running task waits until the check releases it."""

    def __init__(self):
        self.id = uuid.uuid4().hex
        self.reached = threading.Event()
        self.released = threading.Event()

    def pause(self):  # runs inside the task, on the worker's thread
        self.reached.set()
        self.released.wait(HOLD_LIMIT)


@pytest.fixture
def holds(thread_worker):
    """``holds()`` makes a Hold. All are released when the check ends, before the worker stops."""
    made = []

    def make():
        hold = Hold()
        HOLDS[hold.id] = hold
        made.append(hold)
        return hold

    yield make
    for hold in made:
        hold.released.set()
        HOLDS.pop(hold.id, None)


def probe_task(app):
    """A task of the grader's own on the lesson's app (so TODO 1, 2 and 5 need no other TODO)."""
    if PROBE not in app.tasks:

        @app.task(name=PROBE)
        def probe(hold_id=None):
            if hold_id:
                HOLDS[hold_id].pause()
            return "probed"

    return app.tasks[PROBE]


def hold_before(lesson, monkeypatch, hold, item):
    """Make process_items wait at `hold` just before it calls process_one(item)."""
    real = lesson.process_one

    def process_one(value):
        if value == item:
            hold.pause()
        return real(value)

    monkeypatch.setattr(lesson.module, "process_one", process_one)


def wait_for(hold, result, description, missed):
    """Wait until the task reaches `hold`; if it ends first, fail at once with what happened."""
    wait_until(
        lambda: hold.reached.is_set() or result.ready(),
        10,
        f"{description} was not running after 10 s: is a worker consuming its queue?",
    )
    if not hold.reached.is_set():
        result_of(result, description)  # a failed task fails the check with its own error
        fail(f"{description} finished without {missed}.")


def finished(result, description):
    """The task's return value, once it has ended (at most 10 s); a failed task fails the check."""
    final_state(result, description, 10)
    return result_of(result, description)  # ended, so this only reads what arrived


def process_items_task(lesson, for_todo=3):
    task = lesson.process_items
    if not hasattr(task, "delay"):
        if for_todo == 3:
            fail("`process_items` is a plain function, not a Celery task: decorate it with @app.task(bind=True) (TODO 3).")
        fail(f"This check of TODO {for_todo} runs process_items, which is not a Celery task yet: do TODO 3 first.")
    return task


def send(task, items):
    """``process_items.delay(items)``; a call that Celery refuses at once fails the check in one line."""
    try:
        return task.delay(items)
    except TypeError as exc:
        problem = (
            f"process_items.delay({items!r}) raised TypeError: {exc}. Declared as process_items(self, items), "
            "it needs @app.task(bind=True), so that Celery passes the task itself as `self` (TODO 3)."
        )
    fail(problem)


@pytest.mark.task(1)
def test_app_shows_a_running_task_as_started(exercise, thread_worker, holds):
    lesson = exercise(MODULE)
    probe = probe_task(lesson.app)
    thread_worker(lesson.app)
    hold = holds()
    result = probe.delay(hold.id)
    wait_for(hold, result, "A grader's task on the results1 app", "pausing where the check holds it")
    state = AsyncResult(result.id, app=lesson.app).state
    assert state == "STARTED", (
        f"Held a task on the results1 app while it ran; AsyncResult(id).state read {state!r}, expected 'STARTED'. "
        "Set task_track_started=True in app.conf (TODO 1)."
    )
    hold.released.set()
    finished(result, "A grader's task on the results1 app")


@pytest.mark.task(2)
def test_app_expires_results_within_an_hour(exercise, thread_worker, redis_client):
    lesson = exercise(MODULE)
    probe = probe_task(lesson.app)
    thread_worker(lesson.app)
    result = probe.delay()
    finished(result, "A grader's task on the results1 app")
    ttl = redis_client.ttl(f"celery-task-meta-{result.id}")
    if ttl == -2:
        fail("Ran a task on the results1 app; no key celery-task-meta-<id> was stored. Is backend= still REDIS_URL?")
    seen = "never expires (no TTL)" if ttl == -1 else f"expires in {ttl} s"
    assert 0 < ttl <= 3600, (
        f"Ran a task on the results1 app; its Redis key celery-task-meta-<id> {seen}, expected at most 3600 s "
        "(one hour). Set result_expires in app.conf (TODO 2)."
    )


@pytest.mark.task(3)
@pytest.mark.parametrize("items", [["tea", "jam", "bread"], []], ids=["three_items", "no_items"])
def test_process_items_returns_a_summary(exercise, thread_worker, items):
    lesson = exercise(MODULE)
    task = process_items_task(lesson)
    thread_worker(lesson.app)
    value = finished(send(task, items), f"process_items.delay({items!r})")
    expected = {"processed": len(items), "results": [item.upper() for item in items]}
    assert value == expected, f"process_items.delay({items!r}) returned {value!r}, expected {expected!r} (TODO 3)."


@pytest.mark.task(3)
def test_process_items_reports_progress_while_running(exercise, thread_worker, holds, monkeypatch):
    lesson = exercise(MODULE)
    task = process_items_task(lesson)
    thread_worker(lesson.app)
    hold = holds()
    hold_before(lesson, monkeypatch, hold, "bread")  # 2 of the 4 items are done by then
    description = f"process_items.delay({ITEMS!r})"
    result = send(task, ITEMS)
    wait_for(hold, result, description, "calling process_one('bread'): call process_one on each item (TODO 3)")
    seen = AsyncResult(result.id, app=lesson.app)
    state, info = seen.state, seen.info
    progress = info if isinstance(info, dict) else {}
    assert state == "PROGRESS" and (progress.get("current"), progress.get("total")) == (2, 4), (
        f"Held {description} just before 'bread' (2 of 4 items done); its state read {state!r} with info {info!r}, "
        "expected 'PROGRESS' with current=2 and total=4. Call self.update_state after each item (TODO 3)."
    )
    hold.released.set()
    value = finished(result, description)
    assert isinstance(value, dict) and value.get("processed") == 4, (
        f"Released {description}; it returned {value!r}, expected processed=4 (TODO 3)."
    )


@pytest.mark.task(4)
def test_task_status_reads_an_unknown_id_as_pending(exercise):
    lesson = exercise(MODULE)
    status = call("task_status('no-such-task')", lesson.task_status, "no-such-task")
    assert isinstance(status, dict) and status.get("id") == "no-such-task" and status.get("state") == "PENDING", (
        f"task_status('no-such-task') returned {status!r}, expected {{'id': 'no-such-task', 'state': 'PENDING'}}: "
        "Celery cannot tell an unknown id from a waiting task (TODO 4)."
    )


@pytest.mark.task(4)
def test_task_status_gives_the_result_on_success(exercise, thread_worker):
    lesson = exercise(MODULE)
    task = process_items_task(lesson, for_todo=4)
    thread_worker(lesson.app)
    sent = send(task, ["tea", "jam"])
    finished(sent, "process_items.delay(['tea', 'jam'])")
    status = call("task_status(<id of process_items(['tea', 'jam'])>)", lesson.task_status, sent.id)
    expected = {"processed": 2, "results": ["TEA", "JAM"]}
    assert isinstance(status, dict) and status.get("state") == "SUCCESS" and status.get("result") == expected, (
        f"Ran process_items(['tea', 'jam']); task_status(<its id>) returned {status!r}, "
        f"expected state 'SUCCESS' and result {expected!r} (TODO 4)."
    )


@pytest.mark.task(4)
def test_task_status_gives_the_progress_while_running(exercise, thread_worker, holds, monkeypatch):
    lesson = exercise(MODULE)
    task = process_items_task(lesson, for_todo=4)
    thread_worker(lesson.app)
    hold = holds()
    hold_before(lesson, monkeypatch, hold, "jam")  # 1 of the 4 items is done by then
    description = f"process_items.delay({ITEMS!r})"
    result = send(task, ITEMS)
    wait_for(hold, result, description, "calling process_one('jam'): finish TODO 3 first")
    status = call("task_status(<id of the running task>)", lesson.task_status, result.id)
    status = status if isinstance(status, dict) else {"returned": status}
    progress = status.get("progress") if isinstance(status.get("progress"), dict) else {}
    assert status.get("state") == "PROGRESS" and (progress.get("current"), progress.get("total")) == (1, 4), (
        f"Held {description} just before 'jam' (1 of 4 items done); task_status(<its id>) returned {status!r}, "
        "expected state 'PROGRESS' and progress {'current': 1, 'total': 4} (TODO 4)."
    )
    hold.released.set()
    finished(result, description)


@pytest.mark.task(4)
def test_task_status_gives_the_error_text_on_failure(exercise, thread_worker):
    lesson = exercise(MODULE)
    task = process_items_task(lesson, for_todo=4)
    thread_worker(lesson.app)
    sent = send(task, ["tea", ""])
    final_state(sent, "process_items.delay(['tea', ''])", 10)
    status = call("task_status(<id of process_items(['tea', ''])>)", lesson.task_status, sent.id)
    error = status.get("error") if isinstance(status, dict) else None
    assert isinstance(error, str) and status.get("state") == "FAILURE" and "cannot process ''" in error, (
        f"Ran process_items(['tea', '']) ('' makes process_one raise ValueError); task_status(<its id>) returned "
        f"{status!r}, expected state 'FAILURE' and an 'error' text that contains \"cannot process ''\" (TODO 4)."
    )


@pytest.mark.task(5)
def test_record_event_runs_but_stores_no_result(exercise, thread_worker, redis_client):
    lesson = exercise(MODULE)
    probe = probe_task(lesson.app)
    if not hasattr(lesson.record_event, "delay"):
        fail("`record_event` is a plain function, not a Celery task: keep its @app.task decorator (TODO 5).")
    thread_worker(lesson.app)
    sent = lesson.record_event.delay("signup")
    # The solo worker runs tasks in the order they were sent, so once the probe has
    # returned, record_event has ended and stored its result, if it stores one.
    finished(probe.delay(), "A grader's task sent after record_event")
    events = redis_client.lrange("events", 0, -1)
    assert events == [b"signup"], (
        f"record_event.delay('signup') ran; the Redis list 'events' holds {events!r}, expected [b'signup']. "
        "Its body is given: has it changed?"
    )
    stored = redis_client.exists(f"celery-task-meta-{sent.id}")
    state = AsyncResult(sent.id, app=lesson.app).state
    key = "exists" if stored else "is absent"
    assert not stored and state == "PENDING", (
        f"record_event.delay('signup') ran; its key celery-task-meta-<id> {key} and its state reads {state!r}, "
        "expected no key and 'PENDING' (no result stored). Give the task ignore_result=True (TODO 5)."
    )
