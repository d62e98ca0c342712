"""Lesson 06 checks: a price report built as a workflow: a chord of fetches, a summary, an error callback.

The price service is the slow part of each fetch. Most checks run the lesson's tasks on a
thread worker with 6 slots (the threads pool) and put the grader's own price service in
place of `price_service`. It records when each fetch started and ended, so the checks see
from outside whether the fetches ran side by side, and it can hold the fetches at a gate:
until all of them have started (and then let the last item finish first), or until the
check lets them go. Every wait at a gate is bounded, so a workflow that runs the fetches
one after another is slow to fail, never stuck.

One check runs a real `celery worker` process: the thread worker lets a `.get()` inside a
task pass (Celery's test worker turns that guard off), a real worker refuses it.
"""

import json
import logging
import re
import threading
import time

import pytest
from celery.backends.asynchronous import AsyncBackendMixin
from celery.result import AsyncResult
from celery.signals import task_internal_error

from labkit.checks import call, fail, wait_until

MODULE = "workflows1"
PRICES_USD = {"tea": 450, "jam": 320, "bread": 275, "milk": 120, "honey": 890}  # the grader's price service
ITEMS = ["jam", "tea", "bread", "milk"]  # not sorted, and not the reverse of the order they finish in
SLOTS = 6  # the thread worker's slots: one per item, and two more for a task that waits
GATE_LIMIT = 3.0  # the longest a fetch waits at a gate for the other fetches
WAIT = 10.0  # the longest a check waits for a workflow to end

# A callback on a chord makes Celery warn that it may one day attach it to the header tasks
# too (task_allow_error_cb_on_chord_header): not the student's fault, and under warnings-as-
# errors it would fail a correct solution. An error callback that Celery cannot send (TODO 2
# undone) makes it warn "Exception raised outside body": the checks report that in words.
pytestmark = [
    pytest.mark.filterwarnings("ignore:task_allow_error_cb_on_chord_header:PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning"),
]


class PriceService:
    """The grader's price service, put in place of the lesson's `price_service`.

    mode "instant" answers at once; "together" holds each fetch until all `expected` fetches
    have started, then lets them end last item first; "held" holds each fetch until the check
    sets `released`. An item with no price raises LookupError, like the lesson's service.
    """

    def __init__(self, mode="instant", items=(), expected=0):
        self.mode, self.items, self.expected = mode, list(items), expected or len(items)
        self.started, self.ended = {}, {}  # item -> time.monotonic()
        self.gave_up = False  # once one wait timed out, the fetches run one after another: stop waiting
        self.changed = threading.Condition()
        self.released = threading.Event()

    def __call__(self, item):  # runs on the worker's threads
        with self.changed:
            self.started[item] = time.monotonic()
            self.changed.notify_all()
            if self.mode == "together":
                self._wait(lambda: len(self.started) >= self.expected)
                if item in self.items:
                    later = self.items[self.items.index(item) + 1 :]
                    self._wait(lambda: all(other in self.ended for other in later))
        if self.mode == "held":
            self.released.wait(GATE_LIMIT + 2)
        with self.changed:
            self.ended[item] = time.monotonic()
            self.changed.notify_all()
        if item not in PRICES_USD:
            raise LookupError(f"the price service has no price for {item}")
        return PRICES_USD[item]

    def _wait(self, condition):
        if not self.gave_up and not self.changed.wait_for(condition, GATE_LIMIT):
            self.gave_up = True

    def at_most_at_once(self):
        """The largest number of fetches that were running at the same moment."""
        moments = [(t, 1) for t in self.started.values()] + [(t, -1) for t in self.ended.values()]
        running = most = 0
        for _, step in sorted(moments, key=lambda m: (m[0], m[1])):
            running += step
            most = max(most, running)
        return most


# HARNESS-CANDIDATE: move to labkit (thread_worker's teardown, before its gc.collect()).
@pytest.fixture(autouse=True)
def forget_pending_results(exercise, monkeypatch):
    """Stop waiting for results nobody will read, while the broker is still up.

    Under the thread worker, each task sent in this process subscribes to its result: the
    chord's members and body too, sent by the worker's threads, and each thread has a result
    backend object of its own (app.backend is per thread). Their waiters would stay until the
    session ends, after the broker has stopped, and each would then retry its unsubscribe
    for 20 s. So the check notes every backend the app creates, and empties them at the end.
    """
    try:
        app = exercise(MODULE).app
    except BaseException:  # noqa: BLE001 - a module that does not load fails the check itself
        yield
        return
    backends, create = [app.backend], app._get_backend

    def noted():
        backends.append(create())
        return backends[-1]

    monkeypatch.setattr(app, "_get_backend", noted)
    yield
    for backend in backends:
        if not isinstance(backend, AsyncBackendMixin):
            continue
        waiting = [waiters for mapping in backend._pending_results for waiters in list(mapping.values())]
        for result in [result for waiters in waiting for result in list(waiters.values())]:
            try:
                backend.remove_pending_result(result)
            except Exception:  # noqa: BLE001 - nothing left to tidy if the connection is gone
                pass


@pytest.fixture
def service(monkeypatch):
    """``service(mode, items)`` puts a PriceService in place of the lesson's price_service."""
    made = []

    def install(lesson, mode="instant", items=()):
        fake = PriceService(mode, items)
        monkeypatch.setattr(lesson.module, "price_service", fake)
        made.append(fake)
        return fake

    yield install
    for fake in made:
        fake.released.set()


class ErrorLog(logging.Handler):
    """Errors of the worker that the task's result does not show, such as an error callback that raised.

    Celery logs "Errback ... raised an exception" for a callback it calls in place, and sends the
    signal task_internal_error when it could not even send one (its arguments do not fit).
    Call attach() once the worker has started: its logging setup removes earlier handlers.
    """

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.lines.append(text)

    def internal_error(self, exception=None, **_):
        self.lines.append(f"Celery could not send it: {type(exception).__name__}: {exception}")

    def attach(self):
        logging.getLogger("celery").addHandler(self)

    def about(self, word):
        return [line for line in self.lines if word in line]


@pytest.fixture
def error_log():
    handler = ErrorLog()
    task_internal_error.connect(handler.internal_error, weak=False)
    yield handler
    task_internal_error.disconnect(handler.internal_error)
    logging.getLogger("celery").removeHandler(handler)


def poll(condition, timeout):
    """Poll ``condition`` until it returns something truthy, for at most ``timeout`` s; return its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def expected_report(items, rate):
    lines = [[item, round(PRICES_USD[item] * rate)] for item in items]
    return {"lines": lines, "total": sum(cents for _, cents in lines)}


def stored_status(redis_client, report_id):
    raw = redis_client.get(f"report:{report_id}")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"unreadable": raw[:80]}


def start(lesson, report_id, items, rate=0.92):
    """``start_report(...)``: it must send the workflow and hand back an AsyncResult."""
    description = f"start_report({report_id!r}, {items!r}, rate={rate})"
    result = call(description, lesson.start_report, report_id, items, rate)
    if not isinstance(result, AsyncResult):
        fail(
            f"{description} returned {result!r}; expected the AsyncResult of the workflow's last step, "
            "which is what apply_async() (or delay()) of the workflow returns (TODO 3)."
        )
    return description, result


def why(exc, todo="TODO 3"):
    """What a workflow's error says about which TODO to look at."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NotImplementedError):
        return f"{text}: that TODO is still to do."
    if "fetch() takes" in text:
        return (
            f"{text}. fetch(item) was handed the result of the step before it as an extra first argument. "
            "Which steps must ignore what came before them (.si), and which need it (.s)? (TODO 3)"
        )
    if "to_euros()" in text or "summarize()" in text:
        return (
            f"{text}. to_euros needs the row fetched just before it, and summarize the list of every row: "
            "which signatures take the result of the step before them (.s), with which partial arguments? (TODO 3)"
        )
    if todo != "TODO 3":
        return f"{text} ({todo})."
    return f"{text}. Does each step get what the step before it returns? (TODO 3)"


def check_report(report, expected, description, todo="TODO 3"):
    """The report's lines and total must be the expected ones; other keys are the student's business."""
    got = {key: report.get(key) for key in expected} if isinstance(report, dict) else report
    if got == expected:
        return
    lines = got.get("lines") if isinstance(got, dict) else None
    try:
        shuffled = lines != expected["lines"] and sorted(map(list, lines)) == sorted(expected["lines"])
    except TypeError:  # not a list of [item, cents] lines
        shuffled = False
    if shuffled:
        fail(
            f"{description} listed the lines as {lines}; expected them in the order of the items, "
            f"{expected['lines']}. A chord hands its body the results in the order of its header: keep it (TODO 1)."
        )
    fail(f"{description} ended with {report!r}, expected {expected!r} ({todo}).")


def report_of(result, description, timeout=WAIT, todo="TODO 3"):
    """The workflow's (or task's) return value; a failure or a hang fails the check in plain words."""
    hang = " is every step in the workflow, and does the AsyncResult belong to its last step, summarize?"
    hang = hang if todo == "TODO 3" else ""
    ended = f"{description} had not ended after {timeout:g} s (state {result.state}):{hang} ({todo})"
    wait_until(result.ready, timeout, ended)
    try:
        return result.get(timeout=1)
    except Exception as exc:
        problem = f"{description} failed in the worker with {why(exc, todo)}"
    fail(problem)


# ---------------------------------------------------------------- TODO 1: summarize


SUMMARIES = [
    ([["jam", 294], ["tea", 414], ["bread", 253]], "three-items"),
    ([["milk", 110]], "one-item"),
    ([], "no-items"),
]


@pytest.mark.task(1)
@pytest.mark.parametrize("lines", [lines for lines, _ in SUMMARIES], ids=[name for _, name in SUMMARIES])
def test_summarize_lists_the_rows_in_order_with_the_total(exercise, thread_worker, lines):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    rows = [{"item": item, "eur_cents": cents} for item, cents in lines]
    description = f"summarize.delay({rows!r}, 'r1')"
    report = report_of(lesson.summarize.delay(rows, "r1"), description, todo="TODO 1")
    check_report(report, {"lines": lines, "total": sum(cents for _, cents in lines)}, description, "TODO 1")


@pytest.mark.task(1)
def test_summarize_saves_the_report_as_done(exercise, thread_worker, redis_client):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    lines = [["jam", 294], ["tea", 414]]
    rows = [{"item": item, "eur_cents": cents} for item, cents in lines]
    description = f"summarize.delay({rows!r}, 'r2')"
    report_of(lesson.summarize.delay(rows, "r2"), description, todo="TODO 1")
    status = stored_status(redis_client, "r2")
    expected = {"status": "done", "lines": lines, "total": 708}
    got = {key: status.get(key) for key in expected} if isinstance(status, dict) else status
    assert got == expected, (
        f"{description} returned; the Redis key report:r2 holds {status!r}, expected {expected!r}: "
        "save the report with save_status(report_id, 'done', ...) (TODO 1)."
    )


# ---------------------------------------------------------------- TODO 2: the error callback


@pytest.mark.task(2)
def test_error_callback_marks_the_report_failed(exercise, thread_worker, service, redis_client, error_log):
    lesson = exercise(MODULE)
    service(lesson)
    thread_worker(lesson.app)
    error_log.attach()
    description = "fetch.apply_async(('plum',), link_error=report_failed.s('r3')) (plum has no price)"
    try:
        fetched = lesson.fetch.apply_async(("plum",), link_error=lesson.report_failed.s("r3"))
    except Exception as exc:
        fail(f"{description} raised {type(exc).__name__}: {exc} (TODO 2).")
    wait_until(fetched.ready, WAIT, f"{description} had not ended after {WAIT:g} s (state {fetched.state}).")
    if fetched.state == "SUCCESS":
        fail(f"{description} returned {fetched.result!r}: the given fetch raises for an unknown item. Was it changed?")

    def failed_or_broken():
        status = stored_status(redis_client, "r3")
        return (isinstance(status, dict) and status.get("status") == "failed") or error_log.about("report_failed")

    poll(failed_or_broken, 5)
    status = stored_status(redis_client, "r3")
    if not (isinstance(status, dict) and status.get("status") == "failed"):
        logged = error_log.about("report_failed")
        if not logged:
            fail(
                f"{description}: fetch failed, but report:r3 still holds {status!r} after 5 s, and report_failed "
                "logged no error. Did report_failed run at all (TODO 2)?"
            )
        if "NotImplementedError" in logged[0]:
            fail(f"{description}: Celery called report_failed; it raised NotImplementedError: TODO 2 is still to do.")
        fail(
            f"{description}: fetch failed and Celery went to call report_failed. {logged[0][:300]}. Celery calls "
            "an error callback as report_failed(request, exc, traceback), then the arguments of its signature (TODO 2)."
        )
    error = str(status.get("error", ""))
    assert "plum" in error, (
        f"{description}: report:r3 holds {status!r}; expected an 'error' text that names the problem (the "
        "LookupError about plum). Celery hands the exception to a callback declared (request, exc, traceback, ...); "
        "one declared (task_id, ...) gets only the failed task's id (TODO 2)."
    )


# ---------------------------------------------------------------- TODO 3: the workflow


@pytest.mark.task(3)
def test_report_totals_the_items_in_euros(exercise, thread_worker, service):
    lesson = exercise(MODULE)
    service(lesson)
    thread_worker(lesson.app, pool="threads", concurrency=SLOTS)
    items, rate = ["jam", "tea", "bread"], 0.5
    description, result = start(lesson, "r4", items, rate)
    report = report_of(result, description)
    check_report(report, expected_report(items, rate), description)


@pytest.mark.task(3)
def test_report_fetches_the_items_side_by_side(exercise, thread_worker, service):
    lesson = exercise(MODULE)
    fake = service(lesson, "together", ITEMS)
    thread_worker(lesson.app, pool="threads", concurrency=SLOTS)
    description, result = start(lesson, "r5", ITEMS)
    report_of(result, description, timeout=WAIT + len(ITEMS) * GATE_LIMIT)
    fetched = len(fake.started)
    if fetched != len(ITEMS):
        fail(f"{description}: the price service was asked for {fetched} item(s), expected {len(ITEMS)} (TODO 3).")
    most = fake.at_most_at_once()
    assert most == len(ITEMS), (
        f"{description} on a worker with {SLOTS} slots: at most {most} of the {len(ITEMS)} fetches ran at the same "
        "time. The items do not depend on each other: their fetches go side by side, in a group, not one "
        "after another in a chain or in one task (TODO 3)."
    )


@pytest.mark.task(3)
def test_report_keeps_the_order_of_the_items(exercise, thread_worker, service):
    lesson = exercise(MODULE)
    fake = service(lesson, "together", ITEMS)
    thread_worker(lesson.app, pool="threads", concurrency=SLOTS)
    description, result = start(lesson, "r6", ITEMS)
    report = report_of(result, description, timeout=WAIT + len(ITEMS) * GATE_LIMIT)
    finished = sorted(fake.ended, key=fake.ended.get)
    if fake.gave_up or finished != ITEMS[::-1]:
        fail(f"{description}: the fetches did not run side by side, so this check cannot test the order: TODO 3 first.")
    lines = report.get("lines") if isinstance(report, dict) else report
    listed = isinstance(lines, list) and all(isinstance(line, list) and line for line in lines)
    order = [line[0] for line in lines] if listed else lines
    assert order == ITEMS, (
        f"{description}: the fetches finished in the order {finished}; the report lists {order}, expected the "
        f"order asked for, {ITEMS}. A chord hands its body the results in the order of its header, whatever "
        "order they finished in: build the lines from that list (TODO 1) and the header in the items' order (TODO 3)."
    )


@pytest.mark.task(3)
def test_report_reads_running_while_prices_are_fetched(exercise, thread_worker, service, redis_client):
    lesson = exercise(MODULE)
    fake = service(lesson, "held", ITEMS)
    thread_worker(lesson.app, pool="threads", concurrency=SLOTS)
    sent = time.monotonic()
    description, result = start(lesson, "r7", ITEMS)
    took = time.monotonic() - sent
    if took > GATE_LIMIT:
        fail(
            f"{description} took {took:.1f} s to return, while the fetches were held: it waited for the work. "
            "It must only send the workflow (apply_async) and return its AsyncResult at once (TODO 3)."
        )
    wait_until(
        lambda: fake.started or result.ready(),
        WAIT,
        f"{description}: no fetch started within {WAIT:g} s; is a group of fetches in the workflow (TODO 3)?",
    )
    status = stored_status(redis_client, "r7")
    fake.released.set()
    if not fake.started:
        report_of(result, description)  # ended without fetching: fail with its error
        fail(f"{description} ended without fetching any price (TODO 3).")
    assert isinstance(status, dict) and status.get("status") == "running", (
        f"{description}: while the prices were being fetched, report:r7 held {status!r}, expected "
        "{'status': 'running'}: mark_running is the workflow's first step (TODO 3)."
    )
    report_of(result, description)
    status = stored_status(redis_client, "r7")
    assert isinstance(status, dict) and status.get("status") == "done", (
        f"{description} ended; report:r7 holds {status!r}, expected the status 'done' that summarize saves "
        "(TODO 1): does a step after summarize overwrite it (TODO 3)?"
    )


@pytest.mark.task(3)
def test_report_runs_on_a_real_worker_process(exercise, process_worker):
    lesson = exercise(MODULE)
    # The real `celery worker` command, with the lesson's own price service, sped up. Its threads
    # pool refuses a .get() inside a task exactly as prefork does (both measured), and it stops
    # in about 1 s instead of 2.5 s.
    process_worker(MODULE, pool="threads", concurrency=3, env={"FETCH_SECONDS": "0.05"})
    items = ["tea", "honey", "milk"]
    description, result = start(lesson, "r8", items)
    description += " on a real `celery worker` process"
    wait_until(result.ready, WAIT, f"{description} had not ended after {WAIT:g} s (state {result.state}) (TODO 3).")
    try:
        report = result.get(timeout=1)
    except RuntimeError as exc:
        if "Never call result.get() within a task" not in str(exc):
            raise
        problem = (
            f"{description} failed: RuntimeError: Never call result.get() within a task! The thread worker lets "
            "a .get() inside a task pass (Celery's test worker turns the guard off), a real worker refuses it. "
            "Let the chord hand the results to summarize instead of waiting for them in a task (TODO 3)."
        )
    except Exception as exc:
        problem = f"{description} failed in the worker with {why(exc)}"
    else:
        problem = ""
    if problem:
        fail(problem)
    check_report(report, expected_report(items, 0.92), description)


# ---------------------------------------------------------------- TODO 4: failures


@pytest.mark.task(4)
def test_failed_item_marks_the_report_failed(exercise, thread_worker, service, redis_client, error_log):
    lesson = exercise(MODULE)
    service(lesson)
    thread_worker(lesson.app, pool="threads", concurrency=SLOTS)
    error_log.attach()
    items = ["jam", "plum", "tea"]
    description, result = start(lesson, "r9", items)
    description += " (plum has no price)"
    wait_until(
        result.ready,
        WAIT,
        f"{description} had not ended after {WAIT:g} s (state {result.state}): a failed fetch must end the "
        "workflow, not leave it waiting (TODO 3).",
    )
    if result.state == "SUCCESS":
        fail(
            f"{description} succeeded with {result.result!r}; a report without plum's price is wrong. Let the "
            "LookupError fail the chord: its body does not run then (TODO 3)."
        )

    def settled():
        status = stored_status(redis_client, "r9")
        moved_on = isinstance(status, dict) and status.get("status") != "running"
        return moved_on or error_log.about("report_failed")

    poll(settled, 5)
    status = stored_status(redis_client, "r9")
    if not (isinstance(status, dict) and status.get("status") == "failed"):
        logged = error_log.about("report_failed")
        if "report_failed" in repr(result.result):  # Celery stored why it could not send the callback
            logged.append(f"It stored instead: {result.result!r}")
        if logged:
            fail(f"{description}: Celery went to call report_failed. {logged[0][:300]} (TODO 2).")
        if status is None or status.get("status") == "running":
            fail(
                f"{description} failed, but report:r9 still holds {status!r} after 5 s: report_failed never ran. "
                "Attach it to the workflow with its report id (TODO 4); an error callback put on a chord before "
                "more steps are chained after it is dropped."
            )
        fail(f"{description}: report:r9 holds {status!r}, expected the status 'failed' (TODO 4).")
    error = str(status.get("error", ""))
    if "plum" not in error and re.search(r"\w+Error", error):
        fail(
            f"{description}: report:r9 holds {status!r}: the workflow failed on an error of its own before the "
            "missing price could matter. Make the TODO 3 checks pass first."
        )
    assert "plum" in error, (
        f"{description}: report:r9 holds {status!r}; expected an 'error' text that names the problem "
        "(the LookupError about plum) (TODO 2)."
    )
