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
# Why: with early acks the message is deleted as the task starts, so a worker that dies
# mid-task takes the task with it. Late acks keep it in Redis until the task has ended; and
# when only the pool process dies, the worker would still ack it as a failure, unless told
# to give it back to the queue.
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True


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


# Why: a duplicate can come long after the first run: a redelivery after visibility_timeout
# (1 h) plus a restore sweep (100 s), or whenever a worker runs again if they all died; a
# client's resend. The key must still be there then, or that duplicate charges again. A week
# covers a weekend outage, and a week of small keys costs little memory.
KEY_TTL = 7 * 24 * 3600


@app.task(bind=True)
def charge_order(self, order_id, amount):
    """Charge `amount` cents for order `order_id`: once, however many times this message arrives."""
    # Why: the order id is what must be charged once. It stays the same when Redis redelivers
    # the message and when the client sends the order again; self.request.id does not.
    key = f"charge:{order_id}"
    # Why: claim before charging, with one atomic SET NX, so that two copies running at once
    # cannot both see "free". A worker killed after the claim and before the charge leaves the
    # order unpaid but marked "pending": it is never charged twice, and whoever looks for keys
    # stuck at "pending" finds it. Claiming after the charge would charge twice instead.
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        if not client.set(key, "pending", nx=True, ex=KEY_TTL):
            return f"{order_id}: already {client.get(key)}"
        charge_card(order_id, amount)
        client.set(key, "charged", ex=KEY_TTL)
    return f"charged {order_id}"
