"""The demo app of notebooks/09_monitoring.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set)::

    celery -A monitoring_demo worker --loglevel=INFO
    FLOWER_UNAUTHENTICATED_API=true celery -A monitoring_demo flower --address=127.0.0.1 --port=5555
    >>> from monitoring_demo import render_invoice
    >>> render_invoice.delay(1, 0.2).get(timeout=10)
    'invoice 1 rendered'

Task events are on in the app, so Flower sees every task. The signal handlers below do not
count anything: each one writes down that it was called (which signal, for which task id, in
which process, when) in the Redis list "signals", and the notebook draws those entries.
"""

import json
import os
import time

import redis
from celery import Celery
from celery.signals import task_failure, task_postrun, task_prerun, task_retry, task_success
from celery.utils.log import get_task_logger

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("monitoring_demo", broker=REDIS_URL, backend=REDIS_URL)
app.conf.worker_send_task_events = True  # the worker sends task-received, -started, -succeeded...
app.conf.task_send_sent_event = True  # whoever sends a task sends task-sent

log = get_task_logger(__name__)  # its lines carry "<task name>[<task id>]"


@app.task
def render_invoice(n, seconds):
    time.sleep(seconds)
    return f"invoice {n} rendered"


@app.task(bind=True, max_retries=3)
def email_invoice(self, n, outages=0):
    """The mail server is down for the first `outages` tries."""
    if self.request.retries < outages:
        raise self.retry(exc=ConnectionError("mail server down"), countdown=0.2)
    time.sleep(0.05)
    return f"invoice {n} e-mailed"


@app.task
def import_feed(url):
    if not url.startswith("https://"):
        raise ValueError(f"refusing {url!r}")
    return f"imported {url}"


def note(signal, task_name, task_id, **fields):
    entry = {"signal": signal, "task": task_name.split(".")[-1], "id": task_id, "pid": os.getpid(), "at": time.time()}
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("signals", json.dumps({**entry, **fields}))


@task_prerun.connect
def on_prerun(task_id=None, task=None, **kwargs):
    note("task_prerun", task.name, task_id)


@task_postrun.connect
def on_postrun(task_id=None, task=None, state=None, **kwargs):
    note("task_postrun", task.name, task_id, state=state)
    log.info("run ended: state=%s", state)


@task_success.connect
def on_success(sender=None, **kwargs):
    note("task_success", sender.name, sender.request.id)


@task_failure.connect
def on_failure(sender=None, task_id=None, **kwargs):
    note("task_failure", sender.name, task_id)


@task_retry.connect
def on_retry(sender=None, request=None, **kwargs):
    note("task_retry", sender.name, request.id)
