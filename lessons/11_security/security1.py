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

# TODO 1: accept JSON only. (Pickle was added here long ago "so that dates could travel".)
app.conf.task_serializer = "pickle"
app.conf.accept_content = ["json", "pickle"]

# TODO 2: sign every task message with SIGNING_KEY and SIGNING_CERT, and accept only
#         messages signed by a certificate in SIGNING_CERTS. Results stay JSON.

# TODO 5: when REDIS_URL is a rediss:// URL, make the broker and the result backend check
#         the server's certificate against REDIS_CA.

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


# TODO 3: this task receives the user's e-mail address and mailbox password, so both sit in
#         Redis in clear. Decide which fields of the form may travel in the message, and look
#         the rest up by id inside the task.
@app.task
def import_contacts(email, password, folder):
    """Import the contacts of one mail folder of the user with this e-mail address."""
    # TODO 4: refuse inputs that no real request can hold, before using them.
    count = fetch_contacts(email, password, folder)
    return f"imported {count} contacts from {folder} for {email}"


def start_import(form):
    """The web view calls this with the form the user sent; it returns the task's AsyncResult."""
    return import_contacts.delay(form["email"], form["mailbox_password"], form["folder"])
