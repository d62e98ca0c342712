"""The two real workers of labkit/workers.py: start, round trip, stop, and fail plainly.

The broker runs in a child process (``broker_process``), as the grader runs it, so a
runaway task in this process cannot slow the broker down.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import pytest
import redis
from celery import Celery

from labkit.checks import wait_until
from labkit.broker import broker_process
from labkit.workers import WorkerError, process_worker, thread_worker

WAIT = 10.0  # the bound on every result and join in this file, in seconds

PROBE_MODULE = '''
import os

from celery import Celery

app = Celery("probe_tasks", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])


@app.task
def add(x, y):
    return x + y


@app.task
def whoami():
    return os.getpid()
'''


@pytest.fixture(scope="module")
def module_broker_url():
    with broker_process() as url:
        yield url


@pytest.fixture
def url(module_broker_url, monkeypatch):
    """The broker, emptied, and REDIS_URL pointing at it (as the grader sets it)."""
    client = redis.Redis.from_url(module_broker_url, socket_timeout=WAIT)
    client.flushall()
    client.close()
    monkeypatch.setenv("REDIS_URL", module_broker_url)
    return module_broker_url


@pytest.fixture
def make_app(url):
    apps: list[Celery] = []

    def make(name: str) -> Celery:
        app = Celery(name, broker=url, backend=url)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def process_state(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of ``pid`` from /proc, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = process_state(pid)
    return state is not None and state[0] != "Z"


def process_group(pgid: int) -> list[int]:
    """The live processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = process_state(int(entry))
            if state is not None and state[2] == pgid and state[0] != "Z":
                members.append(int(entry))
    return members


# --- the thread worker ------------------------------------------------------------


def test_thread_worker_round_trip(make_app):
    app = make_app("thread_probe")

    @app.task
    def add(x, y):
        return x + y

    with thread_worker(app, start_timeout=WAIT, stop_timeout=WAIT):
        assert add.delay(20, 22).get(timeout=WAIT) == 42
        assert [r.get(timeout=WAIT) for r in [add.delay(i, 1) for i in range(5)]] == [1, 2, 3, 4, 5]
    assert not any(t.name == "labkit-thread-worker" and t.is_alive() for t in threading.enumerate())


def test_thread_worker_refuses_an_app_on_another_broker(make_app, monkeypatch):
    app = make_app("elsewhere")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(WorkerError, match="REDIS_URL"):
        with thread_worker(app, start_timeout=WAIT):
            pass


def test_runaway_task_makes_the_stop_raise_and_is_interrupted(make_app):
    app = make_app("runaway_probe")
    running = threading.Event()
    runner: list[threading.Thread] = []

    @app.task
    def spin():
        runner.append(threading.current_thread())
        running.set()
        while True:
            pass

    started = None
    with pytest.raises(WorkerError) as caught:
        with thread_worker(app, start_timeout=WAIT, stop_timeout=2):
            spin.delay()
            assert running.wait(WAIT), "the spinning task never started"
            started = time.monotonic()
    took = time.monotonic() - started
    message = str(caught.value)
    assert "still busy" in message and "infinite loop" in message, message
    assert took < 6, f"stopping a worker with a runaway task took {took:.1f} s"
    (thread,) = runner
    thread.join(WAIT)
    assert not thread.is_alive(), "the thread running the endless task is still alive"


# --- the process worker -------------------------------------------------------------


def test_process_worker_round_trip_then_kill_leaves_no_process(url, make_app, tmp_path):
    (tmp_path / "probe_tasks.py").write_text(PROBE_MODULE)
    client = make_app("probe_client")
    with process_worker("probe_tasks", tmp_path, concurrency=1, start_timeout=30) as worker:
        assert worker.process.poll() is None
        assert client.send_task("probe_tasks.add", (2, 3)).get(timeout=WAIT) == 5
        pool_pid = client.send_task("probe_tasks.whoami").get(timeout=WAIT)
        assert pool_pid != worker.pid, "prefork should run the task in a pool child process"
        assert process_state(pool_pid)[1] == worker.pid, "the task's process is not a child of the worker"
        group = process_group(worker.pid)
        assert worker.pid in group and pool_pid in group
        worker.kill()
        assert worker.process.returncode == -signal.SIGKILL
        assert not is_alive(worker.pid)
    wait_until(lambda: not any(is_alive(pid) for pid in group), WAIT, f"timed out waiting for the worker's processes {group} to end")
    assert process_group(worker.pid) == []
    assert "ready." in worker.log


def test_process_worker_exit_stops_the_worker_and_its_pool(url, make_app, tmp_path):
    (tmp_path / "probe_tasks.py").write_text(PROBE_MODULE)
    client = make_app("probe_client")
    with process_worker("probe_tasks", tmp_path, concurrency=1, start_timeout=30, stop_timeout=WAIT) as worker:
        pool_pid = client.send_task("probe_tasks.whoami").get(timeout=WAIT)
        group = process_group(worker.pid)
        assert {worker.pid, pool_pid} <= set(group)
    assert worker.process.returncode is not None
    wait_until(lambda: not any(is_alive(pid) for pid in group), WAIT, f"timed out waiting for the worker's processes {group} to end")
    assert process_group(worker.pid) == []


def test_process_worker_with_a_broken_module_fails_fast(url, tmp_path):
    (tmp_path / "broken_tasks.py").write_text(
        textwrap.dedent(
            """
            import os
            from celery import Celery
            import no_such_module_for_labkit
            app = Celery("broken_tasks", broker=os.environ["REDIS_URL"])
            """
        )
    )
    started = time.monotonic()
    with pytest.raises(WorkerError) as caught:
        with process_worker("broken_tasks", tmp_path, start_timeout=30):
            pytest.fail("a worker whose module cannot be imported must not start")
    took = time.monotonic() - started
    message = str(caught.value)
    assert "celery -A broken_tasks worker" in message and "exited" in message, message
    assert "no_such_module_for_labkit" in message, message
    assert took < 15, f"the import error was reported after {took:.1f} s"


def test_process_worker_stops_fast_and_a_warm_stop_is_bounded(url, make_app, tmp_path, capsys):
    """The default stop (a kill: nothing after the check needs a shutdown) takes well under 0.5 s;
    a warm shutdown lets the running task finish and is bounded by its timeout."""
    (tmp_path / "probe_tasks.py").write_text(PROBE_MODULE)
    client = make_app("probe_client")
    with process_worker("probe_tasks", tmp_path, concurrency=1, start_timeout=30) as worker:
        assert client.send_task("probe_tasks.add", (1, 1)).get(timeout=WAIT) == 2
        started = time.monotonic()
    killed = time.monotonic() - started
    with process_worker("probe_tasks", tmp_path, concurrency=1, start_timeout=30) as worker:
        assert client.send_task("probe_tasks.add", (1, 1)).get(timeout=WAIT) == 2
        warm = worker.stop_warm(timeout=WAIT)
        assert worker.returncode == 0, f"a warm shutdown should exit 0, got {worker.returncode}:\n{worker.tail()}"
    with capsys.disabled():
        print(f"\n  process worker stop: kill {killed:.2f} s, warm shutdown (idle prefork, 1 slot) {warm:.2f} s")
    assert killed < 0.5, f"the default stop took {killed:.2f} s"
    assert warm < WAIT, f"the warm stop took {warm:.2f} s"
