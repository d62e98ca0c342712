"""Lesson 07 checks: beat's schedule, a real beat process, countdown and expiry, a report lock.

The schedule is read from the app (``app.conf.beat_schedule``, where ``add_periodic_task``
also puts its entries) and played forward on a fake clock, so a daily crontab is checked
in milliseconds. Two checks run the real ``celery beat`` command (one beat, then two side
by side) with REPORT_EVERY=1; its schedule file goes to the check's temporary folder.
The lock checks hold a report inside ``write_report`` on a worker thread and look at
Redis from outside while it waits.
"""

import copy
import json
import math
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from celery.schedules import crontab, maybe_schedule
from celery.signals import task_failure, task_postrun, task_prerun

from labkit.checks import call, fail, wait_until

MODULE = "scheduling1"
HOLD_LIMIT = 10.0  # the longest a held report waits, even if nothing releases it
BEAT_WAIT = 10.0  # the longest a check waits for beat's ticks
MONDAY = datetime(2026, 1, 5, 0, 0, 30, tzinfo=timezone.utc)  # the fake clock starts here


# --- helpers ---------------------------------------------------------------------------------


def require_every_second(beat, task):
    """Fail at once unless beat (at DEBUG) listed ``task`` on a one-second interval as it started.

    Beat prints its schedule as it starts, e.g. ``<ScheduleEntry: report scheduling1.build_report() <freq: 1.00 second>``.
    """
    entry = wait_until(
        lambda: next((line for line in beat.log.splitlines() if "<ScheduleEntry" in line and f" {task.name}(" in line), None),
        5,
        f"`{beat.shown}` did not list an entry for {task.name} as it started (TODO 1).",
    )
    if "<freq: 1.00 second>" not in entry:
        fail(
            f"`celery beat` started with REPORT_EVERY=1 read the entry {entry.strip()!r}; expected every second: "
            "does the schedule read setting('REPORT_EVERY', 3600) (TODO 1)?"
        )


def sends(beat, task):
    """How many times beat's log says it sent ``task``."""
    return sum(1 for line in beat.log.splitlines() if "Sending due task" in line and f"({task})" in line)


class Runs:
    """What this process's worker threads ran, by task name: starts, ends, and the last error."""

    def __init__(self):
        self.started, self.ended, self.errors = Counter(), Counter(), {}

    def on_start(self, sender=None, **_):
        self.started[sender.name] += 1

    def on_end(self, sender=None, **_):
        self.ended[sender.name] += 1

    def on_failure(self, sender=None, exception=None, **_):
        self.errors[sender.name] = exception

    def error_of(self, task):
        error = self.errors.get(task.name)
        return f" It failed with {type(error).__name__}: {error}." if error is not None else ""


@pytest.fixture
def runs():
    recorded = Runs()
    hooks = [(task_prerun, recorded.on_start), (task_postrun, recorded.on_end), (task_failure, recorded.on_failure)]
    for signal_, hook in hooks:
        signal_.connect(hook, weak=False)
    yield recorded
    for signal_, hook in hooks:
        signal_.disconnect(hook)


def entries_for(lesson, task_name):
    """The beat entries (name, entry) that send ``task_name``: from beat_schedule or add_periodic_task."""
    schedule = call("reading app.conf.beat_schedule", lambda: dict(lesson.app.conf.beat_schedule))
    return [(name, entry) for name, entry in schedule.items() if isinstance(entry, dict) and entry.get("task") == task_name]


def one_entry(lesson, task_name):
    found = entries_for(lesson, task_name)
    if not found:
        fail(
            f"No beat entry sends {task_name}: add one to app.conf.beat_schedule (or call add_periodic_task in an "
            "on_after_configure handler) (TODO 1)."
        )
    if len(found) > 1:
        fail(f"{len(found)} beat entries send {task_name} ({[name for name, _ in found]}); keep one (TODO 1).")
    return found[0]


def schedule_of(lesson, entry):
    """The entry's schedule as beat sees it (a number and a timedelta become an interval), on a copy."""
    return maybe_schedule(copy.copy(entry.get("schedule")), app=lesson.app)


def fire_times(lesson, schedule, start, hours, step=60):
    """Play beat forward on a fake clock: when would it send this schedule between start and start+hours?

    Beat asks ``is_due(last_run_at)`` over and over; a new entry's last run is the moment beat started.
    The schedule is a copy (a number and a timedelta become an interval), tied to the lesson's app:
    its timezone decides what 07:00 means.
    """
    clock = [start]
    sched = maybe_schedule(copy.copy(schedule), app=lesson.app)
    sched.nowfun = lambda: clock[0]
    fired, last, now, end = [], start, start, start + timedelta(hours=hours)
    while now < end:
        now += timedelta(seconds=step)
        clock[0] = now
        due, _ = sched.is_due(last)
        if due:
            fired.append(now)
            last = now
    return fired


class Hold:
    """Replaces the lesson's write_report: records each call, and holds the first one until released."""

    def __init__(self, real):
        self.real = real
        self.reached = threading.Event()
        self.released = threading.Event()
        self.calls = []  # [slot, started, ended], by time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, client, slot):
        with self._lock:
            call = [slot, time.monotonic(), None]
            first = not self.calls
            self.calls.append(call)
        if first:
            self.reached.set()
            self.released.wait(HOLD_LIMIT)
        try:
            return self.real(client, slot)
        finally:
            call[2] = time.monotonic()


@pytest.fixture
def hold(exercise, monkeypatch):
    """A Hold in place of write_report; released when the check ends, before the worker stops."""
    lesson = exercise(MODULE)
    held = Hold(lesson.write_report)
    monkeypatch.setattr(lesson.module, "write_report", held)
    yield held
    held.released.set()


def report_task(lesson):
    task = lesson.build_report
    if not hasattr(task, "delay"):
        fail("`build_report` is no longer a Celery task: keep its @app.task decorator.")
    return task


def outcome(result):
    meta = result.backend.get_task_meta(result.id)  # read fresh, not cached on the result
    return meta["status"], meta["result"]


def ended(result, description, timeout=5.0):
    wait_until(result.ready, timeout, f"{description} had not ended after {timeout:g} s.")
    return outcome(result)


def wait_for_hold(hold, result, description):
    """Wait until the held report reaches write_report; if the task ends first, say how."""
    wait_until(lambda: hold.reached.is_set() or result.ready(), 10, f"{description} had not started after 10 s.")
    if not hold.reached.is_set():
        state, value = outcome(result)
        if isinstance(value, NotImplementedError):
            fail(f"{description} failed with NotImplementedError({str(value)!r}): that TODO is still to do.")
        fail(
            f"{description} ended {state} ({type(value).__name__}: {value}) without calling write_report(client, slot); "
            "it should write the report."
        )


def new_slot_every(minimum=3000.0):
    """A REPORT_EVERY of about ``minimum`` s whose current slot began half a second ago."""
    now = time.time()
    return (now - 0.5) / int(now // minimum)


def grader_keys(lesson):
    """Keys the checks expect and Celery's own: everything else is the student's (claims, tokens...)."""
    return {lesson.REPORTS, lesson.REMINDERS, lesson.DIGESTS, lesson.LOCK_KEY, "celery"}


def is_celerys(key):
    return key.startswith(("_kombu.", "unacked", "celery-task-meta-"))


# --- TODO 1: the schedule ----------------------------------------------------------------------


@pytest.mark.task(1)
def test_schedule_sends_the_report_every_hour_by_default(exercise):
    lesson = exercise(MODULE)
    name, entry = one_entry(lesson, lesson.build_report.name)
    sched = schedule_of(lesson, entry)
    every = getattr(sched, "run_every", None)
    if not isinstance(every, timedelta):
        fail(
            f"The beat entry {name!r} sends build_report on {entry.get('schedule')!r}; expected an interval of "
            "REPORT_EVERY seconds (a number or a timedelta), so that a check can make it one second (TODO 1)."
        )
    expected = lesson.setting("REPORT_EVERY", 3600)
    assert every.total_seconds() == pytest.approx(expected), (
        f"The beat entry {name!r} sends build_report every {every.total_seconds():g} s; with REPORT_EVERY unset "
        f"it should be {expected:g} s: use setting('REPORT_EVERY', 3600) (TODO 1)."
    )


@pytest.mark.task(1)
def test_schedule_sends_the_digest_once_a_day_at_seven_utc(exercise):
    lesson = exercise(MODULE)
    name, entry = one_entry(lesson, lesson.send_digest.name)
    sched = schedule_of(lesson, entry)
    fired = fire_times(lesson, entry.get("schedule"), MONDAY, hours=32)
    shown = ", ".join(f"{t:%a %H:%M}" for t in fired[:4]) + (", …" if len(fired) > 4 else "")
    seen = f"Played beat forward from Mon 00:00 to Tue 08:00 UTC: {name!r} ({entry.get('schedule')!r}) fired {len(fired)} times"
    if isinstance(sched, crontab) and len(fired) == 120:
        fail(
            f"{seen}, every minute from 07:00 to 07:59 each day: a crontab's minute defaults to '*'. "
            "Expected twice, at 07:00 UTC on each day (TODO 1)."
        )
    at_seven = [t for t in fired if (t.hour, t.minute) == (7, 0)]
    if len(fired) == 2 and not at_seven:
        timezone_name = lesson.app.conf.timezone or "UTC"
        fail(
            f"{seen} ({shown} UTC); expected 07:00 UTC. A timedelta counts from when beat starts, and a crontab "
            f"reads the app's timezone (here {timezone_name!r}, enable_utc={lesson.app.conf.enable_utc}) (TODO 1)."
        )
    assert len(fired) == 2 and len(at_seven) == 2, f"{seen}: {shown}; expected twice, at 07:00 UTC each day (TODO 1)."


@pytest.mark.task(1)
def test_beat_process_sends_the_report_every_second(exercise, thread_worker, runs, beat_processes, monkeypatch):
    lesson = exercise(MODULE)
    task = report_task(lesson)
    one_entry(lesson, task.name)  # no entry: fail now, not after watching beat for 10 s
    monkeypatch.setenv("REPORT_EVERY", "1")  # the worker thread reads it too
    started = runs.started
    start_worker = lambda: thread_worker(lesson.app)  # noqa: E731
    beat_says = "`celery -A scheduling1 beat` with REPORT_EVERY=1"
    with beat_processes(MODULE, env={"REPORT_EVERY": "1"}, meanwhile=start_worker, loglevel="DEBUG") as (beat,):
        require_every_second(beat, task)
        deadline = time.monotonic() + BEAT_WAIT
        while started[task.name] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent, ran = sends(beat, task.name), started[task.name]
    if sent < 2:
        fail(
            f"{beat_says} sent build_report {sent} time(s) in {BEAT_WAIT:g} s, expected one a second. "
            f"Its last lines:\n{beat.tail(4)}"
        )
    assert ran >= 2, (
        f"`celery beat` with REPORT_EVERY=1 sent build_report {sent} times, but the worker ran it {ran} time(s): "
        "does the entry name the task exactly as the worker knows it (scheduling1.build_report) (TODO 1)?"
    )


# --- TODO 2: a reminder that runs later, but not too late ---------------------------------------


def queued_message(redis_client, description):
    raw = redis_client.lindex("celery", 0)
    if raw is None:
        fail(f"Called {description} with no worker running; no message reached the 'celery' queue (TODO 2).")
    message = json.loads(raw)
    body = message.get("body")
    return message["headers"], body


def moment(headers, field, description):
    value = headers.get(field)
    if value is None:
        return None
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        fail(
            f"{description} queued {field}={value!r}, a naive datetime (no time zone). Celery reads it as UTC, so "
            "datetime.now() is off by your UTC offset; give a countdown/seconds, or an aware datetime such as "
            "datetime.now(timezone.utc) + ... (TODO 2)."
        )
    return when.timestamp()


@pytest.mark.task(2)
def test_remind_later_queues_an_eta_and_an_expiry_after_it(exercise, redis_client, monkeypatch):
    lesson = exercise(MODULE)
    monkeypatch.setenv("REMINDER_GRACE", "120")
    description = "remind_later('ada', 1200) (REMINDER_GRACE=120)"
    before = time.time()
    call(description, lesson.remind_later, "ada", 1200)
    after = time.time()
    headers, _ = queued_message(redis_client, description)
    if not str(headers.get("task", "")).endswith(".remind"):
        fail(f"{description} queued the task {headers.get('task')!r}, expected {lesson.remind.name} (TODO 2).")
    if "ada" not in str(headers.get("argsrepr", "")) + str(headers.get("kwargsrepr", "")):
        fail(f"{description} queued remind with args {headers.get('argsrepr')} {headers.get('kwargsrepr')}, expected 'ada'.")
    eta, expires = moment(headers, "eta", description), moment(headers, "expires", description)
    if eta is None:
        fail(f"{description} queued remind with no ETA: it would run at once. Give apply_async a countdown (TODO 2).")
    if not before + 1199 <= eta <= after + 1201:
        fail(f"{description} queued remind to run in {eta - before:.0f} s, expected 1200 s (TODO 2).")
    if expires is None:
        fail(
            f"{description} queued remind with no expiry: if the workers are down for a day, it still arrives a day "
            "late. Give apply_async expires= (TODO 2)."
        )
    if expires <= eta:
        fail(
            f"{description} queued remind to run in {eta - before:.0f} s but to expire in {expires - before:.0f} s, "
            "before it is even due. expires counts from when you send, not from the ETA (TODO 2)."
        )
    assert before + 1319 <= expires <= after + 1321, (
        f"{description} queued remind to expire {expires - eta:.0f} s after it is due, expected 120 s "
        "(REMINDER_GRACE): a reminder more than that late is dropped, one less late is not (TODO 2)."
    )


@pytest.mark.task(2)
def test_remind_later_does_not_run_before_its_delay(exercise, redis_client, thread_worker, monkeypatch):
    lesson = exercise(MODULE)
    monkeypatch.setenv("REMINDER_GRACE", "10")
    thread_worker(lesson.app)
    description = "remind_later('ada', 0.5)"
    before = time.time()
    result = call(description, lesson.remind_later, "ada", 0.5)
    if not hasattr(result, "ready"):
        fail(f"{description} returned {result!r}, expected the AsyncResult of apply_async (TODO 2).")
    state, value = ended(result, description)
    if state != "SUCCESS":
        fail(f"{description} ended {state} ({value!r}), expected SUCCESS after about 0.5 s (TODO 2).")
    entries = [json.loads(raw) for raw in redis_client.lrange(lesson.REMINDERS, 0, -1)]
    if len(entries) != 1:
        fail(f"{description} ran; the list {lesson.REMINDERS!r} holds {len(entries)} reminders, expected 1.")
    waited = entries[0]["at"] - before
    assert waited >= 0.5 - 0.005, (
        f"{description}: remind ran {waited:.3f} s after the call, expected no sooner than 0.5 s. "
        "Pass countdown=delay to apply_async (TODO 2)."
    )


@pytest.mark.task(2)
def test_late_reminder_expires_without_running(exercise, redis_client, thread_worker, monkeypatch):
    lesson = exercise(MODULE)
    monkeypatch.setenv("REMINDER_GRACE", "0.2")
    description = "remind_later('ada', 0.1) (REMINDER_GRACE=0.2), with no worker running for the first 0.4 s"
    sent = time.time()
    result = call(description, lesson.remind_later, "ada", 0.1)
    if not hasattr(result, "ready"):
        fail(f"{description} returned {result!r}, expected the AsyncResult of apply_async (TODO 2).")
    wait_until(lambda: time.time() > sent + 0.4, 2, "the clock did not move")  # the reminder is now 0.3 s late
    thread_worker(lesson.app)
    wait_until(lambda: outcome(result)[0] != "PENDING", 5, f"{description}: the worker had not taken it after 5 s.")
    state, value = outcome(result)
    reminded = redis_client.llen(lesson.REMINDERS)
    assert state == "REVOKED" and reminded == 0, (
        f"{description}: it reached the worker 0.3 s late, 0.1 s too late; it ended {state} ({value!r}) and {reminded} reminder(s) "
        "went out, expected REVOKED and none. Give apply_async expires= the delay plus the grace (TODO 2)."
    )


# --- TODO 3: the lock's expiry ------------------------------------------------------------------


@pytest.mark.task(3)
@pytest.mark.parametrize(
    "every, longest_run",
    [(3600, 600), (60, 20), (1, 0.3), (0.3, 2)],
    ids=["hourly", "every-minute", "every-second", "slower-than-the-interval"],
)
def test_lock_expiry_outlives_the_longest_run_and_not_the_next_tick(exercise, every, longest_run):
    lesson = exercise(MODULE)
    description = f"lock_expiry(every={every}, longest_run={longest_run})"
    expiry = call(description, lesson.lock_expiry, every, longest_run)
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not math.isfinite(expiry) or expiry <= 0:
        fail(f"{description} returned {expiry!r}, expected a number of seconds: a lock without an expiry outlives a crash.")
    if expiry <= longest_run:
        fail(
            f"{description} returned {expiry:g}: no longer than the longest run. A report that slow would lose its "
            "lock while still running, and the next tick would start a second report beside it (TODO 3)."
        )
    if longest_run < every:
        assert expiry < every, (
            f"{description} returned {expiry:g}: not shorter than the interval. A worker that dies holding the lock "
            "leaves it for the whole expiry, so the next tick would find it taken and skip its report too (TODO 3)."
        )


# --- TODO 4: one report at a time ---------------------------------------------------------------


@pytest.mark.task(4)
def test_report_lock_keeps_a_second_report_out(exercise, redis_client, thread_worker, hold, monkeypatch):
    lesson = exercise(MODULE)
    task = report_task(lesson)
    every, longest = 0.3, 2.0
    monkeypatch.setenv("REPORT_EVERY", str(every))
    monkeypatch.setenv("REPORT_LONGEST_RUN", str(longest))
    expiry = call(f"lock_expiry({every}, {longest}) (TODO 3)", lesson.lock_expiry, every, longest)
    thread_worker(lesson.app, pool="threads", concurrency=2)
    setting = f"REPORT_EVERY={every}, REPORT_LONGEST_RUN={longest:g}"
    first = task.delay()
    wait_for_hold(hold, first, f"build_report.delay() ({setting})")
    held_since = time.monotonic()
    ttl = redis_client.pttl(lesson.LOCK_KEY)
    if ttl == -2:
        fail(f"While a report was being written, Redis had no key {lesson.LOCK_KEY!r}: take the lock under LOCK_KEY (TODO 4).")
    if ttl == -1:
        fail(
            f"The lock {lesson.LOCK_KEY!r} has no expiry: a worker killed mid-report would leave it forever, "
            f"and no report would ever run again. Give it lock_expiry(...) seconds (TODO 4)."
        )
    if ttl > math.ceil(expiry) * 1000 + 100:
        fail(
            f"The lock {lesson.LOCK_KEY!r} was taken for {ttl / 1000:g} s, but lock_expiry({every}, {longest:g}) "
            f"says {expiry:g} s: take it for lock_expiry(every, REPORT_LONGEST_RUN) seconds (TODO 4)."
        )
    first_slot = hold.calls[0][0]
    wait_until(
        lambda: int(time.time() // every) > first_slot and time.monotonic() > held_since + 0.5,
        3,
        "the clock did not move",
    )
    second = task.delay()  # the next tick, while the first report still runs
    wait_until(lambda: second.ready() or time.monotonic() > held_since + 2.0, 3, "unreachable")
    hold.released.set()
    ended(first, "The first build_report")
    ended(second, "The second build_report", timeout=HOLD_LIMIT)
    calls = hold.calls
    if len(calls) > 1 and calls[1][1] < calls[0][2]:
        after = calls[1][1] - held_since
        if 0 < ttl / 1000 < after:
            fail(
                f"The lock {lesson.LOCK_KEY!r} expired {ttl / 1000:g} s into a report that ran longer, and the next "
                f"tick's report started beside it. lock_expiry({every}, {longest:g}) must outlive the longest run (TODO 3)."
            )
        fail(
            f"A report of slot {calls[0][0]} was still being written when the next tick's report started writing "
            f"slot {calls[1][0]} beside it. A run that finds the lock {lesson.LOCK_KEY!r} taken must skip its tick (TODO 4)."
        )
    left = redis_client.exists(lesson.LOCK_KEY)
    assert not left, (
        f"Both reports have ended, and the lock {lesson.LOCK_KEY!r} is still there: release it once the report "
        "is written (in a finally:), or the next tick finds it taken (TODO 4)."
    )


@pytest.mark.task(4)
def test_report_lock_is_released_only_by_its_owner(exercise, redis_client, thread_worker, hold, monkeypatch):
    lesson = exercise(MODULE)
    task = report_task(lesson)
    monkeypatch.setenv("REPORT_EVERY", "3600")
    monkeypatch.setenv("REPORT_LONGEST_RUN", "5")
    thread_worker(lesson.app, pool="threads", concurrency=2)
    result = task.delay()
    wait_for_hold(hold, result, "build_report.delay()")
    if not redis_client.exists(lesson.LOCK_KEY):
        fail(f"While a report was being written, Redis had no key {lesson.LOCK_KEY!r}: take the lock under LOCK_KEY (TODO 4).")
    # As if this run's lock had expired and the next run had taken it, with its own token:
    redis_client.set(lesson.LOCK_KEY, "the-next-run", px=10_000)
    hold.released.set()
    ended(result, "build_report.delay()")
    value = redis_client.get(lesson.LOCK_KEY)
    seen = "was gone" if value is None else f"held {value!r}"
    assert value == b"the-next-run", (
        f"While a report was held, the grader replaced the lock {lesson.LOCK_KEY!r} with another run's token "
        f"(as if this one's had expired and the next run had taken it). When the first report ended, the key "
        f"{seen}: it deleted a lock it no longer owned. Delete it only if it still holds your token (TODO 4)."
    )


# --- TODO 5: one report per tick ----------------------------------------------------------------


@pytest.mark.task(5)
def test_copies_of_one_tick_write_one_report(exercise, redis_client, thread_worker, hold, monkeypatch):
    lesson = exercise(MODULE)
    task = report_task(lesson)
    every = new_slot_every()
    monkeypatch.setenv("REPORT_EVERY", repr(every))
    monkeypatch.setenv("REPORT_LONGEST_RUN", "5")
    thread_worker(lesson.app, pool="threads", concurrency=2)
    description = f"build_report.delay() three times in one slot (REPORT_EVERY={every:.0f} s)"
    first = task.delay()
    wait_for_hold(hold, first, "The first build_report.delay()")
    second = task.delay()  # a copy of the same tick, while the first one writes
    second_sent = time.monotonic()
    wait_until(lambda: second.ready() or time.monotonic() > second_sent + 1.0, 2, "unreachable")
    hold.released.set()
    ended(first, "The first build_report")
    ended(second, "The second build_report", timeout=HOLD_LIMIT)
    third_sent = time.monotonic()
    ended(task.delay(), "The third build_report")  # a copy that comes after the first has finished
    written = [c for c in hold.calls]
    if len(written) > 1:
        late = any(c[1] >= third_sent for c in written)
        when = "after the first had finished" if late else "while the first was writing"
        fail(
            f"{description}: the report of slot {written[0][0]} was written {len(written)} times; a copy sent {when} "
            "wrote it again. Claim the slot, for longer than the slot lasts, and skip a slot already claimed (TODO 5)."
        )
    reports = redis_client.lrange(lesson.REPORTS, 0, -1)
    assert len(reports) == 1, f"{description}: {lesson.REPORTS!r} holds {reports!r}, expected one slot."
    remaining = every - time.time() % every
    for key in sorted(k.decode() for k in redis_client.keys("*")):
        if key in grader_keys(lesson) or is_celerys(key):
            continue
        ttl = redis_client.pttl(key)
        if ttl == -1:
            fail(f"{description}: the key {key!r} never expires: one more for every slot, forever. Give it an expiry (TODO 5).")
        if 0 <= ttl / 1000 < remaining - 1:
            fail(
                f"{description}: the key {key!r} expires in {ttl / 1000:.0f} s, but its slot lasts {remaining:.0f} s "
                "more: a copy sent later in the slot would write the report again. Keep the claim beyond the end "
                "of its slot (TODO 5)."
            )


@pytest.mark.task(5)
def test_two_beats_write_one_report_per_tick(exercise, redis_client, thread_worker, runs, beat_processes, monkeypatch):
    lesson = exercise(MODULE)
    task = report_task(lesson)
    entries = entries_for(lesson, task.name)
    if not entries:
        fail("No beat entry sends build_report yet: this check runs two beats on your schedule (TODO 1 first).")
    env = {"REPORT_EVERY": "1", "REPORT_LONGEST_RUN": "0.5"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the worker thread reads them when a report runs
    start_worker = lambda: thread_worker(lesson.app)  # noqa: E731
    with beat_processes(MODULE, count=2, env=env, meanwhile=start_worker, loglevel="DEBUG") as beats:
        for beat in beats:
            require_every_second(beat, task)
        # Once one beat has sent twice and the other once, some one-second slot has had a copy from each.
        wait_until(
            lambda: max(counts := [sends(beat, task.name) for beat in beats]) >= 2 and min(counts) >= 1,
            BEAT_WAIT,
            f"Two `celery beat` processes with REPORT_EVERY=1 sent build_report "
            f"{[sends(beat, task.name) for beat in beats]} times in {BEAT_WAIT:g} s, expected one a second each (TODO 1).",
        )
        sent = sum(sends(beat, task.name) for beat in beats)
        wait_until(lambda: runs.ended[task.name] >= sent, 5, f"The worker had not run all {sent} reports after 5 s.")
    slots = Counter(raw.decode() for raw in redis_client.lrange(lesson.REPORTS, 0, -1))
    twice = sorted(slot for slot, count in slots.items() if count > 1)
    if not slots:
        fail(f"Two beats sent build_report {sent} times, and no report was written.{runs.error_of(task)}")
    assert not twice, (
        f"Two beats sent build_report {sent} times, two per tick; {lesson.REPORTS!r} holds {dict(slots)} "
        f"(slot: times written): slot(s) {twice} written more than once. Each tick's report must be written "
        "once, whichever copy comes first (TODO 5)."
    )
