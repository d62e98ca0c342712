"""The demo app of notebooks/05_delivery.ipynb (not graded, not the exercise).

A parcel service prints shipping labels; the printer prints every time it is asked.
Each run of a task writes what it does to the Redis list "events", so the notebook can
draw which worker ran what, and when.

Usage (in this folder, with REDIS_URL set)::

    celery -A delivery_demo worker --loglevel=INFO --hostname=A@%h
    >>> from delivery_demo import ship_late
    >>> ship_late.delay("parcel-1", 0).get(timeout=10)
    'shipped parcel-1'
"""

import json
import os
import time
import uuid

import redis
from celery import Celery

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("delivery_demo", broker=REDIS_URL, backend=REDIS_URL)
# The notebook starts some workers with a short visibility timeout and restore sweep.
app.conf.broker_transport_options = {
    "visibility_timeout": int(os.environ.get("VISIBILITY_TIMEOUT", 3600)),
    "unacked_restore_interval": int(os.environ.get("UNACKED_RESTORE_INTERVAL", 10)),
    "unacked_restore_throttle": int(os.environ.get("UNACKED_RESTORE_THROTTLE", 10)),
}


def note(run, event, parcel_id):
    """Append one event to the Redis list "events": which worker and pool process, which run, what, when."""
    worker = os.environ.get("WORKER_NAME", "?")
    entry = {"worker": worker, "pid": os.getpid(), "run": run, "event": event, "parcel": parcel_id, "t": time.time()}
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("events", json.dumps(entry))


def print_label(parcel_id):
    """The side effect: one more label in the Redis list "labels". Asked twice, it prints twice."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("labels", parcel_id)


def wait_for_courier(parcel_id, seconds):
    """The slow part, after the label: wait until the notebook says go (or `seconds` pass)."""
    if seconds > 0:  # BLPOP with a timeout of 0 would wait for ever
        with redis.Redis.from_url(REDIS_URL) as client:
            client.blpop(f"go:{parcel_id}", timeout=seconds)


def ship_parcel(parcel_id, seconds):
    run = uuid.uuid4().hex[:6]
    note(run, "start", parcel_id)
    print_label(parcel_id)
    note(run, "label", parcel_id)
    wait_for_courier(parcel_id, seconds)
    note(run, "end", parcel_id)
    return f"shipped {parcel_id}"


@app.task
def ship_early(parcel_id, seconds):
    """Celery's default: the message is acknowledged (deleted) just before the task runs."""
    return ship_parcel(parcel_id, seconds)


@app.task(acks_late=True, reject_on_worker_lost=True)
def ship_late(parcel_id, seconds):
    """Acknowledged only after the task has ended; given back if its pool process dies."""
    return ship_parcel(parcel_id, seconds)


@app.task(acks_late=True, reject_on_worker_lost=True)
def ship_once(parcel_id, seconds):
    """Idempotent by construction: the label is one field of a hash, written with HSETNX.

    This works because the effect itself lives in Redis: one atomic command both checks and
    prints. An effect somewhere else (a payment provider) needs a separate key: the exercise.
    """
    run = uuid.uuid4().hex[:6]
    note(run, "start", parcel_id)
    with redis.Redis.from_url(REDIS_URL) as client:
        printed = client.hsetnx("labels_once", parcel_id, run)
    note(run, "label" if printed else "skipped", parcel_id)
    wait_for_courier(parcel_id, seconds)
    note(run, "end", parcel_id)
    return f"shipped {parcel_id}" if printed else f"{parcel_id} already had a label"
