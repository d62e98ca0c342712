"""Does ``AsyncResult.get()`` ever miss a result on Redis pub/sub? A stress run, not a test.

How Celery 5.7's Redis backend waits (celery/backends/redis.py, asynchronous.py):
``task.delay()`` SUBSCRIBEs to ``celery-task-meta-<id>`` before it sends the task
(``on_task_call``); ``get()`` subscribes again if that subscription was dropped
(``consume_from``), then reads the stored meta once (``on_wait_for_pending``), then
waits for pub/sub messages only (``drain_events_until``; it never reads the stored
meta again). The worker stores a final state with SET and PUBLISH in one MULTI.
So a result is missed only if the broker runs a PUBLISH from one connection before
a SUBSCRIBE that was sent earlier on another: then ``get()`` waits until its timeout.

Each round trip sends a task and waits with ``get(timeout=…)``. A timeout whose task
is stored as SUCCESS is a *miss*. We also count how each result reached ``get()``:
by a pub/sub message, or by that one read of the stored meta. Patterns:

- ``plain``: ``add.delay(i, 1).get()``.
- ``peek``: a task that reports PROGRESS three times; before ``get()`` the client
  reads ``AsyncResult(id).state`` with a second result object, whose garbage
  collection UNSUBSCRIBEs the channel, so ``get()`` SUBSCRIBEs again (lesson 02's checks).
- ``held``: the task waits at a threading.Event until the client has seen it run and
  peeked at its state (lesson 02's Hold), then the client releases it and calls ``get()``:
  the result is published while ``get()`` (re)subscribes.

    .venv/bin/python bench/results_pubsub.py --leg child --round-trips 5000
    .venv/bin/python bench/results_pubsub.py --leg real --redis-url redis://127.0.0.1:6379 --round-trips 5000
    .venv/bin/python bench/results_pubsub.py --url redis://127.0.0.1:PORT/0   # any running broker
    .venv/bin/python bench/results_pubsub.py --leg real --redis-url redis://127.0.0.1:6379 --order 3000

``--order N`` measures the cause with raw sockets instead: N times, a SUBSCRIBE is written
on connection A, then a PUBLISH of that channel on connection B; PUBLISH's reply says
how many subscribers got it (0: B's command ran first). Measured twice: after the server
last served A, and after it last served B. The epoll loop of redis-server (and of the
embedded broker) re-reads the connection it served last first, so "last served B"
reverses many pairs. Celery's get() is in that case: its read of the stored state
goes out on the connection it used last, after a SUBSCRIBE on the pub/sub connection.

The real-Redis leg uses database 14; it empties nothing (its queue is its own, its keys expire in 10 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

REAL_DB = 14
PATTERNS = ("plain", "peek", "held")


@contextlib.contextmanager
def broker_for(leg: str, redis_url: str | None, url: str | None) -> Iterator[str]:
    from labkit.broker import broker_process, is_reachable, with_db

    if url:
        yield url
    elif leg == "child":
        with broker_process() as child_url:
            yield child_url
    elif leg == "real":
        if not redis_url:
            raise SystemExit("the real leg needs --redis-url (or REDIS_URL)")
        real = with_db(redis_url, REAL_DB)
        if not is_reachable(real):
            raise SystemExit(f"no Redis answers at {redis_url}")
        yield real
    else:
        raise SystemExit(f"unknown leg {leg!r}")


def stress(url: str, round_trips: int, patterns=PATTERNS, timeout: float = 5.0, clients: int = 1, log=print) -> dict:
    """Run ``round_trips`` round trips through a thread worker on ``url``; counts, misses and timings."""
    import redis
    from celery import Celery
    from celery.exceptions import TimeoutError as CeleryTimeoutError
    from celery.result import AsyncResult

    from labkit.workers import thread_worker

    os.environ["REDIS_URL"] = url  # thread_worker checks that the app uses it
    raw = redis.Redis.from_url(url, socket_timeout=10)
    # A queue of its own and unique task ids: nothing to empty, no clash with other runs on a shared Redis.
    app = Celery(f"pubsub_stress_{uuid.uuid4().hex[:8]}", broker=url, backend=url)
    app.conf.update(task_track_started=True, task_default_queue=app.main, result_expires=600, broker_connection_max_retries=3)
    holds: dict[str, tuple[threading.Event, threading.Event]] = {}

    @app.task(name=f"{app.main}.add")
    def add(x, y):
        return x + y

    @app.task(name=f"{app.main}.steps", bind=True)
    def steps(self, n):
        for i in range(n):
            self.update_state(state="PROGRESS", meta={"current": i, "total": n})
        return n

    @app.task(name=f"{app.main}.held")
    def held(hold_id):
        reached, released = holds[hold_id]
        reached.set()
        released.wait(10)
        return hold_id

    counts: Counter = Counter()
    misses: list[dict] = []
    waits: dict[str, list[float]] = {pattern: [] for pattern in patterns}

    def count_how_results_arrive() -> None:
        """Wrap this thread's result consumer (Celery keeps a Redis backend per thread)."""
        consumer = app.backend.result_consumer
        real_on_state_change = consumer.on_state_change

        def on_state_change(meta, message):
            if meta.get("status") == "SUCCESS":
                counts["by_message" if message is not None else "by_stored_read"] += 1
            return real_on_state_change(meta, message)

        consumer.on_state_change = on_state_change

    def one(i: int, pattern: str) -> None:
        if pattern == "plain":
            result, expected = add.delay(i, 1), i + 1
        elif pattern == "peek":
            result, expected = steps.delay(3), 3
            AsyncResult(result.id, app=app).state  # a second result object, dropped at once
        else:
            hold_id = uuid.uuid4().hex
            holds[hold_id] = reached, released = threading.Event(), threading.Event()
            result, expected = held.delay(hold_id), hold_id
            if not reached.wait(10):
                counts["hold_not_reached"] += 1
            AsyncResult(result.id, app=app).state
            released.set()
        started = time.perf_counter()
        try:
            value = result.get(timeout=timeout)
        except CeleryTimeoutError:
            stored = raw.get(f"celery-task-meta-{result.id}")
            status = json.loads(stored)["status"] if stored else "no key"
            kind = "miss" if status == "SUCCESS" else "slow"
            counts[kind] += 1
            misses.append({"i": i, "pattern": pattern, "stored": status, "kind": kind})
            log(f"  {kind}: round trip {i} ({pattern}) timed out after {timeout:g} s; stored state {status}")
        else:
            counts["ok"] += 1
            counts["wrong_value"] += value != expected
        waits[pattern].append(time.perf_counter() - started)
        if pattern == "held":
            holds.pop(hold_id, None)

    def client(k: int) -> None:
        count_how_results_arrive()
        for i in range(k, round_trips, clients):
            one(i, patterns[i % len(patterns)])

    t0 = time.monotonic()
    try:
        with thread_worker(app, pool="threads", concurrency=4):
            threads = [threading.Thread(target=client, args=(k,), name=f"stress-client-{k}") for k in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        app.close()
        raw.close()
    get_ms = {}
    for pattern, seconds in waits.items():
        seconds.sort()
        if seconds:
            at = lambda q: round(seconds[min(len(seconds) - 1, int(q * len(seconds)))] * 1000, 1)  # noqa: E731
            get_ms[pattern] = {"p50": at(0.5), "p99": at(0.99), "max": at(1.0), "over_900": sum(s > 0.9 for s in seconds)}
    seconds = round(time.monotonic() - t0, 1)
    return {"round_trips": round_trips, "seconds": seconds, **counts, "get_ms": get_ms, "misses": misses}


def measure_order(url: str, n: int) -> dict:
    """How often a PUBLISH on connection B overtakes a SUBSCRIBE sent before it on connection A."""
    import socket
    import urllib.parse

    def command(*parts: bytes) -> bytes:
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    address = urllib.parse.urlsplit(url)
    a, b = (socket.create_connection((address.hostname, address.port or 6379), timeout=10) for _ in range(2))
    buffers = {a: b"", b: b""}

    def read_until(sock: socket.socket, marker: bytes) -> bytes:
        while marker not in buffers[sock]:
            buffers[sock] += sock.recv(65536)
        head, _, buffers[sock] = buffers[sock].partition(marker)
        return head

    def served_last(sock: socket.socket, i: int) -> None:  # a PING answered on sock
        sock.sendall(command(b"PING", b"mark-%d" % i))
        read_until(sock, b"mark-%d\r\n" % i)

    counts = {}
    try:
        for sock in (a, b):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for last in ("A", "B"):
            overtaken = 0
            for i in range(n):
                first, second = (b, a) if last == "A" else (a, b)
                served_last(first, i)
                served_last(second, i)
                channel = b"labkit-order-%s-%d" % (uuid.uuid4().hex.encode(), i)
                a.sendall(command(b"SUBSCRIBE", channel))
                b.sendall(command(b"PUBLISH", channel, b"x"))
                overtaken += read_until(b, b"\r\n").endswith(b":0")
                a.sendall(command(b"UNSUBSCRIBE", channel))
            counts[f"last_served_{last}"] = f"{overtaken}/{n} PUBLISHes ran before the SUBSCRIBE sent before them"
    finally:
        a.close()
        b.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leg", choices=["child", "real"], default="child")
    parser.add_argument("--url", help="stress this running broker instead")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1, help="client threads sending and waiting at once")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds each get() may wait")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--order", type=int, metavar="N", help="measure the ordering of two connections instead")
    args = parser.parse_args(argv)
    with broker_for(args.leg, args.redis_url, args.url) as url:
        shown = args.url or args.leg
        if args.order:
            print(json.dumps({"broker": shown, **measure_order(url, args.order)}))
            return
        print(f"{shown}: {args.round_trips} round trips, {args.clients} client thread(s), patterns {args.patterns}")
        report = stress(url, args.round_trips, tuple(args.patterns.split(",")), args.timeout, args.clients)
    print(json.dumps({"broker": shown, **report}))


if __name__ == "__main__":
    main()
