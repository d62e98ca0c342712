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
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import redis
from celery import Celery
from celery._state import _set_task_join_will_block
from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker
from celery.worker import state as worker_state

from labkit.broker import same_redis
from labkit.procs import ChildProcess, ProcessError

class WorkerError(RuntimeError):
    """A worker could not start or stop; the message says why, in plain words."""


def broker_mismatch(app: Celery) -> str:
    """Why ``app`` would not reach the grader's Redis (REDIS_URL), or '' when it would."""
    expected = os.environ.get("REDIS_URL")  # what the broker fixture gave the lesson code
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
    loglevel: str = "WARNING",
    **options,
) -> Iterator[TestWorkController]:
    """Run a real worker for ``app`` in a thread of this process."""
    problem = broker_mismatch(app)
    if problem:
        raise WorkerError(problem)
    setup_app_for_worker(app, loglevel, None)
    before = set(threading.enumerate())
    worker = _Worker(
        app=app,
        concurrency=concurrency,
        pool=pool,
        hostname=_unique_name("thread"),
        loglevel=loglevel,
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


class _Unblocker:
    """Cuts short the BRPOPs of stopping workers: call it while waiting for them to exit.

    On shutdown kombu reads the reply of its BRPOP in flight, which comes only
    when that BRPOP's 1 s timeout runs out. CLIENT UNBLOCK ends it at once, as
    if it had timed out; it touches only clients blocked in this database (ours).
    """

    def __init__(self, broker_url: str | None) -> None:
        # Our own broker: a rediss:// one is reached without checking its certificate.
        tls = {"ssl_cert_reqs": "none"} if broker_url and broker_url.startswith("rediss://") else {}
        self._client = redis.Redis.from_url(broker_url, socket_timeout=5, **tls) if broker_url else None

    def __call__(self) -> None:
        if self._client is None:
            return
        database = self._client.connection_pool.connection_kwargs.get("db", 0)
        try:
            for info in self._client.client_list():
                if int(info.get("db", database)) == database:
                    self._client.client_unblock(int(info["id"]))
        except redis.RedisError:
            pass

    def __enter__(self) -> _Unblocker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()


def _wait_unblocking(done: Callable[[], bool], broker_url: str | None, timeout: float) -> None:
    """Wait up to ``timeout`` s until ``done()``, cutting short the stopping worker's BRPOP."""
    deadline = time.monotonic() + timeout
    with _Unblocker(broker_url) as unblock:
        unblocked = 0.0
        while not done() and time.monotonic() < deadline:
            if time.monotonic() - unblocked >= 0.05:  # again, in case the worker started a new BRPOP
                unblock()
                unblocked = time.monotonic()
            time.sleep(0.005)


class WorkerProcess(ChildProcess):
    """A running ``celery worker`` command; ``name`` is its hostname (for ``inspect``/``control``)."""

    @property
    def pool_pids(self) -> list[int]:
        """The pids of its pool processes (its children, for prefork), read from /proc."""
        return children_of(self.pid)

    def kill_pool_process(self, pool_pid: int) -> None:
        """SIGKILL one pool process while the worker lives on (an out-of-memory kill), noticed at once.

        Billiard looks at a pool process's exit status as soon as its pipe closes, often a
        moment before the kernel has it as a zombie, and then sees the death only at its next
        pool check, 5 s later. Pausing the worker (SIGSTOP) until the killed process is a
        zombie keeps the check fast; the worker handles the loss as it would have 5 s later.
        """
        os.kill(self.pid, signal.SIGSTOP)
        try:
            os.kill(pool_pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while process_state(pool_pid) not in ("Z", "X", "") and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def stop_warm(self, timeout: float = 15.0) -> float:
        """SIGTERM (warm shutdown: running tasks finish), at most ``timeout`` s, then SIGKILL.

        Returns the seconds it took. While waiting, the worker's BRPOP in flight is cut short
        (kombu otherwise waits for it to time out before it can exit).
        """
        self.stop_signal = signal.SIGTERM
        with _Unblocker(self.env.get("REDIS_URL")) as unblock:
            return self.stop(timeout, while_waiting=unblock)


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                children.append(int(entry))
    return children


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` in /proc ('S', 'R', 'Z' for a zombie…), or '' once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


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
    warm_stop: bool = False,
) -> Iterator[WorkerProcess]:
    """Run ``celery -A <module> worker`` in ``cwd`` (REDIS_URL is inherited).

    At the end it is killed at once (SIGKILL to it and its pool: about 0.05 s), since no
    check needs to see a shutdown that comes after it; ``warm_stop=True`` (or calling
    ``worker.stop_warm()`` in the check) gives the real warm shutdown, bounded by ``stop_timeout``.
    """
    name = _unique_name("process")
    command = [
        sys.executable, "-m", "celery", "-A", module, "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO", f"--hostname={name}",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *args,
    ]  # fmt: skip
    worker = WorkerProcess(
        command,
        name=name,
        ready=" ready.",
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), **(env or {})},
        start_timeout=start_timeout,
        stop_signal=signal.SIGKILL,
    )
    try:
        worker.start()
    except ProcessError as exc:
        raise WorkerError(str(exc)) from None
    try:
        yield worker
    finally:
        if warm_stop:
            worker.stop_warm(stop_timeout)
        else:
            worker.stop()


@contextmanager
def beat_processes(
    module: str,
    cwd: Path,
    schedule_dir: Path,
    count: int = 1,
    env: dict[str, str] | None = None,
    meanwhile: Callable[[], object] | None = None,
    loglevel: str = "INFO",
    start_timeout: float = 30.0,
) -> Iterator[list[ChildProcess]]:
    """Run ``count`` real ``celery -A <module> beat`` commands side by side; yield them once all have started.

    Each keeps its schedule file (``-s``) in ``schedule_dir``, never in the lesson folder.
    They start together (a beat takes 1-2 s to start); ``meanwhile()`` runs while they boot
    (e.g. starting a worker). They are killed at the end: nothing needs to see their shutdown.
    """
    beats: list[ChildProcess] = []
    try:
        for number in range(1, count + 1):
            command = [
                sys.executable, "-m", "celery", "-A", module, "beat", f"--loglevel={loglevel}",
                f"--schedule={schedule_dir / f'celerybeat-schedule-{number}'}",
            ]  # fmt: skip
            beat = ChildProcess(
                command, name=f"beat-{number}", cwd=cwd, env={"PYTHONPATH": str(cwd), **(env or {})},
                stop_signal=signal.SIGKILL,
            )  # fmt: skip
            beats.append(beat.start())  # no readiness test: returns at once, waited for below, all together
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + start_timeout
        for beat in beats:
            while "beat: Starting..." not in beat.log:
                if not beat.alive:
                    raise WorkerError(f"`{beat.shown}` exited (code {beat.returncode}) before it started. Its last lines:\n{beat.tail(6)}")
                if time.monotonic() > deadline:
                    raise WorkerError(f"`{beat.shown}` had not started after {start_timeout:g} s. Its last lines:\n{beat.tail(6)}")
                time.sleep(0.02)
        yield beats
    finally:
        for beat in beats:
            beat.stop()
