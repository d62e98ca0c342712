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
    # Why: reading the address on each call lets a running worker follow the environment;
    # the timeout turns a server that hangs into an error, instead of a task stuck forever.
    host, port = setting("SMTP_HOST", "localhost"), setting("SMTP_PORT", 1025)
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.send_message(message)


def is_temporary(exc):
    """True if sending the same e-mail again may work: a 4xx SMTP reply, or no connection."""
    # Why: 4xx means "not now", 5xx means "never", and a bug fails the same way every time.
    # Replies are checked first because every smtplib error is also an OSError.
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    return isinstance(exc, (ConnectionError, TimeoutError, smtplib.SMTPServerDisconnected))


def backoff_delay(retries, base=1, maximum=600, jitter=True):
    """Seconds before retry number `retries + 1`: base, 2*base, 4*base... at most `maximum`."""
    # Why: doubling gives a struggling server more room each time, the cap bounds the wait,
    # and jitter keeps tasks that failed together from all coming back at the same moment.
    delay = min(maximum, base * 2**retries)
    return random.uniform(0, delay) if jitter else delay


class DeadLetterTask(Task):
    """A task that files each final failure (not each retry) in the Redis list DEAD_LETTERS."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        # Why: Celery calls on_failure once, after the last try, so each lost e-mail leaves
        # exactly one entry that a person or a script can act on later.
        to = args[0] if args else kwargs.get("to")
        entry = {"task_id": task_id, "to": to, "error": f"{type(exc).__name__}: {exc}"}
        with redis.Redis.from_url(REDIS_URL) as client:
            client.rpush(DEAD_LETTERS, json.dumps(entry))


# Why: base= is how a task gets the hooks of a Task subclass; without it, Celery's own
# on_failure (which does nothing) runs instead.
@app.task(bind=True, base=DeadLetterTask, max_retries=3)
def send_welcome_email(self, to):
    try:
        deliver(welcome_message(to))
    except Exception as exc:
        # Why: retrying a 5xx or a bug only repeats it. self.retry() raises by itself, and
        # exc= makes the last try fail with this SMTP error, not MaxRetriesExceededError.
        if not is_temporary(exc):
            raise
        delay = backoff_delay(
            self.request.retries,
            base=setting("MAIL_RETRY_BACKOFF", 1.0),
            jitter=setting("MAIL_RETRY_JITTER", 1) != 0,
        )
        raise self.retry(exc=exc, countdown=delay)
    return f"sent to {to}"
