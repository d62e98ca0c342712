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


# TODO 1: test order_total with direct calls. Pick inputs that would show a mistake: a quantity
#         above 1, several lines, a discount that does not come out even.
def test_order_total_multiplies_quantity_by_unit_price():
    raise NotImplementedError("TODO 1")


def test_order_total_rounds_the_discounted_total_down():
    raise NotImplementedError("TODO 1")


# TODO 2: replace the payment gateway in this fixture, at the seam you choose: the test must never
#         reach the network, and must still run the code it tests. Say why that seam in a comment.
#         Then test that place_order charges the order's total, in cents, exactly once.
@pytest.fixture
def gateway(monkeypatch):
    """A fake payment gateway: it records what place_order asked for and answers as the test says."""
    raise NotImplementedError("TODO 2")


def test_place_order_charges_the_order_total_once(gateway):
    raise NotImplementedError("TODO 2")


# TODO 3: run orders10.app in a real worker thread, taking the queues its tasks are sent to.
#         Then test that a caller of place_order.delay() gets the documented result.
@pytest.fixture(scope="module")
def worker():
    """A real worker for orders10.app, in a thread of this process, for the tests that need one."""
    raise NotImplementedError("TODO 3")


def test_place_order_result_reaches_the_caller(worker, gateway):
    raise NotImplementedError("TODO 3")


# TODO 4: test that a declined card fails the order with CardDeclined, after one request only.
def test_declined_card_fails_the_order(gateway):
    raise NotImplementedError("TODO 4")


# TODO 5: test what place_order does while the gateway is down: how many tries, and how it ends.
#         Can a direct call show that? Choose how the test runs the task, and say why.
def test_place_order_retries_while_the_gateway_is_down(gateway, monkeypatch):
    raise NotImplementedError("TODO 5")
