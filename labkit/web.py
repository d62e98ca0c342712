"""Web apps under test: a real uvicorn server, and requests that fail a check in one line.

A real server, ``python -m uvicorn module:app`` as a subprocess::

    with uvicorn_server("api1:app", cwd=lesson.folder(target)) as url:
        httpx.get(f"{url}/jobs/42")

The server runs in ``cwd`` (so it imports the lesson's modules as a student's
terminal would) with this process's environment (``REDIS_URL``) plus ``env``,
on 127.0.0.1 and a free port. It is ready when its port accepts connections,
which uvicorn only does once the app's lifespan startup has finished. On exit
it gets SIGTERM (uvicorn's graceful shutdown, which runs the lifespan's end),
then SIGKILL if it is still there after ``stop_timeout``.

For checks (a lesson's test file keeps only its own paths, environments and messages):

- ``Servers``: a test file's uvicorn servers of one app (one per environment, e.g. one
  whose ``REDIS_URL`` points where nothing listens), started together on first use
  and kept for the whole file.
- ``Web``: requests to the app, in this process (FastAPI's ``TestClient``, from
  ``app_client``) or through a ``Servers`` server. A request that raises, hangs or
  waits for a Celery result fails the check in one line; a 5xx answer quotes the
  exception from the server's log.
- ``run_within`` / ``interrupt_code_of``: an in-process request has no network
  timeout, so it runs on a thread, and app code still running after the timeout is
  interrupted with ``RunawayTask``, the way ``labkit.workers`` stops a runaway task.
- ``ignore_broker_sockets`` / ``collect_celery_leftovers``: Celery's per-thread result
  backends of an in-process web app leave connections to the garbage collector;
  these keep the ResourceWarnings they cause out of other checks.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx
from celery.exceptions import TimeoutError as CeleryTimeoutError

from labkit.checks import fail
from labkit.procs import ChildProcess, ProcessError, free_port, port_open
from labkit.workers import RunawayTask

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

HOST = "127.0.0.1"
ServerError = ProcessError  # the server could not start; the message has its last lines of output
ANSWER_WITHIN = 5.0  # seconds a request may take, unless the check says otherwise
WAITS = (
    "Does the app wait for something, e.g. a task's result? "
    "(In an async def endpoint, one blocking call stalls the whole server.)"
)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")

__all__ = [
    "HOST", "RunningServer", "ServerError", "Servers", "Web", "app_client", "collect_celery_leftovers",
    "free_port", "ignore_broker_sockets", "interrupt_code_of", "json_of", "run_within", "uvicorn_server",
]  # fmt: skip


class RunningServer(str):
    """The server's base URL (a plain ``str``), with its process (``.child``) and its output so far."""

    child: ChildProcess

    @property
    def process(self):
        return self.child.process

    @property
    def log(self) -> str:
        return self.child.log


@contextmanager
def uvicorn_server(
    module_app: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    start_timeout: float = 20.0,
    stop_timeout: float = 5.0,
) -> Iterator[RunningServer]:
    """Run ``uvicorn <module_app>`` in ``cwd`` and yield its base URL, e.g. ``http://127.0.0.1:41234``."""
    port = free_port()
    child = ChildProcess(
        [sys.executable, "-m", "uvicorn", module_app, "--host", HOST, "--port", str(port)],
        name=f"uvicorn {module_app}",
        ready=port_open(port),  # uvicorn listens only once the app's lifespan startup has finished
        cwd=cwd,
        env=env,
        start_timeout=start_timeout,
        stop_signal=signal.SIGTERM,  # uvicorn's graceful shutdown runs the lifespan's end
        stop_timeout=stop_timeout,
    )
    with child:
        server = RunningServer(f"http://{HOST}:{port}")
        server.child = child
        yield server


# --- for checks: servers, requests, and the in-process request runner -------------------


class Servers:
    """A test file's uvicorn servers of ``module_app`` in ``cwd``: one per entry of ``envs``.

    ``envs`` maps a name to the environment variables that server gets on top of this
    process's, e.g. ``{"uvicorn": {}, "redis-down": {"REDIS_URL": "redis://127.0.0.1:1/0"}}``.
    The first ``start(name)`` starts them all at once (each takes about a second to
    import the app); ``stop()`` (in a module-scoped fixture's teardown) stops them all.
    Each runs in a thread of its own that lives until ``stop()``: a server is killed
    when the thread that started it ends (labkit's servers die with their parent).
    """

    def __init__(self, module_app: str, cwd: Path, envs: dict[str, dict[str, str]]) -> None:
        self.module_app, self.cwd, self.envs = module_app, cwd, envs
        self.running: dict[str, RunningServer] = {}
        self.problems: dict[str, str] = {}
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def _serve(self, name: str, ready: threading.Event) -> None:
        try:
            with uvicorn_server(self.module_app, self.cwd, env=self.envs[name]) as server:
                self.running[name] = server
                ready.set()
                self.stopping.wait()
        except ServerError as exc:
            self.problems[name] = str(exc)
        finally:
            ready.set()

    def start(self, name: str) -> RunningServer:
        """The running server ``name``; one that could not start fails the check with its last lines."""
        if not self.threads:
            events = []
            for key in self.envs:
                events.append(threading.Event())
                self.threads.append(threading.Thread(target=self._serve, args=(key, events[-1]), name=f"labkit-{key}"))
                self.threads[-1].start()
            for event in events:
                event.wait(30)  # uvicorn_server's own start timeout (20 s) ends it before this
        if name not in self.running:
            shown = self.cwd.relative_to(self.cwd.parents[1])  # e.g. lessons/03_fastapi
            fail(f"Started the web server in {shown}: {self.problems.get(name, 'it did not start')}")
        return self.running[name]

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)


class Web:
    """Requests to the app under test. A request that raises or hangs fails the check in one line.

    Through a server: ``Web(httpx.Client(base_url=server, timeout=answer_within), server)``.
    In this process: ``Web(app_client(app), app_file=Path(module.__file__))``, whose requests
    run on a thread (``run_within``) and are interrupted after ``answer_within`` s.
    """

    def __init__(
        self,
        client: httpx.Client,
        server: RunningServer | None = None,
        app_file: Path | None = None,
        answer_within: float = ANSWER_WITHIN,
    ) -> None:
        self.client, self.server, self.app_file = client, server, app_file
        self.answer_within = answer_within

    def request(self, method: str, path: str, *, slow: str = "", **kwargs: Any) -> httpx.Response:
        """``client.request(method, path, **kwargs)``; ``slow`` is the advice when no answer comes (default ``WAITS``)."""
        shown = f"{method} {path}" + (f" {json.dumps(kwargs['json'])}" if "json" in kwargs else "")
        self.log_mark = len(self.server.log) if self.server else 0
        problem = ""
        try:
            if self.server is None:
                return run_within(lambda: self.client.request(method, path, **kwargs), self.answer_within, self.app_file)
            return self.client.request(method, path, **kwargs)
        except (httpx.TimeoutException, TimeoutError):
            problem = f"{shown} got no answer within {self.answer_within:g} s. {slow or WAITS}"
        except CeleryTimeoutError:
            problem = f"{shown} waited for a task's result, and gave up (celery TimeoutError): never wait for the work in a request."
        except httpx.TransportError as exc:
            problem = f"{shown}: the connection to the server failed ({type(exc).__name__}: {exc})."
        except NotImplementedError as exc:
            problem = f"{shown} raised NotImplementedError({str(exc)!r}) in the app: that TODO is still to do."
        except Exception as exc:
            problem = f"{shown} raised {type(exc).__name__} in the app: {exc}"
        fail(problem)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def expect(self, response: httpx.Response, status: int, did: str, look: str) -> None:
        """Fail unless ``response`` has ``status``; for a 5xx from uvicorn, quote the server's error."""
        if response.status_code != status:
            fail(f"{did} answered {response.status_code}{self._server_error(response)}, expected {status}. {look}")

    def _server_error(self, response: httpx.Response) -> str:
        if self.server is None or response.status_code < 500:
            return ""
        deadline = time.monotonic() + 1.0  # the traceback may reach the log just after the answer
        while True:
            errors = [line for line in self.server.log[self.log_mark :].splitlines() if EXCEPTION_LINE.match(line)]
            if errors or time.monotonic() > deadline:
                return f" (the server's log says: {errors[-1]})" if errors else ""
            time.sleep(0.05)


def json_of(response: httpx.Response) -> Any:
    """The JSON body, or the text when the body is not JSON (shown in failure messages)."""
    try:
        return response.json()
    except ValueError:
        return response.text


def app_client(app: Any, **kwargs: Any) -> TestClient:
    """FastAPI's ``TestClient(app, **kwargs)``: the app runs in this process. Enter it to run its lifespan."""
    from starlette.exceptions import StarletteDeprecationWarning

    with warnings.catch_warnings():
        # Starlette 1.10 prefers the httpx2 package and warns when it gets httpx, which the course pins.
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient
    return TestClient(app, **kwargs)


def run_within(request: Callable[[], Any], timeout: float, code_file: Path | None = None) -> Any:
    """``request()`` on a thread; if it hangs, interrupt the code of ``code_file`` and raise TimeoutError.

    An in-process request has no network timeout: an endpoint that waits forever (a
    result.get() with no timeout) would hang the grader. Like a runaway task in
    labkit.workers, it is interrupted with an exception at its next Python line.
    What ``request()`` raises is raised here.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["response"] = request()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="labkit-request", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        interrupt_code_of(code_file)
        thread.join(5)
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["response"]


def interrupt_code_of(code_file: Path | None) -> None:
    """Raise ``RunawayTask`` in every thread now running a line of ``code_file`` (at its next bytecode).

    Python cannot kill a thread; this makes the code fail where it stands. A thread
    blocked in C (a long sleep, a read) gets it only when it comes back to Python.
    """
    for ident, frame in sys._current_frames().items():
        while frame is not None:
            if code_file is not None and Path(frame.f_code.co_filename) == code_file:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(RunawayTask))
                break
            frame = frame.f_back


def ignore_broker_sockets(broker_url: str) -> None:
    """Ignore the ResourceWarning of an unclosed socket to ``broker_url`` (call it in an autouse fixture).

    Celery keeps a result backend per thread (the app's, the worker's, each of the
    web app's threads). When such a thread ends, its backend and open connections
    become garbage in a reference cycle, and the collector may close them later, in
    another check, with a ResourceWarning that is neither that check's fault nor
    a bug in the code under test.
    """
    address = urlsplit(broker_url)
    warnings.filterwarnings(
        "ignore", rf"unclosed <socket\.socket .*raddr=\('{re.escape(address.hostname)}', {address.port}\)>", ResourceWarning
    )


def collect_celery_leftovers(broker_url: str, timeout: float = 5.0) -> None:
    """Collect that garbage now (after a test file's checks), so it cannot warn in another file's."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():  # the web app's thread pools end once their TestClient closed
        if thread.name.startswith("AnyIO worker thread"):
            thread.join(max(0.0, deadline - time.monotonic()))
    with warnings.catch_warnings():
        ignore_broker_sockets(broker_url)
        gc.collect()
