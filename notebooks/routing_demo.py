"""The demo app of notebooks/08_routing.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set; one worker per queue)::

    celery -A routing_demo worker -Q emails -n emails@%h --pool=solo --loglevel=INFO
    celery -A routing_demo worker -Q reports -n reports@%h --concurrency=1 --loglevel=INFO
    >>> from routing_demo import send_email
    >>> send_email.delay(1).get(timeout=10)
    'e-mail 1 sent'

Every task appends one entry to the Redis list "timeline" when it ends: which worker
process ran it, from when to when. The notebook draws them. A report also notes when it
started (the Redis hash "started"), for the one that is killed before it can say so.
"""

import json
import os
import time

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("routing_demo", broker=REDIS_URL, backend=REDIS_URL)
app.conf.task_routes = {
    "routing_demo.send_email": {"queue": "emails"},
    "routing_demo.build_report": {"queue": "reports"},
}
# Ten priority levels (0-9) instead of kombu's four steps, and -Q a,b tries a before b.
app.conf.broker_transport_options = {"priority_steps": list(range(10)), "queue_order_strategy": "priority"}


def record(request, label, started, outcome="done"):
    """One bar of the timeline: this worker process ran `label` from `started` until now."""
    entry = {
        "task": request.task.split(".")[-1],
        "label": str(label),
        "slot": f"{request.hostname.split('@')[0]} pid {os.getpid()}",
        "start": started,
        "end": time.time(),
        "outcome": outcome,
    }
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("timeline", json.dumps(entry))


@app.task(bind=True, rate_limit="5/s")
def send_email(self, n):
    """At most 5 a second per worker: one every 0.2 s."""
    started = time.time()
    time.sleep(0.02)  # talking to the mail provider
    record(self.request, n, started)
    return f"e-mail {n} sent"


@app.task(bind=True)
def make_thumbnail(self, n, seconds=0.3):
    started = time.time()
    time.sleep(seconds)
    record(self.request, n, started)
    return f"thumbnail {n}"


@app.task(bind=True, soft_time_limit=1, time_limit=2)
def build_report(self, name, seconds, stuck=False):
    """Work for `seconds`. The soft limit (1 s) raises inside; the hard limit (2 s) kills the process.

    With stuck=True the work swallows the soft limit, as a broad `except Exception:` would.
    """
    started = time.time()
    with redis.Redis.from_url(REDIS_URL) as client:
        slot = f"{self.request.hostname.split('@')[0]} pid {os.getpid()}"
        client.hset("started", name, json.dumps({"start": started, "slot": slot}))
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                if not stuck:
                    raise
    except SoftTimeLimitExceeded:
        record(self.request, name, started, outcome="cleaned up")
        raise
    record(self.request, name, started)
    return f"report {name} done"
