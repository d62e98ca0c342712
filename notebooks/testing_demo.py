"""The demo app of notebooks/10_testing.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set, e.g. by ``python -m labkit broker``)::

    celery -A testing_demo worker --concurrency=2 --loglevel=INFO
    >>> from testing_demo import make_receipt
    >>> make_receipt.delay("o-1", [["apple", 3, 50]]).get(timeout=10)   # fails: see the notebook

Each task carries one thing that a test running it eagerly does not see. Runs of the
task `flaky` are counted in the Redis list "flaky:runs", with the time of each.
"""

import os
import time
from dataclasses import dataclass

import redis
from celery import Celery

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("testing_demo", broker=REDIS_URL, backend=REDIS_URL)
app.conf.task_routes = {"testing_demo.build_report": {"queue": "reports"}}


@dataclass
class Receipt:
    order_id: str
    total: int


@app.task
def make_receipt(order_id, lines):
    """Returns a Receipt object: fine in your own process, not something JSON can carry."""
    return Receipt(order_id, sum(quantity * price for _sku, quantity, price in lines))


@app.task
def line_types(lines):
    """What the task received: the type of `lines` and of its first line."""
    return [type(lines).__name__, type(lines[0]).__name__]


@app.task(bind=True, max_retries=3)
def flaky(self):
    """Fails every time; retried 3 times, 0.5 s apart. Each run is noted in "flaky:runs"."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("flaky:runs", time.time())
    raise self.retry(exc=ConnectionError("the partner API is down"), countdown=0.5)


@app.task
def build_report(name):
    """Routed to the queue "reports": it runs only on a worker that takes that queue."""
    return f"report {name}"


@app.task(soft_time_limit=0.3)
def slow(seconds):
    """Should be stopped after 0.3 s: time limits act on the prefork pool only."""
    time.sleep(seconds)
    return f"slept {seconds} s"


@app.task
def add(x, y):
    return x + y


@app.task
def add_and_wait(x, y):
    """Waits inside a task for another task's result: what Celery forbids in a real worker."""
    return add.delay(x, y).get(timeout=5)


def exchange_rate():
    """The outside service (here a constant): what a test replaces with a fake."""
    return 1.08


@app.task
def in_dollars(euros):
    return round(euros * exchange_rate(), 2)
