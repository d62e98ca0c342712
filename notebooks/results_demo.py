"""The demo app of notebooks/02_results.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set, e.g. by ``python -m labkit broker``)::

    celery -A results_demo worker --loglevel=INFO --pool=threads --concurrency=4
    >>> from results_demo import crunch
    >>> crunch.delay(3).get(timeout=10)
    {'processed': 3}
"""

import os
import time

import redis
from celery import Celery

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("results_demo", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_track_started=True,  # a running task reads STARTED (default False: PENDING)
    result_expires=3600,  # result keys live one hour (default: one day)
    result_extended=True,  # store the task's name and arguments with its result
)


@app.task(bind=True)
def crunch(self, steps, seconds=0.3):
    """Slow work in steps; after each step, publish how far it has got."""
    for done in range(1, steps + 1):
        time.sleep(seconds)  # stands in for real work: a row, a file, an API call
        self.update_state(state="PROGRESS", meta={"current": done, "total": steps})
    return {"processed": steps}


@app.task
def nap(seconds):
    time.sleep(seconds)
    return seconds


@app.task(track_started=False)  # opts out, as every task does by Celery's default
def nap_untracked(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def divide(x, y):
    return x / y


@app.task
def add(x, y):
    return x + y


@app.task
def add_and_wait(x, y):
    """The mistake this lesson warns about: waiting for another task inside a task."""
    return add.delay(x, y).get(timeout=5)


@app.task(ignore_result=True)
def log_event(name):
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("events", name)
