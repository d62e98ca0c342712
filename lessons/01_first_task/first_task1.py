"""Lesson 01: your first task.

Usage (three terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker
    celery -A first_task1 worker --loglevel=INFO
    python                                           # 3. and send it work
    >>> from first_task1 import add
    >>> add.delay(2, 3).get(timeout=10)
    5
"""

import os

from celery import Celery
from celery.result import AsyncResult

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

# TODO 1: use REDIS_URL as the broker (where task messages wait for a worker)
#         and as the result backend (where the worker stores return values).
app = Celery("first_task1")

# JSON and UTC are Celery's defaults; saying so keeps them from changing under you.
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
)


# TODO 2: turn `add` into a Celery task, then make it return x + y.
def add(x, y):
    raise NotImplementedError("TODO 2")


@app.task
def count_words(text):
    # TODO 3: return how many words `text` has ("a  b c" has 3, "" has 0).
    raise NotImplementedError("TODO 3")


def add_later(x, y, seconds):
    """Queue add(x, y) to run `seconds` from now, and return its AsyncResult."""
    # TODO 4: send `add` with apply_async so that it waits `seconds` (a countdown).
    raise NotImplementedError("TODO 4")


def fetch_result(task_id, timeout):
    """Return the result of the task with this id, waiting at most `timeout` seconds."""
    # TODO 5: look the task up by its id with AsyncResult, then wait with a timeout.
    raise NotImplementedError("TODO 5")
