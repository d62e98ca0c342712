"""Flower for checks: the real ``celery flower`` command, and what a check reads from it.

    flower = flower_process("monitoring1", cwd)      # on a free port (flower.port), API open
    with flower:                                      # boots while the worker does
        wait_for_flower(flower, redis_client)         # HTTP up AND subscribed to the events
        status, workers = flower_get(flower, "/api/workers")
        counts = flower_events(flower)                # /metrics: {(task, event type): count}
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

from labkit.procs import ChildProcess, ProcessError, accepts_connections, free_port


def flower_process(module: str, cwd: Path, env: dict[str, str] | None = None) -> ChildProcess:
    """`celery -A <module> flower` on a free port of 127.0.0.1 (``.port``), its API open without auth.

    Started with ``with`` (or ``.start()``), it returns at once, so that it boots while the
    worker does; wait_for_flower() then waits until it is ready.
    """
    port = free_port()
    command = [sys.executable, "-m", "celery", "-A", module, "flower", f"--port={port}", "--address=127.0.0.1"]
    flower = ChildProcess(
        command,
        name="flower",
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "FLOWER_UNAUTHENTICATED_API": "true", **(env or {})},
        stop_signal=signal.SIGKILL,  # nothing needs to see it stop
    )
    flower.port = port
    return flower


def listening_for_events(client: redis.Redis) -> bool:
    """Has a connection to this database subscribed to the event channels (`PSUBSCRIBE /<db>.celeryev/*`)?

    On Redis, an event is a PUBLISH: only a subscriber connected at that moment gets it. Flower
    declares its event queue, then subscribes a moment later (50-100 ms, measured). redis-server
    shows each connection's pattern subscriptions (CLIENT LIST, `psub`); the embedded broker does
    not, but it serves this grading run alone, so any pattern subscription (PUBSUB NUMPAT) is Flower's.
    """
    database = str(client.connection_pool.connection_kwargs.get("db", 0))
    clients = client.client_list()
    if any(int(info.get("psub") or 0) for info in clients):
        return any(info.get("db") == database and int(info.get("psub") or 0) for info in clients)
    return bool(client.smembers("_kombu.binding.celeryev")) and int(client.execute_command("PUBSUB", "NUMPAT")) > 0


def wait_for_flower(flower: ChildProcess, client: redis.Redis, timeout: float = 20.0) -> None:
    """Wait until Flower answers HTTP and listens for events: events published before that never reach it."""
    deadline = time.monotonic() + timeout
    while not (accepts_connections(flower.port) and listening_for_events(client)):
        if not flower.alive:
            raise ProcessError(f"`{flower.shown}` exited (code {flower.returncode}). Its last lines:\n{flower.tail()}")
        if time.monotonic() > deadline:
            raise ProcessError(f"`{flower.shown}` was not ready within {timeout:g} s. Its last lines:\n{flower.tail()}")
        time.sleep(0.02)


def flower_get(flower: ChildProcess, path: str):
    """GET a Flower page; (status, body parsed as JSON when it is JSON)."""
    url = f"http://127.0.0.1:{flower.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def flower_events(flower: ChildProcess) -> dict:
    """Flower's /metrics, the counter flower_events_total: {(task name, event type): count}."""
    status, text = flower_get(flower, "/metrics")
    counts: dict = {}
    if status != 200 or not isinstance(text, str):
        return counts
    for line in text.splitlines():
        if line.startswith("flower_events_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels.get("task", ""), labels.get("type", ""))
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts
