"""Lesson 06: workflows with canvas.

Usage (three terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker with 4 slots
    celery -A workflows1 worker --concurrency=4 --loglevel=INFO
    python                                           # 3. export REDIS_URL here too, then
    >>> from workflows1 import start_report
    >>> start_report("r1", ["jam", "tea", "bread"]).get(timeout=10)
    {'lines': [['jam', 294], ['tea', 414], ['bread', 253]], 'total': 961}
"""

import json
import os
import time

import redis
from celery import Celery, chord, group

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
PRICES_USD = {"tea": 450, "jam": 320, "bread": 275, "milk": 120, "honey": 890}  # in US cents

app = Celery("workflows1", broker=REDIS_URL, backend=REDIS_URL)


def price_service(item):
    """The slow part of a fetch: a price service that answers after FETCH_SECONDS (0.5 s)."""
    time.sleep(float(os.environ.get("FETCH_SECONDS", "0.5")))
    if item not in PRICES_USD:
        raise LookupError(f"the price service has no price for {item}")
    return PRICES_USD[item]


def save_status(report_id, status, **details):
    """Store {"status": status, **details} under report:<report_id>, for a status page to read."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.set(f"report:{report_id}", json.dumps({"status": status, **details}), ex=3600)


@app.task
def mark_running(report_id):
    """The first step: the status page shows the report as running."""
    save_status(report_id, "running")


@app.task
def fetch(item):
    """One item's price: {"item": "tea", "usd_cents": 450}."""
    return {"item": item, "usd_cents": price_service(item)}


@app.task
def to_euros(row, rate):
    """A fetched row in euro cents, at `rate` euros to the dollar: {"item": "tea", "eur_cents": 414}."""
    return {"item": row["item"], "eur_cents": round(row["usd_cents"] * rate)}


@app.task
def summarize(rows, report_id):
    """The report: one [item, eur_cents] line per row, in the order of `rows`, and the total."""
    # TODO 1: return {"lines": [[item, eur_cents], ...], "total": their sum}, after saving it
    #         with save_status(report_id, "done", ...).
    raise NotImplementedError("TODO 1")


# TODO 2: Celery calls an error callback with arguments of its own: declare them, then yours.
@app.task
def report_failed(report_id):
    """The error callback: the status page shows the report as failed, with the error's text."""
    # TODO 2: save the status "failed" with an "error" text that says what went wrong.
    raise NotImplementedError("TODO 2")


def start_report(report_id, items, rate=0.92):
    """Send the report's workflow and return at once, with the AsyncResult of its last step."""
    # TODO 3: build the workflow: mark the report running; fetch each item and convert it at
    #         `rate`, all items at the same time; then summarize. For each step decide: does
    #         it take the result of the step before it (.s), or must it ignore it (.si)?
    # TODO 4: attach report_failed (with the report id), so that any failure reaches it.
    raise NotImplementedError("TODO 3")
