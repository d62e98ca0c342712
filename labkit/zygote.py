"""The warm grader's own process (``python -m labkit.zygote``), which ``labkit.warm`` starts.

It imports the libraries a grade uses once (``PRELOAD``), and nothing of the course,
and starts no thread. Then it forks on request, from a pristine copy of itself:

- a grade: the child becomes ``python -m pytest ARGS`` in the grade's directory, with
  its environment, ``sys.path`` and log file, runs it and exits;
- a process a grade starts as ``python -m MODULE ARGS`` (uvicorn, a celery worker): the
  child becomes that command, with the output pipe, directory and environment
  ``subprocess.Popen`` would give it, in a session of its own.

Requests are JSON lines on a Unix socket (``labkit.warm`` sends them). See ``Zygote``.
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
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from labkit.procs import die_with_parent

READY = "labkit warm grader: ready"
SOCKET_VARIABLE = "LABKIT_WARM_SOCKET"  # set in a warm grade: where its `python -m ...` processes are forked
GRADE_VARIABLE = "LABKIT_WARM_GRADE"  # set in a warm grade: its pid, which those processes belong to
HERE = Path(__file__).resolve().parent.parent  # where this labkit lives (labkit.settings.LABKIT_HOME)
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
    own = {"__main__", "__mp_main__", "labkit", "labkit.procs", "labkit.zygote"}  # __mp_main__: billiard's alias
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


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labkit.zygote", description="The warm grader (started by watch).")
    parser.add_argument("--socket", required=True, help="the Unix socket to take requests on")
    serve(parser.parse_args(argv).socket)


if __name__ == "__main__":
    main()
