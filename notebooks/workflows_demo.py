"""The demo app of notebooks/06_workflows.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set)::

    celery -A workflows_demo worker --loglevel=INFO --concurrency=4
    >>> from celery import chord
    >>> from workflows_demo import collect, slow
    >>> chord(slow.s(name, 0.5) for name in "abcd")(collect.s()).get(timeout=10)
    ['a', 'b', 'c', 'd']

Every task that runs writes one line to the Redis list "timeline" (which task, on which
worker slot, from when to when), so the notebook can draw who ran what, when.
"""

import json
import os
import threading
import time

import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("workflows_demo", broker=REDIS_URL, backend=REDIS_URL)


def note(key, entry):
    """Append a JSON line to a Redis list: the notebook reads what happened in the worker."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush(key, json.dumps(entry))


@app.task
def add(x, y):
    return x + y


@app.task
def sub(x, y):
    return x - y


@app.task
def slow(name, seconds=0.5, fail=False):
    """Work that takes `seconds`, then returns its name (or raises, with fail=True)."""
    time.sleep(seconds)
    if fail:
        raise LookupError(f"no price for {name}")
    return name


@app.task
def collect(results, label="collect"):
    """A chord body: it gets every member's result, as one list."""
    return results


@app.task
def log_error(request, exc, traceback, label):
    """An error callback: Celery calls it with the failed task's request, its error and traceback."""
    note("errors", {"label": label, "task": request.id, "error": repr(exc), "traceback": traceback is not None,
                    "pid": os.getpid(), "at": time.time()})  # fmt: skip


@app.task
def add_and_wait(x, y):
    """Don't: waits inside a task for another task."""
    return add.delay(x, y).get(timeout=5)


_started = {}  # task id -> when it started, in this worker process


@task_prerun.connect
def _start(task_id=None, **_):
    _started[task_id] = time.time()


@task_postrun.connect
def _end(task_id=None, task=None, args=None, kwargs=None, state=None, **_):
    thread = threading.current_thread()
    slot = f"pid {os.getpid()}" if thread is threading.main_thread() else thread.name  # prefork: a process
    if task.name == "celery.starmap":  # a chunk: the calls it made, one after another
        label = ", ".join(str(call[0]) for call in kwargs["it"])
    elif args and isinstance(args[0], list):  # a chord's body: the results it got
        label = f"{len(args[0])} results"
    else:
        label = str(args[0]) if args else ""
    note("timeline", {"task": task.name.rsplit(".", 1)[-1], "label": label, "slot": slot, "state": state,
                      "start": _started.pop(task_id, time.time()), "end": time.time()})  # fmt: skip
