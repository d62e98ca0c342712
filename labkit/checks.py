"""Helpers for graded checks: bounded waits that fail with a sentence, not a traceback.

Each helper fails *outside* its ``except`` block, so pytest shows our sentence
alone instead of the student's traceback chained to it.

Waiting for a task: ``result_of`` when the check wants its return value (a failed
task fails the check), ``final_state`` when the check looks at how it ended
(``("FAILURE", <the exception>)`` is an answer, not a problem). Poll the stored state
with ``wait_until`` only for a state on the way (``STARTED``, ``PROGRESS``, ``RETRY``).

Both wait with ``AsyncResult.get()``, in slices of ``GET_SLICE`` s. ``get()`` subscribes
to the result's pub/sub channel, reads the stored state once, then waits for a message.
Its SUBSCRIBE goes out on one connection and is not waited for; its read goes out on
another. Neither redis-server nor the embedded broker promises to run commands of two
connections in the order they were sent, so in a rare race the worker's PUBLISH falls
between the read and the SUBSCRIBE, and that ``get()`` would wait out its whole timeout.
Each new slice reads the stored state again, so a lost message costs at most one slice.
(bench/results_pubsub.py measures the race; tests/labkit/test_results_pubsub.py loses
every message on purpose.)
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

DEFAULT_TIMEOUT = 10.0
GET_SLICE = 1.0  # seconds: the longest a check waits on a result message that was lost


def fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def call(
    description: str, function: Callable[..., Any], *args: Any, expected: tuple[type[BaseException], ...] = (), **kwargs: Any
) -> Any:
    """Call the student's ``function``; a TODO left undone fails the check in one line.

    ``description`` is how the check reads the call, e.g. ``"add_later(2, 3, 30)"``.
    Exceptions in ``expected`` are the check's business and are raised as they are.
    """
    try:
        return function(*args, **kwargs)
    except expected:
        raise
    except NotImplementedError as exc:
        problem = f"{description} raised NotImplementedError({str(exc)!r}): that TODO is still to do."
    except Exception as exc:
        problem = f"{description} raised {type(exc).__name__}: {exc}"
    fail(problem)


def _need_backend(result: AsyncResult, description: str) -> None:
    if isinstance(result.backend, DisabledBackend):
        fail(f"{description}: the app has no result backend, so no result can be read. Give Celery(...) a backend=.")
    if result.ignored:  # get() would return None at once, and the stored state stays PENDING
        fail(f"{description}: the task has ignore_result=True, so it stores no result and no final state to wait for.")


def _get(result: AsyncResult, timeout: float, propagate: bool) -> Any:
    """``result.get(timeout=timeout, propagate=propagate)``, as repeated get()s of at most ``GET_SLICE`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return result.get(timeout=min(GET_SLICE, max(0.0, deadline - time.monotonic())), propagate=propagate)
        except CeleryTimeoutError:
            if time.monotonic() >= deadline:
                raise


def result_of(result: AsyncResult, description: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The return value of the task behind ``result``; any problem fails the check in plain words.

    ``description`` is how the check started the task, e.g. ``"add.delay(2, 3)"``.
    """
    _need_backend(result, description)
    try:
        return _get(result, timeout, propagate=True)
    except CeleryTimeoutError:
        problem = (
            f"{description} gave no result within {timeout:g} s (state {result.state}): "
            "does the task return, and is it registered on the app the worker runs?"
        )
    except NotImplementedError as exc:
        problem = f"{description} raised NotImplementedError({str(exc)!r}) in the worker: that TODO is still to do."
    except Exception as exc:
        problem = f"{description} failed in the worker with {type(exc).__name__}: {exc}"
    fail(problem)


def final_state(
    result: AsyncResult,
    description: str,
    timeout: float = DEFAULT_TIMEOUT,
    not_ended: Callable[[str], str] | None = None,
) -> tuple[str, Any]:
    """Wait until the task behind ``result`` has ended; return ``(state, value)``.

    ``state`` is ``"SUCCESS"``, ``"FAILURE"`` or ``"REVOKED"``; ``value`` is what the task
    returned, or the exception it failed with. A task still running after ``timeout`` s
    fails the check with ``not_ended(state)``, by default "<description> had not ended
    after <timeout> s: does the task return?"::

        state, value = final_state(send_mail.delay(to), f"send_mail.delay({to!r})")
        assert state == "FAILURE" and isinstance(value, ValueError), ...
    """
    _need_backend(result, description)
    try:
        value = _get(result, timeout, propagate=False)
        return result.state, value  # read after get(): its cached final meta
    except CeleryTimeoutError:
        state = result.state
        problem = not_ended(state) if not_ended else f"{description} had not ended after {timeout:g} s: does the task return?"
    except Exception as exc:  # not the task's failure (propagate=False): reaching its result failed
        problem = f"{description}: waiting for its result raised {type(exc).__name__}: {exc}"
    fail(problem)


def wait_until(condition: Callable[[], Any], timeout: float, failure: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``failure`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(failure)
        time.sleep(interval)
