"""Real Celery workers for tests: in a thread, or as a ``celery worker`` process.

Both are context managers that always stop what they started, also when the
test fails, and both fail with a plain message instead of hanging.

Pick by what the check must prove (see ``CELERY-FACTS`` in the README):
- ``thread_worker``: fast (about a tenth of a second), solo or threads pool.
  Celery's guard against ``result.get()`` inside a task is off here, and time
  limits do nothing on these pools.
- ``process_worker``: the real command line, prefork by default: time limits,
  a killed worker, signals and the ``get()`` guard behave as in production.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import redis
from celery import Celery
from celery._state import _set_task_join_will_block
from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker
from celery.worker import state as worker_state

from labkit.broker import die_with_parent, same_redis

LOGLEVEL = os.environ.get("LABKIT_WORKER_LOGLEVEL", "WARNING")


class WorkerError(RuntimeError):
    """A worker could not start or stop; the message says why, in plain words."""


def broker_mismatch(app: Celery) -> str:
    """Why ``app`` would not reach the grader's Redis (REDIS_URL), or '' when it would."""
    expected = os.environ.get("REDIS_URL")
    actual = app.conf.broker_url
    if not expected or same_redis(actual, expected):
        return ""
    shown = repr(actual) if actual else "not set (so Celery falls back to amqp://guest@localhost//)"
    return f"the app's broker is {shown}, but the grader's Redis is REDIS_URL={expected!r}: build the app with broker=REDIS_URL."


class _Worker(TestWorkController):
    """Celery's test worker, made to notice a stop request within 50 ms.

    The worker's event loop sleeps up to a second when idle and only then sees
    that it should stop; a short repeating timer keeps the wait short.
    """

    def on_consumer_ready(self, consumer) -> None:
        if self.hub is not None:  # runs on the worker's own thread, before its loop
            self.hub.call_repeatedly(0.05, lambda: None)
        super().on_consumer_ready(consumer)


def _unique_name(kind: str) -> str:
    return f"labkit-{kind}-{uuid.uuid4().hex[:8]}@%h"


@contextmanager
def thread_worker(
    app: Celery,
    pool: str = "solo",
    concurrency: int = 1,
    start_timeout: float = 20.0,
    stop_timeout: float = 10.0,
    **options,
) -> Iterator[TestWorkController]:
    """Run a real worker for ``app`` in a thread of this process."""
    problem = broker_mismatch(app)
    if problem:
        raise WorkerError(problem)
    setup_app_for_worker(app, LOGLEVEL, None)
    before = set(threading.enumerate())
    worker = _Worker(
        app=app,
        concurrency=concurrency,
        pool=pool,
        hostname=_unique_name("thread"),
        loglevel=LOGLEVEL,
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        **options,
    )
    thread = threading.Thread(target=worker.start, name="labkit-thread-worker", daemon=True)
    thread.start()
    try:
        if not worker._on_started.wait(start_timeout):
            raise WorkerError(
                f"the worker did not start within {start_timeout:.0f} s: "
                f"is the broker at {app.conf.broker_url} reachable?"
            )
        # The test calls result.get() from this process: let it (Celery's test worker does the same).
        _set_task_join_will_block(False)
        yield worker
    finally:
        worker_state.should_terminate = 0  # how Celery's own test worker is told to stop
        _wait_unblocking(lambda: not thread.is_alive(), app.conf.broker_url, stop_timeout)
        runaway = thread.is_alive()
        if runaway:
            pool_threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("ThreadPoolExecutor")]
            _interrupt([thread, *pool_threads])
            _wait_unblocking(lambda: not thread.is_alive(), app.conf.broker_url, 5.0)
        worker_state.should_terminate = None
        # Results of the stopped worker sit in reference cycles; freed later, they would open
        # (and never close) a Redis connection, and warn in some other check. Free them now.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    if runaway:
        raise WorkerError(
            f"the worker was still busy {stop_timeout:.0f} s after the check ended: "
            "a task that never returns (an infinite loop?) was interrupted."
        )


class RunawayTask(Exception):
    """Raised inside a task that was still running long after its check ended."""


def _interrupt(threads: list[threading.Thread]) -> None:
    """Raise RunawayTask inside threads stuck in Python code (a runaway task).

    Python cannot kill a thread; this makes the task fail at its next bytecode,
    so the worker records a failure and stops normally. A thread blocked in C
    (a long sleep) stays, as a daemon that ends with the process.
    """
    for thread in threads:
        if thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(RunawayTask))


def _wait_unblocking(done: Callable[[], bool], broker_url: str | None, timeout: float) -> None:
    """Wait until ``done()`` while cutting short the BRPOPs of stopping workers.

    On shutdown kombu reads the reply of its BRPOP in flight, which comes only
    when that BRPOP's 1 s timeout runs out. CLIENT UNBLOCK ends it at once, as
    if it had timed out; it touches only clients blocked in this database (ours).
    """
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(broker_url or "redis://127.0.0.1:6379", socket_timeout=5) as client:
        database = client.connection_pool.connection_kwargs.get("db", 0)
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
            if broker_url is None:
                continue
            try:
                for info in client.client_list():
                    if int(info.get("db", database)) == database:
                        client.client_unblock(int(info["id"]))
            except redis.RedisError:
                pass


class WorkerProcess:
    """A running ``celery worker`` command: its process and its log so far."""

    def __init__(self, process: subprocess.Popen, log: deque[str], name: str) -> None:
        self.process = process
        self.name = name
        self._log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return "".join(self._log)

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash would."""
        _kill_group(self.process, signal.SIGKILL)
        self.process.wait(10)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def process_worker(
    module: str,
    cwd: Path,
    pool: str = "prefork",
    concurrency: int = 2,
    args: tuple[str, ...] = (),
    start_timeout: float = 30.0,
    stop_timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> Iterator[WorkerProcess]:
    """Run ``celery -A <module> worker`` in ``cwd`` (REDIS_URL is inherited)."""
    name = _unique_name("process")
    command = [
        sys.executable, "-m", "celery", "-A", module, "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO", f"--hostname={name}",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *args,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(cwd), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: stopping it stops the pool processes too
        preexec_fn=die_with_parent,
    )
    log: deque[str] = deque(maxlen=2000)
    ready = threading.Event()

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            if " ready." in line:
                ready.set()

    reader = threading.Thread(target=collect, name="labkit-worker-log", daemon=True)
    reader.start()
    worker = WorkerProcess(process, log, name)
    try:
        deadline = time.monotonic() + start_timeout
        while not ready.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                reason = "exited" if process.poll() is not None else f"was not ready within {start_timeout:.0f} s"
                tail = "".join(list(log)[-12:])
                raise WorkerError(f"`celery -A {module} worker` {reason}. Its last lines:\n{tail}")
        yield worker
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # warm shutdown: finish the running tasks
            _wait_unblocking(lambda: process.poll() is not None, full_env.get("REDIS_URL"), stop_timeout)
        _kill_group(process, signal.SIGKILL)  # whatever is left, pool processes included
        process.wait(10)
        reader.join(5)
        process.stdout.close()
