"""Lesson 09 checks: task events seen by a real Flower, `celery inspect ping`, and the metrics and
log lines that the student's signal handlers keep.

The four checks read one shared run, made once for this file: a prefork worker and Flower take
about a second each to start, and one run keeps the lesson within its time budget.

1. Flower starts (`celery -A monitoring1 flower`, FLOWER_UNAUTHENTICATED_API=true), and the run
   waits until it has subscribed to the events: events published before that never reach it.
2. The real `celery -A monitoring1 worker` starts, prefork, **without -E**: task events come from
   the app's configuration (TODO 1) or not at all.
3. `celery -A monitoring1 inspect ping -d <worker>` runs as a real command, while
4. nine tasks are sent: successes, permanent failures, retries, and a task that retries, then fails.
5. Flower's API and /metrics are read until they show every task (or for a few seconds).
6. Once the worker reports no active task (`inspect active`), every signal handler has finished.
   The counters are then read with the module's own task_metrics() in this process, as a
   dashboard would: counters kept in a pool process's memory read as empty here. The worker's
   log is read last.
"""

from __future__ import annotations

import gc
import re
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from celery import signals
from celery.utils.nodenames import host_format

from labkit import workers
from labkit.checks import fail
from labkit.loader import LessonError, load_exercise
from labkit.manifest import lesson_of_test_file, load_course
from labkit.flower import flower_events, flower_get, flower_process, wait_for_flower
from labkit.procs import ChildProcess, ProcessError

MODULE = "monitoring1"
# What the run sends: (task, args, kwargs). fetch_rate's API is down for its first `outages` tries.
WORKLOAD = [
    ("resize_image", ("cat.jpg",), {"seconds": 0.25}),
    ("resize_image", ("dog.jpg",), {"seconds": 0.25}),
    ("resize_image", ("logo.png",), {}),
    ("import_feed", ("https://shop.example/feed.xml",), {}),
    ("import_feed", ("ftp://old.example/feed.xml",), {}),
    ("import_feed", ("http://shop.example/feed.xml",), {}),
    ("fetch_rate", ("EUR",), {}),
    ("fetch_rate", ("USD",), {"outages": 2}),
    ("fetch_rate", ("GBP",), {"outages": 5}),
]
TASKS = ("resize_image", "import_feed", "fetch_rate")
SLEPT = 0.5  # seconds: resize_image's runs, together
WAIT = 15.0  # the longest the run waits for the tasks to end
SETTLE = 3.0  # the longest it waits for Flower to show what already happened
SIGNALS = ("task_prerun", "task_postrun", "task_success", "task_failure", "task_retry")
OUTCOMES = {  # an outcome, and the words that say it in a log line (whole words, any case)
    "succeeded": re.compile(r"\b(succeeded|success)\b", re.IGNORECASE),
    "failed": re.compile(r"\b(failed|failure)\b", re.IGNORECASE),
    "retried": re.compile(r"\b(retried|retry)\b", re.IGNORECASE),
}
STATE_OUTCOME = {"SUCCESS": "succeeded", "FAILURE": "failed"}
# Celery's own lines about a task, which carry its id too: "Task monitoring1.x[<id>] received", ...
CELERY_LINE = re.compile(r"\bTask [\w.]+\[[0-9a-f-]{36}\] (received|succeeded in|raised unexpected|retry:)")


@dataclass
class Sent:
    """One task the run sent, and how it must end."""

    task: str  # its function's name in the module
    name: str  # its Celery name, "monitoring1.<function>"
    call: str  # how it was sent, as a student reads it
    id: str
    state: str  # the final state it must reach
    retries: int  # how many times it must be retried on the way
    result: object = None  # its AsyncResult
    ended: str = ""  # the state it reached
    value: object = None  # what it returned, or the exception it failed with

    @property
    def outcome(self) -> str:
        return STATE_OUTCOME[self.state]


@dataclass
class Run:
    """What the shared run saw; each check reads its part."""

    problem: str = ""  # why the run could not happen at all
    worker: str = ""  # the worker's node name, e.g. labkit-process-1a2b3c4d@vm
    sent: list[Sent] = field(default_factory=list)
    ping: str = ""  # the output of `celery inspect ping`
    ping_code: int | None = None
    flower_problem: str = ""
    flower_workers: dict = field(default_factory=dict)
    flower_tasks: dict = field(default_factory=dict)
    flower_events: dict = field(default_factory=dict)  # {(task name, event type): count}
    metrics: dict = field(default_factory=dict)  # {task name: task_metrics(name)}
    metrics_problem: str = ""
    keys: list[str] = field(default_factory=list)  # the Redis keys the run left, Celery's own left out
    log: str = ""  # the worker's output
    handlers: dict = field(default_factory=dict)  # {signal: [handler names of the module]}, after gc

    def require(self) -> None:
        if self.problem:
            fail(self.problem)
        for sent in self.sent:
            if sent.ended != sent.state:
                value = sent.value
                value = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else repr(value)
                fail(
                    f"{sent.call} ended {sent.ended} ({value}), expected {sent.state}: the checks need the three tasks "
                    "as the lesson gives them. `make reset LESSON=09` shows the starter's."
                )

    def of(self, task: str) -> list[Sent]:
        return [sent for sent in self.sent if sent.task == task]

    def handler_errors(self) -> list[str]:
        """The worker's "Signal handler <fn> raised: <error>" lines, shortened."""
        found = []
        for line in self.log.splitlines():
            if "Signal handler" in line and " raised: " in line:
                handler = re.search(r"<function (\S+)", line)
                error = line.split(" raised: ", 1)[1].strip()
                found.append(f"{handler.group(1) if handler else 'a handler'} raised {error}")
        return sorted(set(found))


# --- Flower ----------------------------------------------------------------------------------


def flower_lists(flower: ChildProcess, worker: str, timeout: float = 10.0):
    """GET /api/workers?refresh=1 until it lists `worker` (or `timeout` s); its last (status, body).

    Flower inspects the workers once as it starts, and a refresh asked for meanwhile returns that
    inspection's answer, given before the worker was up; the next refresh asks again.
    """
    deadline = time.monotonic() + timeout
    while True:
        status, listed = flower_get(flower, "/api/workers?refresh=1")
        if status != 200 or not isinstance(listed, dict) or worker in listed or time.monotonic() > deadline:
            return status, listed


def flower_shows_every_task(run: Run, flower: ChildProcess) -> bool:
    status, tasks = flower_get(flower, "/api/tasks")
    run.flower_tasks = tasks if status == 200 and isinstance(tasks, dict) else {}
    return all(run.flower_tasks.get(sent.id, {}).get("state") == sent.ended for sent in run.sent)


# --- The student's signal handlers, seen from this process ------------------------------------


def _resolve(receiver):
    return receiver() if isinstance(receiver, weakref.ReferenceType) else receiver


def handlers_of(module: str) -> dict[str, list[str]]:
    """{signal: names of the module's functions connected to it}, after a garbage collection.

    A handler connected by a weak reference (the default) to a function nobody else holds,
    such as a lambda or a function defined inside another function, is gone by then.
    """
    gc.collect()
    found = {}
    for name in SIGNALS:
        receivers = [_resolve(receiver) for _, receiver in getattr(signals, name).receivers]
        found[name] = [getattr(fn, "__name__", "?") for fn in receivers if getattr(fn, "__module__", None) == module]
    return found


def disconnect_handlers_of(module: str) -> None:
    """Disconnect the module's handlers in this process, so that they never run in later lessons' checks."""
    for name in SIGNALS:
        sig = getattr(signals, name)
        with sig.lock:
            sig.receivers = [
                entry for entry in sig.receivers if getattr(_resolve(entry[1]), "__module__", None) != module
            ]
            sig.sender_receivers_cache.clear()


# --- The shared run ------------------------------------------------------------------------------


def expected(lesson, task: str, args: tuple, kwargs: dict) -> tuple[str, int]:
    """(final state, retries) of one task of WORKLOAD; fetch_rate's by the module's own max_retries."""
    if task == "import_feed":
        return ("SUCCESS" if args[0].startswith("https://") else "FAILURE"), 0
    if task == "fetch_rate":
        outages, most = kwargs.get("outages", 0), lesson.fetch_rate.max_retries
        most = 10**6 if most is None else most  # None: no limit
        return ("SUCCESS" if outages <= most else "FAILURE"), min(outages, most)
    return "SUCCESS", 0


def send_workload(lesson) -> list[Sent]:
    sent = []
    for task, args, kwargs in WORKLOAD:
        function = getattr(lesson, task)
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        state, retries = expected(lesson, task, args, kwargs)
        result = function.apply_async(args, kwargs)
        sent.append(Sent(task, function.name, f"{task}.delay({shown})", result.id, state, retries, result))
    return sent


def wait_for_results(sent: list[Sent]) -> None:
    deadline = time.monotonic() + WAIT
    for task in sent:
        while not task.result.ready():
            if time.monotonic() > deadline:
                raise ProcessError(f"{task.call} had not ended after {WAIT:g} s (state {task.result.state}).")
            time.sleep(0.02)
        task.ended, task.value = task.result.state, task.result.result


def wait_until_idle(lesson, worker: str) -> None:
    """Wait until the worker runs nothing: every run's handlers, task_postrun's included, have then finished.

    A task's result is stored before its task_postrun handlers run, in the same pool process, and
    the worker counts a task as active until that process has finished with it.
    """
    inspect = lesson.app.control.inspect(destination=[worker], timeout=1.0)
    deadline = time.monotonic() + WAIT
    while (inspect.active() or {}).get(worker) != []:
        if time.monotonic() > deadline:
            raise ProcessError(f"the worker {worker} still ran tasks {WAIT:g} s after every task had ended.")
        time.sleep(0.02)


def monitor(run: Run, stack: ExitStack, lesson_dir: Path, load, client: redis.Redis) -> None:
    lesson = load()
    client.flushdb()
    flower = stack.enter_context(flower_process(MODULE, lesson_dir))
    worker = stack.enter_context(workers.process_worker(MODULE, lesson_dir, pool="prefork", concurrency=2))
    run.worker = host_format(worker.name)
    ping = stack.enter_context(
        ChildProcess(
            [sys.executable, "-m", "celery", "-A", MODULE, "inspect", "ping", "-d", run.worker, "--timeout", "10"],
            name="celery inspect ping",
            cwd=lesson_dir,
            env={"PYTHONPATH": str(lesson_dir)},
        )
    )
    listing = None
    try:
        wait_for_flower(flower, client)
        # Flower asks the workers (celery inspect) for this list, which takes its inspect timeout, 1 s:
        # ask while the tasks run.
        pool = ThreadPoolExecutor(1)
        stack.callback(pool.shutdown, wait=False)
        listing = pool.submit(flower_lists, flower, run.worker)
    except ProcessError as exc:
        run.flower_problem = str(exc)
    run.sent = send_workload(lesson)
    wait_for_results(run.sent)
    if listing is not None:
        deadline = time.monotonic() + SETTLE
        while not flower_shows_every_task(run, flower) and time.monotonic() < deadline:
            time.sleep(0.05)
        status, workers_seen = listing.result(timeout=30)
        run.flower_workers = workers_seen if status == 200 and isinstance(workers_seen, dict) else {}
        if status != 200:
            run.flower_problem = f"Flower's /api/workers answered {status}: {str(workers_seen)[:200]}"
        run.flower_events = flower_events(flower)
    ping.wait(15)
    run.ping, run.ping_code = ping.log, ping.returncode
    wait_until_idle(lesson, run.worker)
    worker.stop()  # killed, now that it is idle and pinged; its log is then complete
    run.log = worker.log
    for task in TASKS:
        name = getattr(lesson, task).name
        try:
            run.metrics[name] = dict(lesson.task_metrics(name))
        except NotImplementedError as exc:
            run.metrics_problem = f"task_metrics({name!r}) raised NotImplementedError({str(exc)!r})."
        except Exception as exc:
            run.metrics_problem = f"task_metrics({name!r}) raised {type(exc).__name__}: {exc}"
    celerys = (b"celery", b"_kombu", b"unacked")
    run.keys = sorted(key.decode() for key in client.keys("*") if not key.startswith(celerys))
    run.handlers = handlers_of(MODULE)


@pytest.fixture(scope="module")
def run(request, broker_url, target, course_root) -> Run:
    lesson = lesson_of_test_file(Path(str(request.node.fspath)).stem, load_course(course_root / "course.toml"))
    seen = Run()
    client = redis.Redis.from_url(broker_url, socket_timeout=10)
    try:
        with ExitStack() as stack:
            load = lambda: load_exercise(lesson, MODULE, target, course_root)  # noqa: E731
            monitor(seen, stack, lesson.folder(target, course_root), load, client)
    except (LessonError, workers.WorkerError, ProcessError) as exc:
        seen.problem = str(exc)
    except Exception as exc:  # e.g. a task_metrics() that cannot even be called: still one sentence per check
        seen.problem = f"The grader's run of monitoring1 broke: {type(exc).__name__}: {exc}"
    finally:
        client.close()
        disconnect_handlers_of(MODULE)
    return seen


# --- Shared wording ------------------------------------------------------------------------------


def shorten(line: str, width: int = 160) -> str:
    line = re.sub(r"^\[[^\]]*\]\s*", "", line.strip())  # drop "[2026-01-01 10:00:00,000: INFO/ForkPoolWorker-1]"
    return line if len(line) <= width else line[: width - 1] + "…"


def in_the_worker(run: Run, todo: int) -> str:
    """What the worker's log says went wrong in the student's handlers, as a sentence ('' if nothing).

    A handler's NotImplementedError counts only for its own TODO: TODO 3 adds handlers of its own.
    """
    for error in run.handler_errors():
        undone = re.search(r"NotImplementedError\('TODO (\d+)'\)", error)
        if not undone:
            return f"In the worker (its log), your signal handler {error}: fix it (TODO {todo}). "
        if int(undone.group(1)) == todo or todo == 4:  # TODO 4's line is logged after TODO 2's code
            return f"In the worker, {error}: that TODO is still to do. "
    return ""


def why_nothing(run: Run, todo: int) -> str:
    """Why task_metrics() read nothing after the run, as far as this process can tell."""
    said = in_the_worker(run, todo)
    if said:
        return said
    read = {f"metrics:{name}" for name in run.metrics}
    elsewhere = [key for key in run.keys if key.startswith("metrics") and key not in read]
    if elsewhere:
        return (
            f"Redis holds {elsewhere}, but task_metrics() reads the hashes metrics:<task name>, the name with its "
            "module, e.g. 'metrics:monitoring1.resize_image' (or change task_metrics to read yours). "
        )
    if not any(run.handlers.values()):
        return (
            "None of your functions is connected to a task signal any more: a handler defined inside another "
            "function (or a lambda) is held by a weak reference, garbage-collected, and never runs. Define handlers "
            "at module level, or connect them with weak=False. "
        )
    return (
        "No count reached Redis: keep them there, in the task's hash (a dict lives in each prefork pool process, "
        "out of everyone's reach), and define each handler at module level (one defined inside a function, or a "
        "lambda, is held by a weak reference and never runs). "
    )


def numbers(metrics: dict, fields=("succeeded", "failed", "retried")) -> str:
    return ", ".join(f"{name} {metrics.get(name, 0):g}" for name in fields)


def plan(run: Run, task: str) -> str:
    """How the run sent `task`, e.g. "3 × fetch_rate: EUR; USD (API down twice); GBP (down 5 times)"."""
    return "; ".join(sent.call for sent in run.of(task))


# --- TODO 1: events, Flower and celery inspect ---------------------------------------------------


@pytest.mark.task(1)
def test_flower_lists_the_worker_and_every_task(run):
    run.require()
    command = f"celery -A {MODULE} inspect ping -d {run.worker}"
    if run.ping_code != 0 or "pong" not in run.ping:
        fail(
            f"`{command}` ended with code {run.ping_code}, expected the worker's pong. "
            f"Its output: {shorten(run.ping, 300)!r}"
        )
    if run.flower_problem:
        fail(f"Flower could not be read: {run.flower_problem}")
    if run.worker not in run.flower_workers:
        fail(
            f"Flower's /api/workers?refresh=1 lists {sorted(run.flower_workers)}, not the running worker {run.worker!r}."
        )
    count = len(run.sent)
    seen = [sent for sent in run.sent if sent.id in run.flower_tasks]
    if not seen:
        fail(
            f"Sent {count} tasks to a worker started without -E; Flower's /api/tasks lists none of them: the worker "
            "sends no task events. Turn them on in the app's configuration, so that every worker sends them "
            "however it is started (TODO 1)."
        )
    wrong = [sent for sent in run.sent if run.flower_tasks.get(sent.id, {}).get("state") != sent.ended]
    if wrong:
        sent = wrong[0]
        state = run.flower_tasks.get(sent.id, {}).get("state", "not listed")
        fail(
            f"Flower's /api/tasks lists {len(seen)} of the {count} tasks sent; {sent.call} ended {sent.ended}, and "
            f"Flower says {state}. Does every task of the app send events (TODO 1)?"
        )
    sent_events = {name: run.flower_events.get((name, "task-sent"), 0) for name in {s.name for s in run.sent}}
    if not any(sent_events.values()):
        fail(
            f"Flower saw all {count} tasks run, but not one task-sent event: a task waiting in the queue stays "
            "invisible to it. That event comes from the app that sends the task, not from the worker (TODO 1)."
        )
    for name in sorted(sent_events):
        mine = [sent for sent in run.sent if sent.name == name]
        wanted = {
            "task-sent": len(mine) + sum(s.retries for s in mine),  # a retry is sent again
            "task-succeeded": sum(s.ended == "SUCCESS" for s in mine),
            "task-failed": sum(s.ended == "FAILURE" for s in mine),
            "task-retried": sum(s.retries for s in mine),
        }
        counts = {kind: (run.flower_events.get((name, kind), 0), want) for kind, want in wanted.items()}
        off = {kind: pair for kind, pair in counts.items() if pair[0] != pair[1]}
        assert not off, (
            f"Flower's /metrics counts, for {name}, "
            + ", ".join(f"{kind} {got:g} (expected {want})" for kind, (got, want) in off.items())
            + ": every run and every send (a retry is sent again) should be counted once (TODO 1)."
        )


# --- TODO 2: durations -----------------------------------------------------------------------------


@pytest.mark.task(2)
def test_metrics_add_up_the_seconds_of_every_run(run):
    run.require()
    if run.metrics_problem:
        fail(run.metrics_problem)
    name = f"{MODULE}.resize_image"
    metrics = run.metrics.get(name, {})
    said = f"Sent {plan(run, 'resize_image')}; then task_metrics({name!r}) gave {metrics}"
    seconds = metrics.get("seconds")
    if seconds is None:
        why = why_nothing(run, 2) if not metrics else ""
        fail(f"{said}: no 'seconds'. {why}Add each run's seconds to it (TODO 2).")
    if seconds >= 100 * SLEPT:
        fail(
            f"{said}: {seconds:g} seconds for runs that slept {SLEPT:g} s together. Milliseconds? Store seconds (TODO 2)."
        )
    if seconds < 0.9 * SLEPT:
        fail(
            f"{said}: {seconds:g} seconds for runs that slept {SLEPT:g} s together. Add each run's time to the sum "
            "(HINCRBYFLOAT), measured from its own task_prerun to its own task_postrun, not overwriting it (TODO 2)."
        )
    assert seconds <= SLEPT + 2.0, (
        f"{said}: {seconds:g} seconds for runs that slept {SLEPT:g} s together. Time each run from its task_prerun to "
        "its task_postrun, keyed by its task id (TODO 2)."
    )


# --- TODO 3: counters ------------------------------------------------------------------------------


def miscount(run: Run, task: str, got: dict) -> str:
    """Which mistake makes `got` (task_metrics of `task`), when it differs from what ran."""
    mine = run.of(task)
    want = {
        "succeeded": sum(s.ended == "SUCCESS" for s in mine),
        "failed": sum(s.ended == "FAILURE" for s in mine),
        "retried": sum(s.retries for s in mine),
    }
    has = {field: got.get(field, 0) for field in want}
    if has == want:
        return ""
    runs = len(mine) + want["retried"]
    said = (
        f"Sent {plan(run, task)}: expected {numbers(want)}; task_metrics({mine[0].name!r}) gave {numbers(has)}. "
    )
    if want["retried"] and has["succeeded"] + has["failed"] == runs:
        why = (
            f"{runs} runs counted as {runs} tasks: a retried task runs again (task_prerun and task_postrun fire "
            "once per run), but it is still one task, with one outcome. "
        )
    elif has["succeeded"] == runs and want["failed"]:
        why = "Every run counted as succeeded: task_postrun fires after failures and retries too. "
    elif want["retried"] and has["failed"] == want["failed"] + want["retried"]:
        why = "Each retry counted as a failure too: a retry is not the task's end. "
    elif any(has[f] == 2 * want[f] and want[f] for f in want):
        why = "Counted twice: by two handlers for the same event? "
    elif want["failed"] and not has["failed"]:
        why = "Failures are not counted. "
    elif want["retried"] and not has["retried"]:
        why = "Retries are not counted. "
    else:
        why = ""
    return said + why + "Count on the signal that marks each outcome (TODO 3)."


@pytest.mark.task(3)
def test_metrics_count_each_task_once_with_its_retries(run):
    run.require()
    if run.metrics_problem:
        fail(run.metrics_problem)
    fields = ("succeeded", "failed", "retried")
    counted = [name for name, metrics in run.metrics.items() if any(metrics.get(f) for f in fields)]
    if not counted:
        shown = {name.split(".")[-1]: metrics for name, metrics in run.metrics.items()}
        fail(
            f"Sent {len(run.sent)} tasks (successes, failures and retries); task_metrics() then gave {shown}: no "
            f"succeeded, failed or retried. {why_nothing(run, 3)}(TODO 3)"
        )
    for task in TASKS:
        problem = miscount(run, task, run.metrics.get(getattr(run.of(task)[0], "name"), {}))
        if problem:
            fail(problem)


# --- TODO 4: one log line per run ------------------------------------------------------------------


def student_lines(run: Run) -> list[str]:
    """Lines of the worker's log that are not Celery's own lines about a task."""
    return [
        line
        for line in run.log.splitlines()
        if line.startswith("[") and not CELERY_LINE.search(line) and "Signal handler" not in line
    ]


@pytest.mark.task(4)
def test_every_run_logs_a_line_with_its_id_and_outcome(run):
    run.require()
    lines = student_lines(run)
    with_id = {sent.id: [line for line in lines if sent.id in line] for sent in run.sent}
    if not any(with_id.values()):
        unnamed = [line for line in lines if any(word.search(line) for word in OUTCOMES.values())]
        if unnamed:
            fail(
                f"The worker's log has lines such as {shorten(unnamed[0])!r}, but none carries the id of one of the "
                f"{len(run.sent)} tasks sent. Fields given with extra= are not printed by the worker's log format: "
                "put the id in the message, or log with celery.utils.log.get_task_logger (TODO 4)."
            )
        fail(
            f"{in_the_worker(run, 4)}The worker's log (INFO and above) has no line of yours with the id of any of the "
            f"{len(run.sent)} tasks sent, e.g. {run.sent[0].call} (id {run.sent[0].id}). Log one line per run, at "
            "INFO, from task_postrun (TODO 4)."
        )
    for sent in run.sent:
        mine = with_id[sent.id]
        if not mine:
            fail(
                f"{sent.call} (id {sent.id}) ended {sent.ended}; no line of yours in the worker's log carries its id "
                "(TODO 4)."
            )
        if not any(OUTCOMES[sent.outcome].search(line) for line in mine):
            fail(
                f"{sent.call} ended {sent.ended}; the worker's log has {shorten(mine[-1])!r} with its id, but no line "
                f"says it {sent.outcome}. Each run's line says how that run ended: succeeded, failed or retried "
                "(TODO 4)."
            )
        if sent.retries and not any(OUTCOMES["retried"].search(line) for line in mine):
            fail(
                f"{sent.call} was retried {sent.retries} times; none of its lines ({shorten(mine[0])!r}…) says "
                "retried. A retry is a run of its own: its line says retried (TODO 4)."
            )
