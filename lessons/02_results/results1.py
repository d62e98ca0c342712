"""Lesson 02: results, states and progress.

Usage (three terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker
    celery -A results1 worker --loglevel=INFO
    python                                           # 3. and send it work
    >>> from results1 import process_items, task_status
    >>> result = process_items.delay(["tea", "jam"])
    >>> task_status(result.id)
    {'id': '…', 'state': 'SUCCESS', 'result': {'processed': 2, 'results': ['TEA', 'JAM']}}
"""

import os
from datetime import timedelta

import redis
from celery import Celery
from celery.result import AsyncResult

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("results1", broker=REDIS_URL, backend=REDIS_URL)

# Celery's defaults: task_track_started=False, result_expires=one day.
app.conf.update(
    # TODO 1: make a running task read STARTED (by default it reads PENDING until it ends).
    task_track_started=False,
    # TODO 2: keep each result for one hour (3600 s) instead of one day.
    result_expires=timedelta(days=1),
)


def process_one(item):
    """The work for one item (a plain function, not a task): "tea" -> "TEA"."""
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"cannot process {item!r}: expected a non-empty string")
    return item.upper()


# TODO 3: make process_items a bound task (it receives itself as `self`), and
#         give it the body its docstring describes.
def process_items(self, items):
    """Run process_one on each item, in order, and return a summary.

    After each item, publish the state "PROGRESS" with the meta
    {"current": <items done so far>, "total": <number of items>}.
    Return {"processed": <number of items>, "results": [<each process_one result>]}.
    """
    raise NotImplementedError("TODO 3")


def task_status(task_id):
    """Any task's status as a JSON-friendly dict: always "id" and "state", plus
    "progress" (the meta) while PROGRESS, "result" on SUCCESS, "error" (text) on FAILURE."""
    # TODO 4: look the task up by its id and build that dict.
    raise NotImplementedError("TODO 4")


# TODO 5: nobody ever reads this task's result: tell Celery not to store it.
@app.task
def record_event(name):
    """Append `name` to the Redis list "events" (fire and forget)."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("events", name)
