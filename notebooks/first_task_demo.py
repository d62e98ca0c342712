"""The demo app of notebooks/01_first_task.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set, e.g. by ``python -m labkit broker``)::

    celery -A first_task_demo worker --loglevel=INFO --pool=solo
    >>> from first_task_demo import add
    >>> add.delay(2, 3).get(timeout=10)
    5
"""

import os
import time

from celery import Celery

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

# The broker carries task messages to the worker; the backend brings results back.
app = Celery("first_task_demo", broker=REDIS_URL, backend=REDIS_URL)


@app.task
def add(x, y):
    return x + y


@app.task
def slow_add(x, y, seconds=3):
    time.sleep(seconds)  # stands in for slow work: an e-mail, a report, an API call
    return x + y


@app.task
def shout(text):
    return text.upper() + "!"
