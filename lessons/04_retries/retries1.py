"""Lesson 04: retries, backoff and failures.

Usage (four terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    python -m labkit.smtp --refuse 2                 # 2. a mail server that says "later" twice
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 3. then start a worker
    celery -A retries1 worker --loglevel=INFO
    python                                           # 4. export REDIS_URL here too, then
    >>> from retries1 import send_welcome_email
    >>> send_welcome_email.delay("ada@example.com").get(timeout=30)
    'sent to ada@example.com'
"""

import json
import os
import random
import smtplib
from email.message import EmailMessage

import redis
from celery import Celery, Task

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
DEAD_LETTERS = "dead_letters"  # a Redis list: one JSON entry per e-mail we gave up on

app = Celery("retries1", broker=REDIS_URL, backend=REDIS_URL)


def setting(name, default):
    """The environment variable `name`, read now (not at import), as the type of `default`."""
    return type(default)(os.environ.get(name, default))


def welcome_message(to):
    if "@" not in to:
        raise ValueError(f"not an e-mail address: {to!r}")
    message = EmailMessage()
    message["From"] = "hello@example.com"
    message["To"] = to
    message["Subject"] = "Welcome!"
    message.set_content("Thanks for signing up.")
    return message


def deliver(message):
    """Send `message` through the SMTP server at SMTP_HOST:SMTP_PORT (localhost:1025)."""
    # TODO 1: connect with smtplib.SMTP (address from setting(), a timeout), send the message.
    raise NotImplementedError("TODO 1")


def is_temporary(exc):
    """True if sending the same e-mail again may work: a 4xx SMTP reply, or no connection."""
    # TODO 2: 4xx replies and connection errors are temporary; 5xx replies and bugs are not.
    raise NotImplementedError("TODO 2")


def backoff_delay(retries, base=1, maximum=600, jitter=True):
    """Seconds before retry number `retries + 1`: base, 2*base, 4*base... at most `maximum`."""
    # TODO 3: double `base` per retry, up to `maximum`; with jitter, a random delay from 0 to that.
    raise NotImplementedError("TODO 3")


class DeadLetterTask(Task):
    """A task that files each final failure (not each retry) in the Redis list DEAD_LETTERS."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        # TODO 5: push a JSON entry {"task_id", "to", "error": the error's text} onto DEAD_LETTERS.
        raise NotImplementedError("TODO 5")


# TODO 5: make DeadLetterTask the base class of this task, so Celery calls its on_failure.
@app.task(bind=True, max_retries=3)
def send_welcome_email(self, to):
    try:
        deliver(welcome_message(to))
    except Exception as exc:
        # TODO 4: retry a temporary error, keeping it, after backoff_delay() seconds (base
        #         MAIL_RETRY_BACKOFF, jitter unless MAIL_RETRY_JITTER=0); re-raise any other.
        raise NotImplementedError("TODO 4")
    return f"sent to {to}"
