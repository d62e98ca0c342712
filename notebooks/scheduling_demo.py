"""The demo app of notebooks/07_scheduling.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set; the schedule file goes to /tmp, not here)::

    celery -A scheduling_demo worker --loglevel=INFO --pool=threads --concurrency=4
    TICK_TASK=scheduling_demo.tick celery -A scheduling_demo beat --loglevel=INFO -s /tmp/celerybeat-schedule
    >>> from scheduling_demo import stamp
    >>> stamp.apply_async(("later",), countdown=1).get(timeout=10)
    1795990000.123
"""

import json
import os
import threading
import time

import redis
from celery import Celery

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
TIMELINE = "timeline"  # a Redis list: one JSON entry per task run, for the notebook's plots
EVERY = float(os.environ.get("TICK_EVERY", "1"))  # seconds between two ticks

app = Celery("scheduling_demo", broker=REDIS_URL, backend=REDIS_URL)

# What beat sends, and how often. A beat reads this once, when it starts: the notebook starts
# each beat with its own TICK_TASK and BEAT_NAME in its environment. BEAT_NAME travels as an
# argument, so each run knows which beat sent it.
app.conf.beat_schedule = {
    "tick": {
        "task": os.environ.get("TICK_TASK", "scheduling_demo.tick"),
        "schedule": EVERY,
        "kwargs": {"sender": os.environ.get("BEAT_NAME", "beat")},
    }
}


def record(**entry):
    """Append one run to the timeline, with the worker thread (the slot) that ran it."""
    entry["thread"] = threading.current_thread().name
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush(TIMELINE, json.dumps(entry))


@app.task
def stamp(label):
    """Note when it ran: the notebook compares that with the countdown it asked for."""
    now = time.time()
    record(task="stamp", label=label, start=now, end=now, wrote=True)
    return now


@app.task
def tick(sender="?"):
    """A periodic task with no protection: every message that arrives is one more report."""
    start = time.time()
    time.sleep(0.2)  # the work
    record(task="tick", sender=sender, slot=int(start // EVERY), start=start, end=time.time(), wrote=True)


@app.task
def tick_once(sender="?"):
    """The same, once per tick: the first copy claims its slot (SET NX PX), later copies skip."""
    start = time.time()
    slot = int(start // EVERY)
    with redis.Redis.from_url(REDIS_URL) as client:
        first = client.set(f"tick-slot:{slot}", sender, nx=True, px=int(EVERY * 1000))
    if first:
        time.sleep(0.2)  # the work, done once
    record(task="tick_once", sender=sender, slot=slot, start=start, end=time.time(), wrote=bool(first))


@app.task
def slow_tick(sender="?", seconds=1.6, lock_for=2.5):
    """A report slower than its interval, behind a lock: a tick that finds it taken skips."""
    start = time.time()
    with redis.Redis.from_url(REDIS_URL) as client:
        lock = client.lock("slow-lock", timeout=lock_for)  # SET NX PX with a token
        got = lock.acquire(blocking=False)
        if got:
            try:
                time.sleep(seconds)  # the slow work
            finally:
                lock.release()  # deletes the key only if it still holds our token
    record(task="slow_tick", sender=sender, slot=int(start // EVERY), start=start, end=time.time(), wrote=got)
