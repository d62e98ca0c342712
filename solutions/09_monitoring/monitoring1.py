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

# Why: task events are off by default. Flower, `celery events` and every other monitor are built
# from them, and a monitor that sees nothing cannot say "nothing ran". Set in the app, the
# worker sends them whoever starts it and however (no -E to forget). The task-sent event comes
# from the sender, not the worker: with it, a task that waits in the queue shows up too.
app.conf.worker_send_task_events = True
app.conf.task_send_sent_event = True

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


# Why: task_prerun and task_postrun of one run are called in the same pool process, so the start
# can wait in that process's memory, keyed by task id (one process may run several tasks in a
# row; a threads pool runs several at once). time.monotonic() never jumps when the system
# clock is set (NTP, summer time); time.time() can, and a run would then last -3600 s.
STARTS = {}


@task_prerun.connect
def run_started(task_id=None, task=None, **kwargs):
    """Celery calls this in the pool process, just before each run of a task (a retry is a new run)."""
    STARTS[task_id] = time.monotonic()


@task_postrun.connect
def run_ended(task_id=None, task=None, state=None, **kwargs):
    """Celery calls this in the pool process, just after each run: state is SUCCESS, FAILURE or RETRY."""
    # Why: the seconds go to Redis, where a dashboard in another process can read them; HINCRBYFLOAT
    # adds in one atomic step, so two pool processes never overwrite each other's sum.
    seconds = time.monotonic() - STARTS.pop(task_id, time.monotonic())
    with redis_client() as client:
        client.hincrbyfloat(metrics_key(task.name), "seconds", seconds)
    # Why: a plain logger's line carries only its message (extra= fields are not printed by the
    # worker's format), so the id goes in the message: whoever holds a task id from a support
    # ticket finds every run of it with one grep. key=value pairs are easy for a log pipeline.
    outcome = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}.get(state, state)
    log.info("task=%s id=%s outcome=%s seconds=%.3f", task.name, task_id, outcome, seconds)


# Why: task_prerun and task_postrun fire once per *run*, and a retried task runs again: counted
# there, fetch_rate("USD", outages=2) would be three tasks. task_success and task_failure fire
# once per task, on its last run, and task_retry once per retry, so succeeded + failed is the
# number of tasks sent, and "retried" says how hard they had to try. task_failure also fires
# when a pool process dies mid-task, where no task_postrun runs at all (but twice after a hard
# time limit, measured on Celery 5.7.0). The counts live in Redis: a dict would be split among
# the prefork pool processes, out of reach of the grader and your dashboard, and gone at the
# next restart. HINCRBY is atomic.
def count(task_name, field):
    with redis_client() as client:
        client.hincrby(metrics_key(task_name), field, 1)


@task_success.connect
def count_success(sender=None, **kwargs):
    count(sender.name, "succeeded")


@task_failure.connect
def count_failure(sender=None, **kwargs):
    count(sender.name, "failed")


@task_retry.connect
def count_retry(sender=None, **kwargs):
    count(sender.name, "retried")
