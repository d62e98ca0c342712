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

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labkit.broker import die_with_parent

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """The server could not start; the message says why, with its last lines of output."""


class RunningServer(str):
    """The server's base URL (a plain ``str``), with its process and its output so far."""

    process: subprocess.Popen
    _log: deque[str]

    @property
    def log(self) -> str:
        return "".join(self._log)


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the OS picks it; it is free once closed)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


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
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module_app, "--host", HOST, "--port", str(port)],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=die_with_parent,
    )
    log: deque[str] = deque(maxlen=2000)
    reader = threading.Thread(target=lambda: log.extend(process.stdout), name="labkit-web-log", daemon=True)
    reader.start()
    server = RunningServer(f"http://{HOST}:{port}")
    server.process, server._log = process, log
    try:
        deadline = time.monotonic() + start_timeout
        while not _accepts_connections(port):
            if process.poll() is not None or time.monotonic() > deadline:
                reason = "exited" if process.poll() is not None else f"did not answer within {start_timeout:.0f} s"
                reader.join(1)  # the last lines of a process that exited
                tail = "".join(list(log)[-8:])
                raise ServerError(f"`uvicorn {module_app}` {reason}. Its last lines:\n{tail}")
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(10)
        reader.join(5)
        process.stdout.close()
