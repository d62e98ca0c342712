"""The demo app of notebooks/04_retries.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set, and a mail server: ``python -m labkit.smtp --refuse 2``)::

    celery -A retries_demo worker --loglevel=INFO --pool=solo
    >>> from retries_demo import send_by_hand
    >>> send_by_hand.delay("ada@example.com").get(timeout=30)
    'sent to ada@example.com'
"""

import os
import smtplib
from email.message import EmailMessage

import redis
from celery import Celery, Task

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("retries_demo", broker=REDIS_URL, backend=REDIS_URL)


def deliver(to):
    """Send a welcome e-mail to the SMTP server at SMTP_HOST:SMTP_PORT, read on each call."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hello@example.com", to, "Welcome!"
    message.set_content("Thanks for signing up.")
    host, port = os.environ.get("SMTP_HOST", "localhost"), int(os.environ.get("SMTP_PORT", "1025"))
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.send_message(message)
    return f"sent to {to}"


def note(event):
    """Append a line to the Redis list "events": the notebook reads what happened in the worker."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush("events", event)


class Noisy(Task):
    """A base class whose hooks say when Celery calls them."""

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        note(f"on_retry   {exc!r}")

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        note(f"on_failure {exc!r}")


@app.task(bind=True, base=Noisy, max_retries=2)
def send_by_hand(self, to):
    """Retry a 4xx reply 0.5 s, then 1 s later; let a 5xx reply fail at once."""
    try:
        return deliver(to)
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500:
            raise
        raise self.retry(exc=exc, countdown=0.5 * 2**self.request.retries)


@app.task(bind=True, max_retries=1)
def send_without_exc(self, to):
    """The same retry without exc=: what does the caller get after the last one?"""
    try:
        return deliver(to)
    except smtplib.SMTPResponseException:
        raise self.retry(countdown=0.5)


@app.task(autoretry_for=(smtplib.SMTPDataError,), retry_backoff=True, retry_jitter=False, max_retries=1)
def send_automatically(to):
    """Celery retries any SMTPDataError by itself, once, 1 s later (retry_backoff=True)."""
    return deliver(to)


@app.task
def file_dead_letter(request, exc, traceback):
    """An error callback (link_error): Celery calls it once, with the failed task's request and error."""
    note(f"link_error task {request.id[:8]}… failed with {exc!r}")
