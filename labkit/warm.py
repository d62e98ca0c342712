"""Quick feedback for ``watch``: a warm grader, and a fresh broker ready before each save.

A cold grade starts Python, imports pytest, Celery, kombu, redis-py, FastAPI... (1.5-2 s
on 2 cores) and starts an embedded broker (0.5 s) before its first check runs; each
uvicorn server or ``celery worker`` it starts is one more Python importing it all again
(1-3 s). In watch mode all of that is ready before the learner saves:

- **The warm grader** is one long-lived child process (``python -m labkit.warm``) that
  has imported those libraries once, and nothing of the course: no lesson, no test
  file, no labkit module but this one and ``labkit.procs`` (and a grade imports even
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

import argparse
import atexit
import gc
import importlib
import io
import json
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
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
SOCKET_VARIABLE = "LABKIT_WARM_SOCKET"  # set in a warm grade: where its `python -m ...` processes are forked
GRADE_VARIABLE = "LABKIT_WARM_GRADE"  # set in a warm grade: its pid, which those processes belong to
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
    # what `python -m uvicorn` and `python -m celery` import (forked by spawn)
    "runpy", "logging.config", "uvicorn.main", "uvicorn.server", "uvicorn.lifespan.on", "uvicorn.loops.auto",
    "uvicorn.loops.asyncio", "uvicorn.protocols.http.auto", "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto", "uvicorn.middleware.proxy_headers", "uvicorn.supervisors",
    "celery.bin.celery", "celery.apps.worker", "celery.apps.beat", "celery.concurrency.prefork",
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
    folders = [root / folder for root in (Path.cwd(), HERE) for folder in ("labkit", *COURSE_FOLDERS)]
    places = tuple({str(place) + os.sep for folder in folders for place in (folder, folder.resolve())})
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name not in own and file and os.path.abspath(file).startswith(places):
            found.append(name)
    return sorted(found)


def serve(path: str) -> None:
    """Preload, then answer requests on the Unix socket ``path`` for ever (see ``Zygote``)."""
    base_path = _base_path()
    preload()
    if threading.active_count() != 1:  # a fork copies only the thread that forks
        names = ", ".join(t.name for t in threading.enumerate())
        sys.exit(f"labkit warm grader: importing the libraries started threads ({names}); it cannot fork safely")
    course = course_modules()
    if course:
        sys.exit(f"labkit warm grader: the libraries imported modules of the course ({', '.join(course)}); refusing to run")
    gc.collect()
    gc.freeze()  # what is here now stays: the grades' garbage collections need not look at it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(READY, flush=True)
    Zygote(listener, path, frozenset(sys.modules), base_path).run()


class Zygote:
    """The warm grader's loop. It forks, on request:

    - a grade (``{"args": ...}``, from ``WarmGrader.run``): pytest, answered with its exit code
      when it ends, or killed after its timeout;
    - a process a grade starts (``{"kind": "spawn"}``, from ``spawn`` through
      ``labkit.procs.ChildProcess``): ``python -m uvicorn ...`` or ``python -m celery ...``
      runs in a fork of this process instead of a new Python. It lives while the grade holds
      the request's connection and at most as long as the grade, and its exit code is sent on
      that connection.
    """

    def __init__(self, listener: socket.socket, path: str, preloaded: frozenset[str], base_path: list[str]) -> None:
        self.listener, self.path, self.preloaded, self.base_path = listener, path, preloaded, base_path
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, ("accept", 0))
        self.grades: dict[int, dict] = {}  # pid -> conn, pidfd, deadline, spawned pids
        self.spawned: dict[int, dict] = {}  # pid -> conn (None once answered), pidfd

    def run(self) -> None:
        while True:
            deadlines = [grade["deadline"] for grade in self.grades.values()]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(timeout):
                kind, pid = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "grade" and pid in self.grades:
                    self._end_grade(pid, timed_out=False)
                elif kind == "spawned" and pid in self.spawned:
                    self._end_spawned(pid)
                elif kind == "holder" and pid in self.spawned:
                    self._let_go(pid)
            for pid, grade in list(self.grades.items()):
                if time.monotonic() >= grade["deadline"]:
                    self._end_grade(pid, timed_out=True)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            line, fds = _receive(conn)
            request = json.loads(line)
        except (OSError, ValueError):
            conn.close()
            return
        if request.get("kind") == "spawn" and len(fds) == 1:
            self._spawn(request, conn, fds[0])
            return
        for fd in fds:
            os.close(fd)
        self._grade(request, conn)

    def _fork(self, *also_close: socket.socket) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child keeps nothing of the loop: no socket, no pidfd
            self.selector.close()
            self.listener.close()
            for entry in (*self.grades.values(), *self.spawned.values()):
                if entry["conn"] is not None:
                    entry["conn"].close()
                os.close(entry["pidfd"])
            for conn in also_close:
                conn.close()
        return pid

    def _grade(self, request: dict, conn: socket.socket) -> None:
        pid = self._fork(conn)
        if pid == 0:  # the grade: never returns
            code = 70
            try:
                code = _run_pytest(request, self.preloaded, self.base_path, self.path)
            except BaseException:  # noqa: BLE001 - into the grade's log, if it got that far
                traceback.print_exc()
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # the child does it too: whichever runs first
        except OSError:
            pass
        pidfd = os.pidfd_open(pid)
        self.selector.register(pidfd, selectors.EVENT_READ, ("grade", pid))
        deadline = time.monotonic() + request["timeout"]
        self.grades[pid] = {"conn": conn, "pidfd": pidfd, "deadline": deadline, "spawned": set()}

    def _end_grade(self, pid: int, timed_out: bool) -> None:
        grade = self.grades.pop(pid)
        self.selector.unregister(grade["pidfd"])
        _kill_group(pid)  # on a timeout, the grade; in any case whatever it left in its group
        for child in grade["spawned"]:
            _kill_group(child, reaped=child not in self.spawned)  # and the processes it asked for
        _, status = os.waitpid(pid, 0)
        os.close(grade["pidfd"])
        _kill_group(pid, reaped=True)
        answer = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        _answer(grade["conn"], answer)
        grade["conn"].close()

    def _spawn(self, request: dict, conn: socket.socket, output: int) -> None:
        pid = self._fork(conn)
        if pid == 0:  # `python -m MODULE ARGS`: never returns
            code = 1
            try:
                code = _run_module(request, output, self.base_path)
            except BaseException:  # noqa: BLE001 - as Python prints an uncaught exception
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(output)
        pidfd = os.pidfd_open(pid)
        self.spawned[pid] = {"conn": conn, "pidfd": pidfd}
        if request.get("grade") in self.grades:
            self.grades[request["grade"]]["spawned"].add(pid)
        self.selector.register(pidfd, selectors.EVENT_READ, ("spawned", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("holder", pid))
        _answer(conn, {"pid": pid})

    def _end_spawned(self, pid: int) -> None:
        entry = self.spawned.pop(pid)
        self.selector.unregister(entry["pidfd"])
        _, status = os.waitpid(pid, 0)
        os.close(entry["pidfd"])
        if entry["conn"] is not None:
            self.selector.unregister(entry["conn"])
            _answer(entry["conn"], {"returncode": os.waitstatus_to_exitcode(status)})
            entry["conn"].close()

    def _let_go(self, pid: int) -> None:
        """The grade closed the connection (or ended): the process goes too, as a child of a dead parent would."""
        entry = self.spawned[pid]
        self.selector.unregister(entry["conn"])
        entry["conn"].close()
        entry["conn"] = None
        _kill_group(pid)


def _answer(conn: socket.socket, answer: dict) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass  # the asker went away


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request line, and the file descriptors sent with it."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, received, _, _ = socket.recv_fds(conn, 65536, 1)
        fds += received
        if not chunk:
            raise OSError("the connection closed mid-request")
        data += chunk
    return data, fds


def _kill_group(pid: int, reaped: bool = False) -> None:
    """SIGKILL the process group ``pid`` and, while it is not reaped (its pid cannot be reused), the process."""
    for kill in (os.killpg,) if reaped else (os.killpg, os.kill):  # the process: if it has not made its group yet
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _base_path() -> list[str]:
    """sys.path without what `python -m` and PYTHONPATH put in front: the interpreter's own part."""
    given = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    rest = list(sys.path[1:])
    for entry in given:
        if entry in rest:
            rest.remove(entry)
    return rest


def _become(cwd: str, env: dict[str, str], base_path: list[str]) -> None:
    """Take the directory, environment and sys.path a new `python -m ...` started there would have."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    given = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    sys.path[:] = [os.getcwd(), *given, *base_path]
    for name in [name for name in sys.modules if name == "labkit" or name.startswith("labkit.")]:
        del sys.modules[name]  # the warm grader's own few: labkit comes from this sys.path, as in a new Python


def _run_pytest(request: dict, preloaded: frozenset[str], base_path: list[str], socket_path: str) -> int:
    """In the forked child: become the grade's ``python -m pytest ARGS`` and run it."""
    os.setpgid(0, 0)  # its own process group: a timeout kills the grade and what it started
    die_with_parent()  # and the grade ends if the warm grader is killed
    _become(request["cwd"], request["env"], base_path)
    os.environ[SOCKET_VARIABLE] = socket_path  # its `python -m` processes: forks of the warm grader too
    os.environ[GRADE_VARIABLE] = str(os.getpid())
    out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = sys.__stdout__ = _text(1)
    sys.stderr = sys.__stderr__ = _text(2)
    import pytest

    sys.argv = [os.path.join(os.path.dirname(pytest.__file__), "__main__.py"), *request["args"]]  # as `python -m pytest`
    _let_preloaded_modules_be(preloaded)

    code = int(pytest.main(request["args"]))
    atexit._run_exitfuncs()  # as at the end of a `python -m pytest`
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _run_module(request: dict, output: int, base_path: list[str]) -> int:
    """In the forked child: become ``python -m MODULE ARGS`` (``request["argv"]``) and run it."""
    os.setsid()  # its own session and group, as ChildProcess starts every process
    die_with_parent()
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _become(request["cwd"], request["env"], base_path)
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = sys.__stdout__ = _text(1, unbuffered)
    sys.stderr = sys.__stderr__ = _text(2, True)
    module, *args = request["argv"]
    sys.argv = [module, *args]  # run_module puts the module's file first, as `python -m` does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:  # as the interpreter reads sys.exit(...)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    threading._shutdown()  # then as Python ends: wait for threads, run atexit, flush
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _text(fd: int, unbuffered: bool = True) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=unbuffered, line_buffering=not unbuffered
    )


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
