"""Lesson 11: security.

Usage (four terminals, all in this folder; the lesson README explains each)::

    mkdir -p certs && python -m trustme -k RSA -d certs -q    # once: a throwaway signing key
    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker
    celery -A security1 worker --loglevel=INFO
    FLOWER_USER=admin FLOWER_PASSWORD=change-me celery -A security1 flower --conf=flower1.py   # 3.
    python                                           # 4. export REDIS_URL here too, then
    >>> from security1 import start_import
    >>> form = {"user_id": "u-1001", "email": "ada@example.com",
    ...         "mailbox_password": "correct-horse-battery", "folder": "Inbox"}
    >>> start_import(form).get(timeout=10)
    'imported 3 contacts from Inbox for u-1001'
"""

import os
import re
import ssl

from celery import Celery

# Where Redis listens: redis://, or rediss://user:password@host:port/0 for TLS with a password.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
REDIS_CA = os.environ.get("REDIS_CA", "")  # the CA file that signed the Redis server's certificate
# Message signing: this process's private key and certificate, and the certificates it trusts.
SIGNING_KEY = os.environ.get("SIGNING_KEY", "certs/server.key")
SIGNING_CERT = os.environ.get("SIGNING_CERT", "certs/server.pem")
SIGNING_CERTS = os.environ.get("SIGNING_CERTS", "certs/server.pem")

app = Celery("security1", broker=REDIS_URL, backend=REDIS_URL)

# Why: pickle runs code while it decodes, so anyone who can write to Redis could run code in
# the worker. JSON is data only; a worker that accepts JSON alone refuses a pickled message.
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]

# Why: JSON proves nothing about who wrote a message. Signed messages ("auth") are checked
# against the trusted certificates, so a changed or forged message is refused. Results stay
# JSON (written by the worker), so the client must still accept JSON for them.
app.conf.update(
    security_key=SIGNING_KEY,
    security_certificate=SIGNING_CERT,
    security_cert_store=SIGNING_CERTS,
    security_digest="sha256",
    task_serializer="auth",
    accept_content=["auth"],
    result_accept_content=["json"],
)
app.setup_security()

# Why: without these, the result backend refuses a rediss:// URL, and the broker connects
# without checking whose certificate it got. CERT_REQUIRED + our CA: only our Redis will do.
if REDIS_URL.startswith("rediss://"):
    verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": REDIS_CA}
    app.conf.broker_use_ssl = verify
    app.conf.redis_backend_use_ssl = verify

# The user database (given): in production a table, with secrets in a vault, never in code.
ACCOUNTS = {"u-1001": {"email": "ada@example.com", "mailbox_password": "correct-horse-battery"}}
FOLDERS = ("Inbox", "Sent", "Trash")
FETCHED = []  # what the mail server was asked for: (email, folder), one entry per login


def fetch_contacts(email, password, folder):
    """The user's mail server (given): log in, read the contacts of one folder, return how many."""
    if not any(a["email"] == email and a["mailbox_password"] == password for a in ACCOUNTS.values()):
        raise PermissionError(f"mail server: wrong password for {email}")
    FETCHED.append((email, folder))
    return 3


# Why: whatever travels in the message sits in Redis (and in Flower, and in the logs) in clear,
# signed or not. So the message carries ids and the user's choices only; the task looks up the
# e-mail address and the password by user id, from where they already are.
@app.task
def import_contacts(user_id, folder):
    """Import the contacts of one mail folder of user `user_id`."""
    # Why: anyone who can queue a message can call this task with anything; check each field
    # against what a real request can hold before using it (a pattern, a known list).
    if not isinstance(user_id, str) or not re.fullmatch(r"u-\d{1,12}", user_id) or user_id not in ACCOUNTS:
        raise ValueError(f"unknown user id {user_id!r}")
    if folder not in FOLDERS:
        raise ValueError(f"folder must be one of {FOLDERS}, not {folder!r}")
    account = ACCOUNTS[user_id]
    count = fetch_contacts(account["email"], account["mailbox_password"], folder)
    return f"imported {count} contacts from {folder} for {user_id}"


def start_import(form):
    """The web view calls this with the form the user sent; it returns the task's AsyncResult."""
    # Why: the user id names the account; the folder is what the user asked for. The password
    # and the e-mail address stay behind: the task looks them up by id.
    return import_contacts.delay(form["user_id"], form["folder"])
