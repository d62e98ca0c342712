"""Lesson 07: scheduling: periodic reports, a reminder that expires, and a lock.

Usage (four terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                                   # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0                 # 2. then start a worker
    celery -A scheduling1 worker --loglevel=INFO
    REPORT_EVERY=5 celery -A scheduling1 beat --loglevel=INFO -s /tmp/celerybeat-schedule   # 3. ONE beat
    python                                                    # 4. export REDIS_URL here too, then
    >>> from scheduling1 import remind_later
    >>> remind_later("ada", 5).get(timeout=10)                # about 5 s later
    'reminded ada'
"""

import json
import os
import time

import redis
from celery import Celery
from celery.schedules import crontab

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
REPORTS = "reports"  # a Redis list: the slot number of each report written
REMINDERS = "reminders"  # a Redis list: one JSON entry per reminder delivered
DIGESTS = "digests"  # a Redis list: one entry per daily digest
LOCK_KEY = "report-lock"  # the Redis key of the lock held while a report is written

app = Celery("scheduling1", broker=REDIS_URL, backend=REDIS_URL)


def setting(name, default):
    """The environment variable `name` as a number of seconds, read now (the checks shorten them)."""
    return float(os.environ.get(name, default))


# Why: beat reads this once, when it starts; the interval comes from the environment so that
# a check can ask for a report a second. minute=0 matters: crontab(hour=7) alone means every
# minute from 07:00 to 07:59, sixty digests. enable_utc (the default) makes 07:00 UTC.
app.conf.beat_schedule = {
    "report": {"task": "scheduling1.build_report", "schedule": setting("REPORT_EVERY", 3600)},
    "digest": {"task": "scheduling1.send_digest", "schedule": crontab(minute=0, hour=7)},
}


@app.task
def send_digest():
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush(DIGESTS, time.time())


@app.task
def remind(user):
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush(REMINDERS, json.dumps({"user": user, "at": time.time()}))
    return f"reminded {user}"


def remind_later(user, delay):
    """Remind `user` in `delay` seconds; a reminder later than REMINDER_GRACE (120 s) is dropped."""
    # Why: expires counts from now, when the message is sent, not from the countdown. So the
    # deadline is the delay plus the grace; expires=grace alone would expire before it is due.
    grace = setting("REMINDER_GRACE", 120)
    return remind.apply_async((user,), countdown=delay, expires=delay + grace)


def lock_expiry(every, longest_run):
    """Seconds the report lock lives, for a report due every `every` s that takes up to `longest_run` s."""
    # Why: the lock must outlive the longest run, or a slow report loses it and a second one
    # starts beside it; and it should be gone before the next tick, so that a worker that died
    # holding it costs no report. Halfway between leaves room on both sides. When no value
    # fits (a report slower than the interval), no overlap wins: half as long again as a run.
    if longest_run < every:
        return (longest_run + every) / 2
    return longest_run * 1.5


def write_report(client, slot):
    """The report itself (here: a note of its slot). Runs at most once per slot, one at a time."""
    client.rpush(REPORTS, slot)


@app.task
def build_report():
    every = setting("REPORT_EVERY", 3600)
    slot = int(time.time() // every)  # which tick this is: the same for every copy of it
    with redis.Redis.from_url(REDIS_URL) as client:
        # Why: a report still running when the next tick comes must not get a twin, so a run
        # that finds the lock taken skips its tick (waiting would tie up a worker, and waiting
        # runs pile up when reports are slower than the interval). redis-py's Lock is SET NX PX
        # with a random token, and releases with a script that deletes the key only if it still
        # holds our token: never the lock a later run took after ours expired.
        lock = client.lock(LOCK_KEY, timeout=lock_expiry(every, setting("REPORT_LONGEST_RUN", 600)))
        if not lock.acquire(blocking=False):
            return f"slot {slot} skipped: another report is still running"
        try:
            # Why: two beats, or a message delivered twice, send the same tick twice. The first
            # copy claims the slot, and any later copy of that slot is refused. The claim lives two
            # slots: a copy that read the clock just before the slot ended, and was slow to get
            # here, still finds it. Then it expires, so claims do not pile up in Redis.
            if not client.set(f"report-slot:{slot}", 1, nx=True, px=int(2 * every * 1000)):
                return f"slot {slot} was done already"
            write_report(client, slot)
        finally:
            lock.release()
    return f"report {slot}"
