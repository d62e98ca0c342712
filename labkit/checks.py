"""Helpers for graded checks: bounded waits that fail with a sentence, not a traceback.

Each helper fails *outside* its ``except`` block, so pytest shows our sentence
alone instead of the student's traceback chained to it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

DEFAULT_TIMEOUT = 10.0


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


def result_of(result: AsyncResult, description: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The return value of the task behind ``result``; any problem fails the check in plain words.

    ``description`` is how the check started the task, e.g. ``"add.delay(2, 3)"``.
    """
    if isinstance(result.backend, DisabledBackend):
        fail(f"{description}: the app has no result backend, so no result can be read. Give Celery(...) a backend=.")
    try:
        return result.get(timeout=timeout)
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
