"""A real web server for checks: ``python -m uvicorn module:app`` as a subprocess.

    with uvicorn_server("api1:app", cwd=lesson.folder(target)) as url:
        httpx.get(f"{url}/jobs/42")

The server runs in ``cwd`` (so it imports the lesson's modules as a student's
terminal would) with this process's environment (``REDIS_URL``) plus ``env``,
on 127.0.0.1 and a free port. It is ready when its port accepts connections,
which uvicorn only does once the app's lifespan startup has finished. On exit
it gets SIGTERM (uvicorn's graceful shutdown, which runs the lifespan's end),
then SIGKILL if it is still there after ``stop_timeout``.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labkit.procs import ChildProcess, ProcessError, free_port, port_open

HOST = "127.0.0.1"
ServerError = ProcessError  # the server could not start; the message has its last lines of output

__all__ = ["HOST", "RunningServer", "ServerError", "free_port", "uvicorn_server"]


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
