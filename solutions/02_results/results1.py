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
    # Why: otherwise nothing is stored until the task ends, and a running task
    # looks exactly like one still queued, or one that was never sent.
    task_track_started=True,
    # Why: every result is a Redis key. A client polls for minutes, not days;
    # expiring sooner keeps unread results from piling up in Redis.
    result_expires=timedelta(hours=1),
)


def process_one(item):
    """The work for one item (a plain function, not a task): "tea" -> "TEA"."""
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"cannot process {item!r}: expected a non-empty string")
    return item.upper()


# Why: bind=True passes the task itself as `self`; a task can only write its own
# state (self.update_state) through it. The work stays in a plain function.
@app.task(bind=True)
def process_items(self, items):
    """Run process_one on each item, in order, and return a summary.

    After each item, publish the state "PROGRESS" with the meta
    {"current": <items done so far>, "total": <number of items>}.
    Return {"processed": <number of items>, "results": [<each process_one result>]}.
    """
    results = []
    for item in items:
        results.append(process_one(item))
        self.update_state(state="PROGRESS", meta={"current": len(results), "total": len(items)})
    return {"processed": len(results), "results": results}


def task_status(task_id):
    """Any task's status as a JSON-friendly dict: always "id" and "state", plus
    "progress" (the meta) while PROGRESS, "result" on SUCCESS, "error" (text) on FAILURE."""
    # Why: any process can ask the backend by id. `.info` means something
    # different in each state, and an exception is not JSON, so send its text.
    result = AsyncResult(task_id, app=app)
    state, info = result.state, result.info
    status = {"id": task_id, "state": state}
    if state == "PROGRESS":
        status["progress"] = info
    elif state == "SUCCESS":
        status["result"] = info
    elif state == "FAILURE":
        status["error"] = f"{type(info).__name__}: {info}"
    return status


# Why: a stored result that nobody reads still costs a Redis write and a key that
# lives until it expires. The catch: its state reads PENDING forever.
@app.task(ignore_result=True)
def record_event(name):
    """Append `name` to the Redis list "events" (fire and forget)."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("events", name)
