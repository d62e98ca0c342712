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


# TODO 1: schedule build_report every REPORT_EVERY seconds (setting(), default 3600) and
#         send_digest once a day at 07:00 UTC: app.conf.beat_schedule, or add_periodic_task.
app.conf.beat_schedule = {}


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
    # TODO 2: send remind(user) to run in `delay` s, and to expire once it would come more
    #         than setting("REMINDER_GRACE", 120) s late. Return the AsyncResult.
    raise NotImplementedError("TODO 2")


def lock_expiry(every, longest_run):
    """Seconds the report lock lives, for a report due every `every` s that takes up to `longest_run` s."""
    # TODO 3: decide, and write why in a comment (the README's "Your turn" gives the rules).
    raise NotImplementedError("TODO 3")


def write_report(client, slot):
    """The report itself (here: a note of its slot). Runs at most once per slot, one at a time."""
    client.rpush(REPORTS, slot)


@app.task
def build_report():
    every = setting("REPORT_EVERY", 3600)
    slot = int(time.time() // every)  # which tick this is: the same for every copy of it
    with redis.Redis.from_url(REDIS_URL) as client:
        # TODO 4: hold the lock LOCK_KEY, for lock_expiry(every, REPORT_LONGEST_RUN (600)) s,
        #         around the rest. Taken already? Skip this tick. Release it only if it is yours.
        # TODO 5: claim this slot, for longer than a slot lasts. Claimed already? Skip: it was done.
        write_report(client, slot)
    return f"report {slot}"
