"""Lesson 09: monitoring.

Usage (four terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker
    celery -A monitoring1 worker --loglevel=INFO
    export FLOWER_UNAUTHENTICATED_API=true           # 3. then Flower, on http://127.0.0.1:5555
    celery -A monitoring1 flower --address=127.0.0.1 --port=5555
    python                                           # 4. export REDIS_URL here too, then
    >>> from monitoring1 import fetch_rate, task_metrics
    >>> fetch_rate.delay("USD", outages=2).get(timeout=10)
    1.08
    >>> task_metrics("monitoring1.fetch_rate")
    {'retried': 2.0, 'seconds': 0.0916, 'succeeded': 1.0}
"""

import logging
import os
import time

import redis
from celery import Celery
from celery.signals import task_failure, task_postrun, task_prerun, task_retry, task_success

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
RETRY_DELAY = 0.1  # seconds between two tries of fetch_rate (short, for the lesson)

app = Celery("monitoring1", broker=REDIS_URL, backend=REDIS_URL)

# TODO 1: make this app's workers send task events (the grader starts them without -E), and
#         make every delay() send a task-sent event too, so that Flower sees a task from the
#         moment it is queued.

log = logging.getLogger(__name__)


def redis_client():
    return redis.Redis.from_url(REDIS_URL)


@app.task
def resize_image(image_id, seconds=0.0):
    """Resize one image (simulated: it takes `seconds`)."""
    time.sleep(seconds)
    return f"{image_id} resized"


@app.task
def import_feed(url):
    """Import a product feed. Anything but an https:// URL is refused: a permanent failure."""
    if not url.startswith("https://"):
        raise ValueError(f"refusing {url!r}: not an https URL")
    return f"imported {url}"


@app.task(bind=True, max_retries=2)
def fetch_rate(self, currency, outages=0):
    """Fetch an exchange rate from an API that is down for the first `outages` tries (simulated)."""
    if self.request.retries < outages:
        raise self.retry(exc=ConnectionError("rates API down"), countdown=RETRY_DELAY)
    return 1.08


# --- Metrics: one Redis hash per task name, "metrics:<task name>", readable from anywhere ------


def metrics_key(task_name):
    return f"metrics:{task_name}"


def task_metrics(task_name):
    """The metrics of one task, as the grader and your dashboard read them, e.g. for
    "monitoring1.fetch_rate": {"succeeded": 2.0, "failed": 1.0, "retried": 4.0, "seconds": 0.021}.

    If you keep your counters somewhere else, change this function to read them from there.
    """
    with redis_client() as client:
        fields = client.hgetall(metrics_key(task_name))
    return {name.decode(): float(value) for name, value in fields.items()}


# TODO 2: time every run of every task: remember when it starts (here), and when it ends
#         (run_ended) add the seconds it took to "seconds" in the task's hash. Use a monotonic clock.
@task_prerun.connect
def run_started(task_id=None, task=None, **kwargs):
    """Celery calls this in the pool process, just before each run of a task (a retry is a new run)."""
    raise NotImplementedError("TODO 2")


@task_postrun.connect
def run_ended(task_id=None, task=None, state=None, **kwargs):
    """Celery calls this in the pool process, just after each run: state is SUCCESS, FAILURE or RETRY."""
    # TODO 4: log one line for this run on `log`, at INFO: the task's name, its id, its outcome
    #         (succeeded, failed or retried) and the seconds it took.
    raise NotImplementedError("TODO 2")


# TODO 3: count in the task's hash how each task ended, "succeeded" or "failed", and each of its
#         retries as "retried". A retried task runs more than once, yet it is one task: choose the
#         signal(s) to count each on, so that succeeded + failed is the number of tasks sent, and
#         write down why in a comment.
