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

# Why: the broker carries task messages to workers; the backend carries results
# back. Without a backend, Celery can send work but nobody can read the answer.
app = Celery("first_task1", broker=REDIS_URL, backend=REDIS_URL)

# JSON and UTC are Celery's defaults; saying so keeps them from changing under you.
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
)


# Why: @app.task registers the function with the app (as "first_task1.add"),
# which gives it .delay() and .apply_async() and lets a worker find it by name.
@app.task
def add(x, y):
    return x + y


@app.task
def count_words(text):
    # Why: str.split() with no argument splits on any run of whitespace.
    return len(text.split())


def add_later(x, y, seconds):
    """Queue add(x, y) to run `seconds` from now, and return its AsyncResult."""
    # Why: delay() is a shortcut with no options; apply_async() takes them,
    # and countdown becomes an ETA in the message that the worker honours.
    return add.apply_async(args=(x, y), countdown=seconds)


def fetch_result(task_id, timeout):
    """Return the result of the task with this id, waiting at most `timeout` seconds."""
    # Why: any process can rebuild a result handle from the id alone, and a
    # get() without a timeout could wait forever for a task nobody runs.
    return AsyncResult(task_id, app=app).get(timeout=timeout)
