"""Child processes for checks and notebooks: one way to start, watch and stop them.

    with ChildProcess(["celery", "-A", "tasks", "worker"], name="worker", ready="ready.") as worker:
        ...                         # worker.pid, worker.log, worker.alive
    # stopped here: SIGTERM, then SIGKILL after a bound; log pipe closed

Every process the harness starts (the embedded broker, ``celery worker``,
``celery beat``, Flower, uvicorn) goes through ``ChildProcess``, so each one:

- dies with its parent (the kernel kills it if the test run is killed);
- has its output read on a thread, into a bounded log, so a chatty child never
  blocks on a full pipe;
- is waited for until ready, with a deadline, and fails with its last lines;
- is stopped for sure: a signal, a bounded wait, then SIGKILL to its whole
  process group (a prefork worker's pool processes included).

Notebooks use it too: ``ChildProcess(...).start()`` without ``with``, and
``stop()`` in the last cell (``atexit`` stops it if the kernel exits first).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

ReadyTest = Callable[["ChildProcess"], bool]


class ProcessError(RuntimeError):
    """A child process could not start; the message says why, with its last lines of output."""


def die_with_parent() -> None:  # runs in the child, before exec
    """Have the kernel SIGKILL this child when its parent goes, so nothing outlives a killed run.

    Linux ties this to the parent *thread* that started the child: start children from a
    thread that lives as long as they should (the main thread, in tests).
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it; it is free once closed)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def port_open(port: int, host: str = "127.0.0.1") -> ReadyTest:
    """A readiness test: the child accepts TCP connections on ``port``."""
    return lambda _child: accepts_connections(port, host)


def log_says(text: str) -> ReadyTest:
    """A readiness test: the child has printed a line containing ``text``."""
    return lambda child: text in child.log


def _warm_spawn(command: list[str], cwd: Path | str | None, env: dict[str, str]):
    """In a grade run by ``watch``'s warm grader: a ``python -m`` command forked from it (labkit/warm.py)."""
    if not os.environ.get("LABKIT_WARM_SOCKET"):
        return None
    from labkit.warm import spawn

    return spawn(command, cwd, env)


class ChildProcess:
    """One child process: started, logged, waited for, and always stopped."""

    def __init__(
        self,
        command: Iterable[str],
        *,
        name: str,
        ready: ReadyTest | str | None = None,
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 5.0,
        log_lines: int = 2000,
    ) -> None:
        self.command = [str(part) for part in command]
        self.name = name
        self._ready = log_says(ready) if isinstance(ready, str) else ready
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.start_timeout = start_timeout
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self._log: deque[str] = deque(maxlen=log_lines)
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    # -- what a check reads -------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def log(self) -> str:
        return "".join(self._log)

    def tail(self, lines: int = 12) -> str:
        return "".join(list(self._log)[-lines:])

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> ChildProcess:
        """Start the process and wait until it is ready; raise ProcessError if it never is."""
        self.process = _warm_spawn(self.command, self.cwd, self.env) or subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stopping it stops its children too
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._collect, name=f"labkit-log-{self.name}", daemon=True)
        self._reader.start()
        atexit.register(self.stop)  # a notebook kernel that exits early still stops it
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _collect(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._log.append(line)

    def wait_ready(self) -> None:
        if self._ready is None:
            return
        deadline = time.monotonic() + self.start_timeout
        while not self._ready(self):
            if not self.alive:
                assert self._reader is not None
                self._reader.join(1)  # the last lines of a process that exited
                raise ProcessError(f"`{self.shown}` exited (code {self.returncode}). Its last lines:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"`{self.shown}` was not ready within {self.start_timeout:g} s. Its last lines:\n{self.tail()}"
                )
            time.sleep(0.02)

    @property
    def shown(self) -> str:
        """The command as a person would type it."""
        parts = self.command[2:] if self.command[1:2] == ["-m"] else self.command  # python -m celery -> celery
        return " ".join(parts)

    # -- stop -----------------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group): e.g. SIGTERM for a warm shutdown."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process and everything in its group, as a crash or an OOM kill would."""
        self._kill_group()
        if self.process is not None:
            self.process.wait(10)

    def wait(self, timeout: float, while_waiting: Callable[[], None] | None = None) -> bool:
        """Wait up to ``timeout`` s for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            if while_waiting is not None:
                while_waiting()
            time.sleep(0.02)
        return not self.alive

    def stop(self, timeout: float | None = None, while_waiting: Callable[[], None] | None = None) -> float:
        """Stop it: ``stop_signal``, wait up to ``timeout`` s, then SIGKILL the group. Returns seconds taken.

        ``stop_signal=signal.SIGKILL`` skips the wait: the fastest stop, for a
        process whose shutdown nothing needs to see.
        """
        started = time.monotonic()
        if self.process is None:
            return 0.0
        atexit.unregister(self.stop)
        if self.alive and self.stop_signal != signal.SIGKILL:
            self.signal(self.stop_signal)
            self.wait(self.stop_timeout if timeout is None else timeout, while_waiting)
        self._kill_group()  # whatever is left, children included
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return time.monotonic() - started

    def _kill_group(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
