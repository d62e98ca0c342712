"""Quick feedback for ``watch``: a warm grader, and a fresh broker ready before each save.

A cold grade starts Python, imports pytest, Celery, kombu, redis-py, FastAPI... (1.5-2 s
on 2 cores) and starts an embedded broker (0.5 s) before its first check runs. In watch
mode both are ready before the learner saves:

- **The warm grader** is one long-lived child process (``python -m labkit.warm``) that
  has imported those libraries once, and nothing of the course: no lesson, no test
  file, no labkit module but this one and ``labkit.procs``. It starts no thread. For
  each grade it forks. The forked child is a copy of that pristine interpreter: it
  takes the grade's directory, environment and log file, runs ``pytest.main(...)``
  with the grade's arguments, and exits. Whatever a grade imports, registers or
  changes (lesson modules, Celery apps and tasks, even an attribute set on an imported
  library) existed only in that child, so the next grade cannot see it. A grade that
  runs too long is killed, with its process group, and the warm grader carries on.
- **A fresh broker per grade**: an embedded broker started right after the previous
  grade (while the learner reads and types), used by one grade, then stopped. A grade
  sees no key, no connection and no queue of an earlier one; a process an earlier grade
  left behind only knows a port where nobody listens any more.

``WarmSession`` holds both; ``grade()`` hands the grader to ``labkit.grade.grade_course``
as its way to run pytest. If the warm grader dies, that grade runs the cold way (a fresh
``python -m pytest``) after a one-line note, and a new warm grader is started for the
next one.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from labkit.procs import ChildProcess, ProcessError, accepts_connections, die_with_parent, free_port

if TYPE_CHECKING:
    from labkit.grade import LessonResult

READY = "labkit warm grader: ready"
HERE = Path(__file__).resolve().parent.parent  # the course whose labkit this is (labkit.manifest.ROOT)
COURSE_FOLDERS = ("lessons", "solutions", "tests", "notebooks")

# What a grade imports that takes time, imported once by the warm grader. Libraries
# only: nothing here may read the course, start a thread or create a Celery app.
# (Measured: a grade of lessons 01-04 imports ~1200 modules; after these, it imports
# ~20 more besides the course's own: pytest's small helpers, readline.)
PRELOAD = (
    "pytest",
    *(f"_pytest.{name}" for name in (
        "mark", "main", "runner", "fixtures", "helpconfig", "python", "terminal", "debugging", "unittest",
        "capture", "skipping", "legacypath", "tmpdir", "monkeypatch", "recwarn", "pastebin", "assertion",
        "junitxml", "doctest", "cacheprovider", "setuponly", "setupplan", "stepwise", "unraisableexception",
        "threadexception", "warnings", "logging", "reports", "faulthandler", "subtests",
    )),  # fmt: skip
    "celery", "celery.app.base", "celery.app.amqp", "celery.app.control", "celery.app.events", "celery.app.log",
    "celery.app.builtins", "celery.app.trace", "celery.app.task", "celery.app.registry", "celery.app.routes",
    "celery.backends.redis", "celery.result", "celery.canvas", "celery.signals", "celery.exceptions",
    "celery.loaders.app", "celery.fixups.django", "celery.contrib.testing.worker", "celery.worker",
    "celery.worker.components", "celery.worker.autoscale", "celery.worker.consumer", "celery.worker.control",
    "celery.worker.request", "celery.worker.strategy", "celery.worker.pidbox", "celery.worker.heartbeat",
    "celery.concurrency.solo", "celery.concurrency.thread", "celery.events.receiver",
    "kombu", "kombu.transport.redis", "kombu.asynchronous.hub", "kombu.pidbox",
    "redis", "redis.asyncio",
    "fakeredis",
    "celery.worker.consumer.delayed_delivery", "billiard.pool",
    "httpx", "httpcore", "h11", "certifi", "encodings.idna", "anyio", "anyio._backends._asyncio", "anyio.from_thread",
    "pydantic", "pydantic.v1",
    "fastapi", "fastapi.testclient", "starlette.testclient",
    "aiosmtpd.controller", "smtplib", "email.message", "email.policy",
    "concurrent.futures.thread", "asyncio", "uuid", "json", "tomllib", "pdb", "faulthandler",
    # plugins pytest loads from their entry points (see _let_preloaded_modules_be)
    "pytest_timeout", "anyio.pytest_plugin", "platformdirs.pytest_plugin",
)  # fmt: skip


class WarmGraderError(RuntimeError):
    """The warm grader is gone, or did not answer: grade the cold way."""


# --- the warm grader's own process ------------------------------------------------------


def preload(names: tuple[str, ...] = PRELOAD) -> None:
    """Import the libraries; one that fails to import is left for the grade to fail on."""
    with warnings.catch_warnings():  # e.g. Starlette's warning about httpx: a check decides about warnings
        warnings.simplefilter("ignore")
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the same import fails again, visibly, in the grade
                pass


def course_modules() -> list[str]:
    """Modules loaded from the course's folders (labkit's, the lessons', the tests'), but the warm grader's own."""
    own = {"__main__", "__mp_main__", "labkit", "labkit.procs", "labkit.warm"}  # __mp_main__: billiard's alias
    places = {root / folder for root in (Path.cwd().resolve(), HERE) for folder in ("labkit", *COURSE_FOLDERS)}
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name not in own and file and any(place in Path(file).resolve().parents for place in places):
            found.append(name)
    return sorted(found)


def serve(path: str) -> None:
    """Preload, then answer grade requests on the Unix socket ``path``, one at a time, for ever."""
    preload()
    if threading.active_count() != 1:  # a fork copies only the thread that forks
        names = ", ".join(t.name for t in threading.enumerate())
        sys.exit(f"labkit warm grader: importing the libraries started threads ({names}); it cannot fork safely")
    course = course_modules()
    if course:
        sys.exit(f"labkit warm grader: the libraries imported modules of the course ({', '.join(course)}); refusing to run")
    gc.collect()
    gc.freeze()  # what is here now stays: the grades' garbage collections need not look at it
    preloaded = frozenset(sys.modules)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    print(READY, flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            line = _read_line(conn)
            if not line:
                continue
            answer = _grade(json.loads(line), listener, conn, preloaded)
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass  # the grader went away; the next request may come from a new one


def _grade(request: dict, listener: socket.socket, conn: socket.socket, preloaded: frozenset[str]) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the grade: never returns
        code = 70
        try:
            listener.close()
            conn.close()
            code = _run_pytest(request, preloaded)
        except BaseException:  # noqa: BLE001 - into the grade's log, if it got that far
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # the child does it too: whichever runs first
    except OSError:
        pass
    pidfd = os.pidfd_open(pid)
    try:
        ended = bool(select.select([pidfd], [], [], request["timeout"])[0])
    finally:
        os.close(pidfd)
    _kill_group(pid)  # on a timeout, the grade; in any case whatever it left in its group
    _, status = os.waitpid(pid, 0)
    _kill_group(pid)
    return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": not ended}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_pytest(request: dict, preloaded: frozenset[str]) -> int:
    """In the forked child: become the grade's ``python -m pytest ARGS`` and run it."""
    os.setpgid(0, 0)  # its own process group: a timeout kills the grade and what it started
    die_with_parent()  # and the grade ends if the warm grader is killed
    cwd = request["cwd"]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.dont_write_bytecode = bool(request["env"].get("PYTHONDONTWRITEBYTECODE"))
    sys.path[0] = cwd  # what `python -m pytest` run in cwd has first
    out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = sys.__stdout__ = _text(1)
    sys.stderr = sys.__stderr__ = _text(2)
    sys.argv = ["pytest", *request["args"]]
    _let_preloaded_modules_be(preloaded)
    import pytest

    code = int(pytest.main(request["args"]))
    atexit._run_exitfuncs()  # as at the end of a `python -m pytest`
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _text(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True)


def _let_preloaded_modules_be(preloaded: frozenset[str]) -> None:
    """Keep pytest from warning that a library it would assert-rewrite was imported before it.

    pytest marks the packages of its plugins' distributions (anyio, platformdirs, pytest_timeout) for
    assert rewriting, and warns, an error under ``filterwarnings = error``, when one is
    already imported. Only those libraries' own asserts are at stake, never a check's:
    test files are imported by the grade, and rewritten as always.
    """
    from _pytest.assertion.rewrite import AssertionRewritingHook

    warn = AssertionRewritingHook._warn_already_imported

    def warn_unless_preloaded(self, name: str) -> None:
        if name not in preloaded:
            warn(self, name)

    AssertionRewritingHook._warn_already_imported = warn_unless_preloaded


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


# --- the grader's side -----------------------------------------------------------------


class WarmGrader:
    """The warm grader process: ``run(args, cwd, log, env, timeout)`` is one ``python -m pytest ARGS``."""

    def __init__(self, root: Path = HERE, start_timeout: float = 60.0) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="labkit-warm-")
        self.socket_path = os.path.join(self._folder.name, "grader.sock")
        self.child = ChildProcess(
            [sys.executable, "-m", "labkit.warm", "--socket", self.socket_path],
            name="warm grader",
            ready=READY,
            cwd=root,
            env={"PYTHONPATH": str(HERE)},  # labkit itself comes from this course, as in grade._run
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
                line = _read_line(conn)
        except OSError as exc:
            raise WarmGraderError(f"{type(exc).__name__}: {exc}") from None
        if not line:
            raise WarmGraderError("it ended while grading")
        answer = json.loads(line)
        return answer["returncode"], answer["timed_out"]


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
            env={"PYTHONPATH": str(HERE)},
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

        with WarmSession(root) as warm:
            (result,) = warm.grade(("01_first_task",))   # like grade_course(...), quicker
            ...                                          # show it
            warm.prepare()                               # then get ready for the next save
    """

    def __init__(
        self, root: Path = HERE, note: Callable[[str], None] = _stderr_note, timeout: float | None = None, restarts: int = 2
    ) -> None:
        from labkit.grade import RUN_TIMEOUT

        self.root = root
        self.note = note
        self.timeout = RUN_TIMEOUT if timeout is None else timeout
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

    def grade(self, keys: tuple[str, ...] = (), target: str = "lessons", root: Path | None = None) -> list[LessonResult]:
        """``grade_course(keys, target, root=root)`` on a fresh embedded broker, through the warm grader."""
        from labkit.grade import grade_course

        with self.brokers.fresh() as url:
            return grade_course(keys, target=target, broker_url=url, root=root or self.root, run=self.run)

    def run(self, command: list[str], root: Path, log: Path) -> str:
        """``labkit.grade._run``, in the warm grader when it can."""
        from labkit.grade import ROOT, _run

        if self.grader is not None and command[1:3] == ["-m", "pytest"]:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as _run gives the pytest subprocess
            try:
                returncode, timed_out = self.grader.run(command[3:], root, log, env, self.timeout)
            except WarmGraderError as exc:
                self.note(f"(the warm grader stopped: {exc}; grading the slow way)")
                self.grader.stop()
                self.grader = None
            else:
                return problem(returncode, timed_out, log, self.timeout)
        return _run(command, root, log)

    def close(self) -> None:
        self.brokers.close()
        if self.grader is not None:
            self.grader.stop()
            self.grader = None

    def __enter__(self) -> WarmSession:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def problem(returncode: int, timed_out: bool, log: Path, timeout: float) -> str:
    """What went wrong with a grading run, worded as ``labkit.grade._run`` words it ('' when nothing)."""
    if timed_out:
        return f"the grading run was stopped after {timeout:.0f} s"
    if returncode in (0, 1):  # all passed / some checks failed
        return ""
    with log.open("rb") as out:
        out.seek(max(0, log.stat().st_size - 2000))
        tail = out.read().decode("utf-8", "replace").strip().splitlines()[-3:]
    return f"the grading run ended early (exit {returncode}): " + " ".join(tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labkit.warm", description="The warm grader (started by watch).")
    parser.add_argument("--socket", required=True, help="the Unix socket to take grade requests on")
    serve(parser.parse_args(argv).socket)


if __name__ == "__main__":
    main()
