"""Quick feedback for ``watch``: a warm grader, and a fresh broker ready before each save.

A cold grade starts Python, imports pytest, Celery, kombu, redis-py, FastAPI... (1.5-2 s
on 2 cores) and starts an embedded broker (0.5 s) before its first check runs; each
uvicorn server or ``celery worker`` it starts is one more Python importing it all again
(1-3 s). In watch mode all of that is ready before the learner saves:

- **The warm grader** is one long-lived child process (``python -m labkit.zygote``) that
  has imported those libraries once, and nothing of the course: no lesson, no test
  file, no labkit module but ``labkit.zygote`` and ``labkit.procs`` (and a grade imports even
  those afresh). It starts no thread. For each grade it forks. The forked child is a
  copy of that pristine interpreter: it takes the grade's directory, environment,
  ``sys.path`` and log file, runs ``pytest.main(...)`` with the grade's arguments, and
  exits. Whatever a grade imports, registers or changes (lesson modules, Celery apps
  and tasks, even an attribute set on an imported library) existed only in that child,
  so the next grade cannot see it. A grade that runs too long is killed, with its
  process group and the processes it started, and the warm grader carries on.
- **The processes a grade starts** with ``labkit.procs.ChildProcess`` as ``python -m
  ...`` (``uvicorn api1:app``, ``celery -A tasks worker``) are forks of the warm grader
  too (``spawn``): same arguments, directory, environment, own session and output
  pipe as ``subprocess.Popen`` gives, started in a tenth of a second. Each is killed
  when the grade lets go of it or ends.
- **A fresh broker per grade**: an embedded broker started right after the previous
  grade (while the learner reads and types), used by one grade, then stopped. A grade
  sees no key, no connection and no queue of an earlier one; a process an earlier grade
  left behind only knows a port where nobody listens any more.

``WarmSession`` holds the grader and the brokers; ``grade()`` hands ``labkit.grade.grade_course``
its way to run pytest. If the warm grader dies, that grade runs the cold way (a fresh
``python -m pytest``) after a one-line note, and a new warm grader is started for the
next one. ``tests/labkit/test_warm.py`` checks the isolation.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from labkit.procs import ChildProcess, ProcessError, accepts_connections, free_port
from labkit.settings import LABKIT_HOME, Settings
from labkit.zygote import GRADE_VARIABLE, READY, SOCKET_VARIABLE, read_line

if TYPE_CHECKING:
    from labkit.grade import LessonResult


class WarmGraderError(RuntimeError):
    """The warm grader is gone, or did not answer: grade the cold way."""


class WarmGrader:
    """The warm grader process: ``run(args, cwd, log, env, timeout)`` is one ``python -m pytest ARGS``."""

    def __init__(self, root: Path, start_timeout: float = 60.0) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="labkit-warm-")
        self.socket_path = os.path.join(self._folder.name, "grader.sock")
        self.child = ChildProcess(
            [sys.executable, "-m", "labkit.zygote", "--socket", self.socket_path],
            name="warm grader",
            ready=READY,
            cwd=root,
            env={"PYTHONPATH": str(LABKIT_HOME)},  # this very labkit, as in grade._run
            start_timeout=start_timeout,
            stop_signal=signal.SIGKILL,  # a grade in progress dies with it (die_with_parent)
        )

    @property
    def alive(self) -> bool:
        return self.child.alive

    @property
    def pid(self) -> int:
        return self.child.pid

    def start(self) -> WarmGrader:
        try:
            self.child.start()
        except BaseException:
            self._folder.cleanup()
            raise
        return self

    def stop(self) -> None:
        self.child.stop()
        self._folder.cleanup()

    def run(self, args: list[str], cwd: Path, log: Path, env: dict[str, str], timeout: float) -> tuple[int, bool]:
        """Run pytest with ``args`` in a fork; return (its exit code, whether the timeout killed it)."""
        if not self.alive:
            raise WarmGraderError(f"it exited (code {self.child.returncode}) {self.child.tail(3).strip()}".strip())
        request = {"args": args, "cwd": str(cwd), "log": str(log), "env": env, "timeout": timeout}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(self.socket_path)
                conn.sendall(json.dumps(request).encode() + b"\n")
                conn.settimeout(timeout + 30)  # it kills the grade after `timeout`, then answers
                line = read_line(conn)
        except OSError as exc:
            raise WarmGraderError(f"{type(exc).__name__}: {exc}") from None
        if not line:
            raise WarmGraderError("it ended while grading")
        answer = json.loads(line)
        return answer["returncode"], answer["timed_out"]


def spawn(command: list[str], cwd: Path | str | None, env: dict[str, str]) -> WarmProcess | None:
    """In a warm grade: start ``python -m MODULE ARGS`` as a fork of the warm grader.

    None when this is no warm grade, or the command is not ``python -m``: start it as usual.
    ``labkit.procs.ChildProcess`` asks here first, so a grade's uvicorn or celery worker
    starts in a tenth of a second instead of importing everything again. The process
    gets the same directory, environment, arguments, own session and output pipe as
    ``subprocess.Popen`` would give it; it is killed when the grade lets go of it or ends.
    """
    path = os.environ.get(SOCKET_VARIABLE)
    if not path or len(command) < 3 or command[:2] != [sys.executable, "-m"]:
        return None
    hidden = (SOCKET_VARIABLE, GRADE_VARIABLE)
    request = {
        "kind": "spawn",
        "argv": command[2:],
        "cwd": os.path.abspath(cwd or os.getcwd()),
        "env": {key: value for key, value in env.items() if key not in hidden},
        "grade": int(os.environ.get(GRADE_VARIABLE) or 0),
    }
    read_end, write_end = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10)
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [write_end])
        os.close(write_end)
        write_end = -1
        lines = _Lines(conn)
        pid = json.loads(lines.next(10) or b"null")["pid"]
    except (OSError, ValueError, TypeError, KeyError):
        conn.close()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        return None
    return WarmProcess(command, pid, read_end, lines)


class _Lines:
    """JSON lines from the warm grader on one connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buffer = conn, b""

    def next(self, timeout: float | None) -> bytes | None:
        """The next line; None if none came within ``timeout``; b"" when the connection ended."""
        while b"\n" not in self.buffer:
            if not select.select([self.conn], [], [], timeout)[0]:
                return None
            try:
                chunk = self.conn.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


class WarmProcess:
    """What ChildProcess uses of a ``subprocess.Popen``, for a process the warm grader forked.

    Its exit code comes on the connection it was asked for on; closing that connection
    (or ending the grade) has the warm grader kill it.
    """

    def __init__(self, args: list[str], pid: int, stdout: int, lines: _Lines) -> None:
        self.args, self.pid, self.returncode = args, pid, None
        self.stdout = open(stdout, encoding=None, errors="replace")  # text, as Popen(text=True, errors="replace")
        self._lines = lines
        self._lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)  # signals go to this very process, even if its pid is reused
        except ProcessLookupError:
            self._pidfd = None  # it has already ended and been reaped: its exit code is on the way

    def poll(self) -> int | None:
        return self._receive(0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._receive(None if deadline is None else max(0.0, deadline - time.monotonic())) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _receive(self, timeout: float | None) -> int | None:
        with self._lock:
            if self.returncode is None:
                line = self._lines.next(timeout)
                if line is not None:  # b"": the warm grader is gone, and the process with it
                    self.returncode = json.loads(line)["returncode"] if line else -signal.SIGKILL
                    self._lines.conn.close()
                    if self._pidfd is not None:
                        os.close(self._pidfd)
            return self.returncode

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if self.returncode is None and self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, signum)
                except ProcessLookupError:
                    pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class FreshBrokers:
    """An embedded broker for each grade, started before it is needed and stopped after."""

    def __init__(self, start_timeout: float = 20.0) -> None:
        self.start_timeout = start_timeout
        self._next: tuple[ChildProcess, int] | None = None

    def prepare(self) -> None:
        """Start the next grade's broker, without waiting for it (call it from a long-lived thread)."""
        if self._next is None:
            self._next = self._launch()

    @staticmethod
    def _launch() -> tuple[ChildProcess, int]:
        port = free_port()
        child = ChildProcess(
            [sys.executable, "-m", "labkit.broker", "--port", str(port)],
            name="embedded-broker",
            env={"PYTHONPATH": str(LABKIT_HOME)},
            stop_signal=signal.SIGKILL,  # nothing needs to see it stop
        )
        return child.start(), port  # no ready test: start() returns at once

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """A broker no grade has used yet, ready; its URL. Stopped on exit."""
        self.prepare()
        assert self._next is not None
        (child, port), self._next = self._next, None
        try:
            for attempt in (1, 2):
                deadline = time.monotonic() + self.start_timeout
                while not accepts_connections(port) and child.alive and time.monotonic() < deadline:
                    time.sleep(0.01)
                if accepts_connections(port):
                    break
                child.stop()
                if attempt == 2 or child.returncode is None:
                    raise RuntimeError(f"the embedded broker did not start: {child.tail().strip()}")
                child, port = self._launch()  # e.g. its port was taken before it could bind it
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            child.stop()

    def close(self) -> None:
        if self._next is not None:
            self._next[0].stop()
            self._next = None


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class WarmSession:
    """What ``watch`` keeps between grades: a warm grader, and the next grade's broker.

        with WarmSession(settings) as warm:
            (result,) = warm.grade(("01_first_task",))   # like grade_course(...), quicker
            ...                                          # show it
            warm.prepare()                               # then get ready for the next save
    """

    def __init__(self, settings: Settings, note: Callable[[str], None] = _stderr_note, restarts: int = 2) -> None:
        self.settings = settings
        self.root = settings.course
        self.note = note
        self.timeout = settings.grade_timeout
        self.restarts = restarts  # how many times a warm grader that died is started again
        self.grader: WarmGrader | None = None
        self.brokers = FreshBrokers()

    def start(self) -> WarmSession:
        self.brokers.prepare()  # starts while the grader imports
        self._start_grader()
        return self

    def _start_grader(self) -> None:
        try:
            self.grader = WarmGrader(self.root).start()
        except ProcessError as exc:
            self.grader = None
            self.note(f"(no warm grader, grading the slow way: {str(exc).strip().splitlines()[-1]})")

    def prepare(self) -> None:
        """Get ready for the next grade: its broker, and a new warm grader if the last one died."""
        self.brokers.prepare()
        if self.grader is None and self.restarts > 0:
            self.restarts -= 1
            self._start_grader()

    def grade(self, keys: tuple[str, ...] = (), target: str = "lessons", course: Path | None = None) -> list[LessonResult]:
        """``grade_course`` of ``keys`` (of this session's course, or ``course``) on a fresh
        embedded broker, through the warm grader."""
        from labkit.grade import grade_course

        with self.brokers.fresh() as url:
            settings = replace(self.settings, course=course or self.root, target=target, redis_url=url, grade_timeout=self.timeout)
            return grade_course(settings, keys, run=self.run)

    def run(self, command: list[str], root: Path, log: Path, timeout: float) -> str:
        """``labkit.grade._run``, in the warm grader when it can."""
        from labkit.grade import _run, run_problem

        if self.grader is not None and command[1:3] == ["-m", "pytest"]:
            env = {**os.environ, "PYTHONPATH": str(LABKIT_HOME)}  # as _run gives the pytest subprocess
            try:
                returncode, timed_out = self.grader.run(command[3:], root, log, env, timeout)
            except WarmGraderError as exc:
                self.note(f"(the warm grader stopped: {exc}; grading the slow way)")
                self.grader.stop()
                self.grader = None
            else:
                return run_problem(returncode, timed_out, log, timeout)
        return _run(command, root, log, timeout)

    def close(self) -> None:
        self.brokers.close()
        if self.grader is not None:
            self.grader.stop()
            self.grader = None

    def __enter__(self) -> WarmSession:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
