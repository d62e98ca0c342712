"""Lesson 05: delivery guarantees and idempotency.

Usage (three terminals, all in this folder; the lesson README explains each)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then start a worker
    celery -A delivery1 worker --loglevel=INFO
    python                                           # 3. export REDIS_URL here too, then
    >>> from delivery1 import charge_order, charges_for
    >>> charge_order.delay("order-1", 4200).get(timeout=10)
    'charged order-1'
    >>> charge_order.delay("order-1", 4200).get(timeout=10)     # the client sent it again
    'order-1: already charged'
    >>> charges_for("order-1")
    1
"""

import json
import os
import time

import redis
from celery import Celery

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
CHARGES = "charges"  # the payment provider's ledger: a Redis list, one JSON entry per charge made


def setting(name, default):
    """The environment variable `name`, as the type of `default` (the grader shortens some)."""
    return type(default)(os.environ.get(name, default))


app = Celery("delivery1", broker=REDIS_URL, backend=REDIS_URL)
# When Redis gives an unacknowledged message to another worker, and how often workers look
# for such messages: kombu's defaults, unless the environment says otherwise.
app.conf.broker_transport_options = {
    "visibility_timeout": setting("VISIBILITY_TIMEOUT", 3600),
    "unacked_restore_interval": setting("UNACKED_RESTORE_INTERVAL", 10),
    "unacked_restore_throttle": setting("UNACKED_RESTORE_THROTTLE", 10),
}
# TODO 1: acknowledge each message only once its task has ended, and give the message back
#         to the queue when the process running the task dies.


def charge_card(order_id, amount):
    """The payment provider (given, do not change): takes `amount` cents for `order_id`.

    Every call charges again: the provider knows nothing about your orders. Its answer can be
    slow (PROVIDER_DELAY seconds, 0 by default): the money has moved before you hear back.
    """
    with redis.Redis.from_url(REDIS_URL) as client:
        client.rpush(CHARGES, json.dumps({"order_id": order_id, "amount": amount}))
    time.sleep(setting("PROVIDER_DELAY", 0.0))


def charges_for(order_id):
    """How many times the provider charged `order_id`."""
    with redis.Redis.from_url(REDIS_URL) as client:
        return sum(json.loads(entry)["order_id"] == order_id for entry in client.lrange(CHARGES, 0, -1))


# TODO 4: how long must an order's key live? Pick KEY_TTL (seconds) and write in a comment why.
KEY_TTL = None


@app.task(bind=True)
def charge_order(self, order_id, amount):
    """Charge `amount` cents for order `order_id`: once, however many times this message arrives."""
    # TODO 2: name the idempotency key after what must happen only once.
    # TODO 3: claim the key in one atomic step (expiring after KEY_TTL), and return without
    #         charging when it was claimed already. Claim it before charge_card() or after?
    #         Decide, and write in a comment what a worker killed between the two does.
    charge_card(order_id, amount)
    return f"charged {order_id}"
