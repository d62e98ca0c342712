"""Lesson 08 checks: queues and routes, the e-mail rate limit, the report's time limits and cleanup.

Routing and the rate limit run on worker threads of this process that consume only the
queues a check names, as ``celery worker -Q`` does. Time limits act only on the prefork
pool, so those checks run the real ``celery -A routing1 worker`` command. They send each
report with short limits of their own (``apply_async(soft_time_limit=..., time_limit=...)``
overrides the task's), so they take seconds whatever limits the student chose; the
student's own limits are judged by reading them, against the report's timings in the README.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.utils.time import rate

from labkit import workers
from labkit.checks import fail, result_of, wait_until

# queue= (or priority=) on a task's decorator still works in Celery 5.7 but warns that it goes away in 6.0:
# the lesson allows it, so its warning must not fail a check.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*The '\w+' task attribute is deprecated:DeprecationWarning")

MODULE = "routing1"
TO = "ada@example.com"
SEP = "\x06\x16"  # kombu's separator in the Redis list of a priority: "emails\x06\x163"

# The README's numbers ("Your turn"): the provider's quota, and the report's timings.
QUOTA_PER_MINUTE, EMAIL_WORKERS, EMAIL_CONCURRENCY = 600, 2, 4
SLOWEST_REPORT, CLEANUP, REPORT_CAP = 90, 20, 300  # seconds

# The limits the checks send reports with: short, so that a check takes seconds.
SOFT, ROOMY_HARD = 0.3, 6.0  # the soft limit strikes after about 3 pages of 0.1 s
STUCK_HARD = 0.6  # the hard limit of a report whose page is stuck


def per_second(limit):
    """A Celery rate limit ("300/m", "5/s", 5...) as tasks per second, the way the worker reads it."""
    try:
        return rate(limit)
    except (TypeError, ValueError, AttributeError):
        fail(f"{limit!r} is not a rate limit Celery can read: write it as '<n>/s', '<n>/m' or '<n>/h' (TODO 2).")


def registered(lesson, name):
    """The task as the worker sees it: decorator options, task_annotations and app.conf applied."""
    return lesson.app.tasks[getattr(lesson, name).name]


def queue_lengths(redis_client):
    """{queue: messages waiting} on the broker. A queue is a Redis list of its own name (plus
    one list per priority step, "<queue>\\x06\\x16<n>", once a message has a priority)."""
    lengths = {}
    for key in redis_client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        if name.startswith("_kombu") or name == "unacked" or redis_client.type(key) != b"list":
            continue
        if name in ("outbox",) or name.startswith("report:"):
            continue
        queue = name.split(SEP)[0]
        lengths[queue] = lengths.get(queue, 0) + redis_client.llen(key)
    return lengths


def shown(lengths):
    waiting = {queue: count for queue, count in lengths.items() if count}
    return ", ".join(f"{count} in {queue!r}" for queue, count in sorted(waiting.items())) or "no queue at all"


# HARNESS-CANDIDATE: move to labkit, as an option of the thread_worker fixture (which cannot stop one worker
# before the check ends, nor undo the queue selection; it would also pass LABKIT_WORKER_LOGLEVEL on).
@contextmanager
def queue_worker(app, queues):
    """``with queue_worker(app, ["emails"]):`` a worker thread that consumes only those queues, like -Q.

    Celery keeps a worker's choice of queues on the app (``app.amqp.queues``), and one grading
    process reuses the lesson's app for every check, so the choice is undone afterwards. Two
    worker threads in one process do not stop cleanly: start the next after the last has stopped.
    """
    chosen = app.amqp.queues
    saved = chosen._consume_from
    try:
        with workers.thread_worker(app, queues=list(queues)) as worker:
            yield worker
    finally:
        chosen._consume_from = saved


def send(description, task, *args, kwargs=None, **options):
    """``task.apply_async(args, kwargs, **options)``; a call Celery refuses fails the check in one line."""
    try:
        return task.apply_async(args, kwargs, **options)
    except ValueError as exc:
        if "time_limit" in str(exc):
            problem = (
                f"{description} raised ValueError: {exc}. Celery refuses to send a task whose soft limit is "
                "above its hard limit: the hard limit must come after the soft one (TODO 3)."
            )
        else:
            problem = f"{description} raised ValueError: {exc}"
    except Exception as exc:
        problem = f"{description} raised {type(exc).__name__}: {exc}"
    fail(problem)


def finish(result, description, timeout, redis_client=None):
    """(state, value) once the task has ended; the value of a failure is its exception."""
    try:
        value = result.get(timeout=timeout, propagate=False)
    except CeleryTimeoutError:
        waiting = queue_lengths(redis_client) if redis_client is not None else {}
        where = (
            f"; the broker still holds {shown(waiting)}, and the report worker takes 'reports' and the default queue"
            if any(waiting.values())
            else ""
        )
        fail(f"{description} had not ended after {timeout:g} s (state {result.state}){where}.")
    return result.state, value


# Loaded into the report worker by one check (`celery worker -I labkit_stuck_page`): the pages of
# the report "stuck" hang in code that swallows the soft limit, as a broad `except Exception:` in
# a library would. Only the hard limit can stop such a task.
STUCK_PAGE = """
import time

from celery.exceptions import SoftTimeLimitExceeded

import routing1

render_page = routing1.render_page


def stuck_page(report_id, page):
    while report_id == "stuck":
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            pass
    return render_page(report_id, page)


routing1.render_page = stuck_page
"""


def report_worker(lesson, process_worker, stuck_pages=None):
    """The real command, prefork: ``celery -A routing1 worker -Q reports,celery -c 2``.

    It also takes the default queue, so that the time-limit checks work before TODO 1 is done.
    With ``stuck_pages`` (a folder), the worker also loads STUCK_PAGE from there.
    """
    default = lesson.app.conf.task_default_queue
    args, env = ["-Q", f"reports,{default}"], {}
    if stuck_pages is not None:
        (stuck_pages / "labkit_stuck_page.py").write_text(STUCK_PAGE)
        args += ["-I", "labkit_stuck_page"]
        env["PYTHONPATH"] = os.pathsep.join([str(Path(lesson.module.__file__).parent), str(stuck_pages)])
    return process_worker(MODULE, pool="prefork", concurrency=2, args=tuple(args), env=env)


def time_limits(lesson):
    """(soft, hard) of build_report as the worker reads them (decorator, task_annotations or app.conf)."""
    task = registered(lesson, "build_report")
    return task.soft_time_limit, task.time_limit


def refuse_a_pool_without_time_limits(lesson):
    """Fail when the app picks a pool that ignores time limits: `--pool=prefork` does not override it."""
    pool = str(lesson.app.conf.worker_pool or "prefork")
    if pool.rsplit(".", 1)[-1].lower() in ("solo", "threads", "thread", "solopool", "taskpool"):
        fail(
            f"app.conf.worker_pool is {pool!r}: time limits do nothing on the solo and threads pools (no error, no "
            "log line: the task runs on), and even `celery worker --pool=prefork` keeps that setting. The report "
            "worker must run prefork, the default: remove worker_pool (TODO 3)."
        )


# -- TODO 1: routes ------------------------------------------------------------------------------


@pytest.mark.task(1)
@pytest.mark.parametrize(
    "name, args, queue",
    [("send_email", (TO,), "emails"), ("build_report", ("march", 1), "reports")],
    ids=["send_email-to-emails", "build_report-to-reports"],
)
def test_route_puts_each_task_on_its_queue(exercise, redis_client, name, args, queue):
    lesson = exercise(MODULE)
    task = getattr(lesson, name)
    description = f"{name}.delay({', '.join(map(repr, args))})"
    send(description, task, *args)
    lengths = queue_lengths(redis_client)
    assert lengths.get(queue) == 1 and sum(lengths.values()) == 1, (
        f"Sent {description} with no worker running; the broker holds {shown(lengths)}, expected 1 in {queue!r}. "
        f"Route the task by its full name, {task.name!r}, to {queue!r} (TODO 1)."
    )


@pytest.mark.task(1)
def test_emails_wait_for_a_worker_of_their_queue(exercise, redis_client):
    lesson = exercise(MODULE)
    default = lesson.app.conf.task_default_queue
    with queue_worker(lesson.app, [default]):
        email = send(f"send_email.delay({TO!r})", lesson.send_email, TO)
        thumbnail = send("make_thumbnail.delay('cat.png')", lesson.make_thumbnail, "cat.png")
        # A worker runs one queue's messages in the order they came: once the thumbnail sent after
        # the e-mail is done, an e-mail on the same queue would be done too.
        wait_until(
            thumbnail.ready,
            10,
            f"make_thumbnail.delay('cat.png') did not run within 10 s on a worker of the default queue {default!r} "
            f"(the broker holds {shown(queue_lengths(redis_client))}): only e-mails and reports leave it (TODO 1).",
        )
    if email.ready():
        fail(
            f"A worker of the default queue {default!r} (like `celery worker -Q {default}`) ran send_email.delay({TO!r}); "
            "it should have waited for a worker of 'emails'. Route 'routing1.send_email' to 'emails' (TODO 1)."
        )
    lengths = queue_lengths(redis_client)
    if lengths.get("emails") != 1:
        fail(
            f"The e-mail was not run by the default worker, but the broker holds {shown(lengths)}, "
            "expected 1 in 'emails' (TODO 1)."
        )
    with queue_worker(lesson.app, ["emails"]):
        value = result_of(email, f"send_email.delay({TO!r}), once a worker of 'emails' (-Q emails) was running")
    assert value == f"sent to {TO}", f"send_email.delay({TO!r}) returned {value!r}, expected 'sent to {TO}'."


# -- TODO 2: the rate limit ----------------------------------------------------------------------


@pytest.mark.task(2)
def test_email_rate_limit_fits_the_providers_quota(exercise):
    lesson = exercise(MODULE)
    task = registered(lesson, "send_email")
    limit = task.rate_limit
    if not limit:
        fail(
            "send_email has no rate limit. Give it rate_limit= on its decorator, or in task_annotations under its "
            "full name 'routing1.send_email' (TODO 2)."
        )
    speed = per_second(limit)
    share = QUOTA_PER_MINUTE / EMAIL_WORKERS / 60  # per second, for one worker
    said = f"send_email's rate_limit is {limit!r} ({speed * 60:g} e-mails a minute per worker)"
    if abs(speed - QUOTA_PER_MINUTE / 60) < 1e-9:
        fail(
            f"{said}: that is the whole account's quota, but rate_limit holds per worker instance, and "
            f"{EMAIL_WORKERS} e-mail workers run: together they would send {EMAIL_WORKERS}x the quota (TODO 2)."
        )
    if abs(speed - share / EMAIL_CONCURRENCY) < 1e-9:
        fail(
            f"{said}: rate_limit holds per worker instance, not per pool process: --concurrency "
            f"{EMAIL_CONCURRENCY} does not multiply it. Divide by the number of workers only (TODO 2)."
        )
    if speed > share * 1.000001:
        fail(
            f"{said}: {EMAIL_WORKERS} e-mail workers at that rate would send {speed * 60 * EMAIL_WORKERS:g} a minute, "
            f"more than the provider's {QUOTA_PER_MINUTE}. Check the unit too: '/s' per second, '/m' per minute (TODO 2)."
        )
    assert speed >= 0.8 * share, (
        f"{said}: {EMAIL_WORKERS} workers would send only {speed * 60 * EMAIL_WORKERS:g} a minute where the provider "
        f"takes {QUOTA_PER_MINUTE}: e-mails would wait for nothing. Check the unit: '/s', '/m' or '/h' (TODO 2)."
    )
    for other in ("build_report", "make_thumbnail"):
        assert not registered(lesson, other).rate_limit, (
            f"{other} is rate-limited too ({registered(lesson, other).rate_limit!r}): limit send_email only, not every "
            "task (task_default_rate_limit, or a '*' in task_annotations, limits them all) (TODO 2)."
        )


@pytest.mark.task(2)
def test_email_rate_limit_spaces_the_sends(exercise, redis_client):
    lesson = exercise(MODULE)
    limit = registered(lesson, "send_email").rate_limit
    if not limit:
        fail("send_email has no rate limit, so nothing spaces the sends (TODO 2).")
    speed = per_second(limit)
    if not 1 <= speed <= 20:
        fail(
            f"send_email's rate_limit is {limit!r}, {speed:g} per second: this check measures rates from 1 to 20 per "
            "second, and the provider's quota gives one of those (TODO 2)."
        )
    if lesson.app.conf.worker_disable_rate_limits:
        fail("app.conf.worker_disable_rate_limits is set, so workers ignore every rate limit: remove it (TODO 2).")
    count = max(3, min(9, round(speed * 0.6) + 1))  # about 0.6 s of sending
    description = f"{count} send_email.delay(...) calls sent at once"
    expected = (count - 1) / speed
    with queue_worker(lesson.app, [lesson.app.conf.task_default_queue, "emails"]):
        sent = [send("send_email.delay(...)", lesson.send_email, f"user{n}@example.com") for n in range(count)]
        wait_until(
            lambda: all(result.ready() for result in sent),
            expected + 10,
            f"{description} had not all run within {expected + 10:g} s.",
        )
    for result in sent:
        result_of(result, description)
    times = sorted(json.loads(entry)["at"] for entry in redis_client.lrange(lesson.OUTBOX, 0, -1))
    if len(times) != count:
        fail(f"{description}; the Redis list {lesson.OUTBOX!r} holds {len(times)} entries, expected {count}.")
    span = times[-1] - times[0]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    typical = sorted(gaps)[len(gaps) // 2]  # the median gap: one late start on a busy machine does not move it
    shown_gaps = ", ".join(f"{gap:.2f}" for gap in gaps)
    assert span >= 0.75 * expected or typical >= 0.6 / speed, (
        f"{description}; they ran {shown_gaps} s apart ({span:.2f} s from first to last), expected about {1 / speed:.2f} s "
        f"apart ({expected:.2f} s in all) for rate_limit {limit!r} on one worker (TODO 2)."
    )


# -- TODO 3: the time limits ---------------------------------------------------------------------


@pytest.mark.task(3)
def test_report_limits_fit_the_report(exercise):
    lesson = exercise(MODULE)
    refuse_a_pool_without_time_limits(lesson)
    soft, hard = time_limits(lesson)
    if not soft or not hard:
        fail(
            f"build_report has soft_time_limit={soft!r} and time_limit={hard!r}: it needs both, on its decorator, in "
            "task_annotations under 'routing1.build_report', or as task_soft_time_limit/task_time_limit (TODO 3)."
        )
    said = f"build_report has soft_time_limit={soft!r} and time_limit={hard!r}"
    if hard <= soft:
        fail(
            f"{said}: the hard limit kills the task at once, so at or below the soft limit the cleanup never gets "
            "to run. The hard limit comes after the soft one (TODO 3)."
        )
    if soft < SLOWEST_REPORT:
        fail(f"{said}: a healthy report can take {SLOWEST_REPORT} s; a soft limit below that cuts it short (TODO 3).")
    if hard - soft < CLEANUP:
        fail(
            f"{said}: the cleanup gets {hard - soft:g} s between the two, and it needs up to {CLEANUP} s; the hard "
            "limit would kill it halfway (TODO 3)."
        )
    assert hard <= REPORT_CAP, (
        f"{said}: a report may hold a worker for {REPORT_CAP} s at most, whatever happens; the hard limit is the "
        "only limit a stuck task cannot ignore (TODO 3)."
    )


# -- TODO 4: the cleanup -------------------------------------------------------------------------


def report_state(redis_client, report_id):
    pages = redis_client.llen(f"report:{report_id}:pages")
    status = (redis_client.get(f"report:{report_id}:status") or b"").decode()
    return pages, status, f"report:{report_id}:pages holds {pages} page(s) and its status is {status!r}"


@pytest.mark.task(4)
def test_report_worker_cleans_up_at_the_soft_limit_and_outlives_the_hard_one(
    exercise, process_worker, redis_client, tmp_path
):
    lesson = exercise(MODULE)
    refuse_a_pool_without_time_limits(lesson)
    worker = report_worker(lesson, process_worker, stuck_pages=tmp_path)

    # 1. A slow report: the soft limit strikes after about 5 pages, and the cleanup must run.
    description = (
        f"build_report.apply_async(('slow',), {{'pages': 100}}, soft_time_limit={SOFT:g}, time_limit={ROOMY_HARD:g}) "
        "(100 pages of 0.1 s) on a prefork worker"
    )
    result = send(
        description, lesson.build_report, "slow", kwargs={"pages": 100}, soft_time_limit=SOFT, time_limit=ROOMY_HARD
    )
    state, value = finish(result, description, ROOMY_HARD + 5, redis_client)
    pages, status, left = report_state(redis_client, "slow")
    if isinstance(value, NotImplementedError):
        fail(f"{description} failed with NotImplementedError({str(value)!r}): that TODO is still to do.")
    if state == "SUCCESS" and status == "timed out":
        fail(
            f"{description} ended SUCCESS ({value!r}) although the soft limit struck; {left}. After the cleanup, "
            "re-raise the SoftTimeLimitExceeded, so that the task fails and the caller knows (TODO 4)."
        )
    if state == "SUCCESS":
        fail(
            f"{description} ended SUCCESS ({value!r}) although the soft limit struck; {left}: the "
            "SoftTimeLimitExceeded was swallowed. Catch it to call discard_partial(report_id), then re-raise it (TODO 4)."
        )
    if type(value).__name__ == "TimeLimitExceeded":
        fail(
            f"{description} ran on after the soft limit until the hard limit killed it at {ROOMY_HARD:g} s; {left}. "
            "Catching SoftTimeLimitExceeded must end the task: clean up, then re-raise (TODO 4)."
        )
    if (pages, status) != (0, "timed out"):
        fail(
            f"{description} ended {state} with {value!r}; {left}, expected no pages and 'timed out': when "
            "SoftTimeLimitExceeded is raised, call discard_partial(report_id) before the task ends (TODO 4)."
        )

    # 2. A stuck report: its page swallows the soft limit, so only the hard limit stops it.
    stuck = (
        f"build_report.apply_async(('stuck',), soft_time_limit={SOFT:g}, time_limit={STUCK_HARD:g}), its first page "
        "stuck in code that swallows the soft limit"
    )
    result = send(stuck, lesson.build_report, "stuck", soft_time_limit=SOFT, time_limit=STUCK_HARD)
    state, value = finish(result, stuck, STUCK_HARD + 8)
    assert state == "FAILURE" and type(value).__name__ == "TimeLimitExceeded", (
        f"{stuck} ended {state} with {value!r}; expected FAILURE with TimeLimitExceeded, the hard limit killing the "
        "pool process. (The grader makes render_page hang for this report: does build_report still call it?)"
    )
    if not worker.alive:
        fail(f"The worker itself exited after the hard limit killed a task; its last lines:\n{worker.tail()}")

    # 3. The worker goes on, and a report that finishes in time is left alone.
    after = "build_report.apply_async(('april',), {'pages': 2}), sent next to the same worker"
    result = send(
        after, lesson.build_report, "april", kwargs={"pages": 2}, soft_time_limit=ROOMY_HARD - 1, time_limit=ROOMY_HARD
    )
    state, value = finish(result, after, 10)
    pages, status, left = report_state(redis_client, "april")
    assert state == "SUCCESS" and worker.alive and (pages, status) == (2, "done"), (
        f"{after} ended {state} with {value!r} (the worker process alive: {worker.alive}); {left}. Expected SUCCESS, "
        "2 pages and 'done': the pool replaces a killed process and goes on, and the cleanup runs only when the "
        "soft limit strikes (TODO 4)."
    )
