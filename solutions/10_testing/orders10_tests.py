"""Lesson 10: your tests for orders10.py, the module under test (read it; do not edit it).

Usage (two terminals, both in this folder)::

    python -m labkit broker                          # 1. prints a REDIS_URL
    export REDIS_URL=redis://127.0.0.1:PORT/0        # 2. then run the tests
    python -m pytest orders10_tests.py -q
    6 passed in 2.63s

The grader runs this file against orders10.py, where every test must pass, and against
copies of orders10.py with one planted bug each, where at least one test must fail.
"""

import urllib.error

import pytest
from celery.contrib.testing.worker import start_worker

import orders10

LINES = [["apple", 3, 50], ["pear", 2, 120]]  # 3 x 50 + 2 x 120 = 390 cents
PAID = {"status": "paid", "id": "ch_1"}  # what the gateway answers for a card that works


# Why: order_total is plain Python, so direct calls prove it, in microseconds. Quantities of 1
# would make "price times quantity" and "price" look the same, and 999 cents less 15 % is
# 849.15: only an uneven discount shows which way the total is rounded.
def test_order_total_multiplies_quantity_by_unit_price():
    assert orders10.order_total([["apple", 3, 50]]) == 150
    assert orders10.order_total(LINES) == 390


def test_order_total_rounds_the_discounted_total_down():
    assert orders10.order_total(LINES, discount_percent=10) == 351
    assert orders10.order_total([["cake", 1, 999]], discount_percent=15) == 849


# Why: post_json is the one function of orders10 that leaves the process. Replacing it keeps the
# network out while charge_card and place_order run for real, so the test sees the very payload
# the gateway would get. Replacing charge_card would hide its own mistakes (the amount it sends),
# and patching urllib.request.urlopen misses: orders10 imported urlopen under its own name.
# It is replaced on the orders10 module, where place_order looks it up each time it runs, so a
# worker thread of this process sees the fake too (a `celery worker` process would not).
class FakeGateway:
    """Stands in for the payment gateway: records each request, gives the answer it is told."""

    def __init__(self):
        self.requests = []  # the JSON payloads sent, in order
        self.answer = PAID  # a reply, or an exception to raise

    def post_json(self, url, payload):
        self.requests.append(payload)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def gateway(monkeypatch):
    """A fake payment gateway: it records what place_order asked for and answers as the test says."""
    fake = FakeGateway()
    monkeypatch.setattr(orders10, "post_json", fake.post_json)
    return fake


def test_place_order_charges_the_order_total_once(gateway):
    orders10.place_order("o-1", LINES)
    assert gateway.requests == [{"order_id": "o-1", "amount": 390, "currency": "EUR"}]


# Why: only a worker sends the task through Redis and stores its result as JSON; a direct call
# or .apply() hands back the Python object itself, whatever it is. place_order is routed to
# "orders", so the worker takes that queue too. Module scope starts it once for the whole file.
@pytest.fixture(scope="module")
def worker():
    """A real worker for orders10.app, in a thread of this process, for the tests that need one."""
    queues = ["celery", "orders"]
    with start_worker(orders10.app, pool="solo", perform_ping_check=False, queues=queues) as running:
        yield running


def test_place_order_result_reaches_the_caller(worker, gateway):
    result = orders10.place_order.delay("o-1", LINES).get(timeout=10)
    assert result == {"order_id": "o-1", "total": 390, "charge_id": "ch_1"}


# Why: nothing here crosses the broker, so a direct call proves it. pytest.raises fails the
# test if place_order swallows the error, and the count shows it was not tried again.
def test_declined_card_fails_the_order(gateway):
    gateway.answer = {"status": "declined", "reason": "insufficient funds"}
    with pytest.raises(orders10.CardDeclined):
        orders10.place_order("o-1", LINES)
    assert len(gateway.requests) == 1


# Why: called directly, a task's self.retry() re-raises at once: one try, no retry, so a direct
# call cannot show the retries. A worker runs them for real: 1 try + max_retries=3, then the
# gateway's error. The delay is read when the task runs, so setting it here shortens the worker's
# waits too. (.apply() would also run the retries, but back to back, ignoring the countdown.)
def test_place_order_retries_while_the_gateway_is_down(worker, gateway, monkeypatch):
    monkeypatch.setenv("PAYMENT_RETRY_DELAY", "0.01")
    gateway.answer = urllib.error.URLError("connection refused")
    with pytest.raises(orders10.GatewayDown):
        orders10.place_order.delay("o-1", LINES).get(timeout=10)
    assert len(gateway.requests) == 4
