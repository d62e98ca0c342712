"""The demo app of notebooks/11_security.ipynb (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set)::

    DEMO_MODE=json celery -A security_demo worker --pool=solo --loglevel=INFO
    >>> from security_demo import add
    >>> add.delay(2, 3).get(timeout=10)
    5

DEMO_MODE picks what the app accepts: "json" (Celery's default), "pickle" (json and pickle:
never do this, the notebook shows why) or "signed" (signed messages only; the key, the
certificate and the trusted certificates come from SIGNING_KEY, SIGNING_CERT, SIGNING_CERTS).
"""

import os

from celery import Celery

# Read at import time: set REDIS_URL (and DEMO_MODE) before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
MODE = os.environ.get("DEMO_MODE", "json")

app = Celery("security_demo", broker=REDIS_URL, backend=REDIS_URL)
if MODE == "pickle":
    app.conf.accept_content = ["json", "pickle"]
if MODE == "signed":
    app.conf.update(
        security_key=os.environ["SIGNING_KEY"],
        security_certificate=os.environ["SIGNING_CERT"],
        security_cert_store=os.environ["SIGNING_CERTS"],
        security_digest="sha256",
        task_serializer="auth",
        accept_content=["auth"],
        result_accept_content=["json"],  # results stay JSON: the client must accept them
    )
    app.setup_security()


@app.task
def add(x, y):
    return x + y


@app.task
def login(email, password):
    """The wrong way round: a password as an argument. It sits in Redis, signed or not."""
    return f"logged in as {email}"
