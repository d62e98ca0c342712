"""How fast does Celery run on each broker the course can use? A benchmark, not a test.

Side by side, in one run:
  (a) the embedded broker in a child process (``labkit.broker.broker_process``: what the grader uses),
  (b) the embedded broker in this process (``labkit.broker.EmbeddedBroker``),
  (c) fakeredis's stock ``TcpFakeServer`` (the trap the embedded broker exists to avoid),
  (d) a real Redis, when ``REDIS_URL`` (or ``--redis-url``) is given: its database 14, emptied first.

For each: the median round trip of a trivial task (``add.delay(i, 1).get()``, one at a time,
after a warm-up) and the throughput of a batch (send them all, then get them all), through a
real worker (``labkit.workers.thread_worker``, solo pool). Each broker runs in a fresh Python
process of its own with a time cap, so one that stalls or breaks is reported and cannot hang
the run or slow the next one.

    .venv/bin/python bench/broker_latency.py
    REDIS_URL=redis://127.0.0.1:6379 .venv/bin/python bench/broker_latency.py --tasks 1000 --round-trips 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

REAL_DB = 14
WARM_UP = 20
GET_TIMEOUT = 10.0  # seconds, for any one result
RESULT_MARK = "BENCH-RESULT "

LEGS = {
    "child": "embedded, child process",
    "inprocess": "embedded, in-process",
    "stock": "fakeredis TcpFakeServer (stock)",
    "real": "real Redis",
}


# --- one leg: runs in its own process ---------------------------------------------------


@contextlib.contextmanager
def broker_for(leg: str, redis_url: str | None) -> Iterator[str]:
    if leg == "child":
        from labkit.broker import broker_process

        with broker_process() as url:
            yield url
    elif leg == "inprocess":
        from labkit.broker import EmbeddedBroker

        with EmbeddedBroker() as server:
            yield server.url
    elif leg == "stock":
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", 0))  # port 0: the kernel picks a free port
        thread = threading.Thread(target=server.serve_forever, name="stock-tcpfakeserver", daemon=True)
        thread.start()
        try:
            yield f"redis://127.0.0.1:{server.server_address[1]}/0"
        finally:
            server.shutdown()
            server.server_close()
    elif leg == "real":
        from labkit.broker import is_reachable, with_db

        if not redis_url:
            raise SystemExit("no REDIS_URL given for the real-Redis leg")
        url = with_db(redis_url, REAL_DB)
        if not is_reachable(url):
            raise SystemExit(f"no Redis answers at {redis_url}")
        yield url
    else:
        raise SystemExit(f"unknown leg {leg!r}")


def run_leg(leg: str, tasks: int, round_trips: int, redis_url: str | None, cap: float) -> dict:
    import redis
    from celery import Celery

    from labkit.workers import thread_worker

    started = time.monotonic()
    result: dict = {"leg": leg, "round_trips": round_trips, "tasks": tasks}

    def check_cap(stage: str) -> None:
        if time.monotonic() - started > cap:
            raise TimeoutError(f"time cap of {cap:.0f} s reached during {stage}")

    with broker_for(leg, redis_url) as url:
        flusher = redis.Redis.from_url(url, socket_timeout=5)
        flusher.flushdb()
        flusher.close()
        os.environ["REDIS_URL"] = url  # thread_worker checks that the app uses it
        app = Celery("broker_bench", broker=url, backend=url)
        app.conf.broker_connection_max_retries = 3  # fail, not retry forever, if the broker hangs up

        @app.task(name="broker_bench.add")
        def add(x: int, y: int) -> int:
            return x + y

        try:
            with thread_worker(app, start_timeout=20, stop_timeout=10):
                for i in range(WARM_UP):
                    add.delay(i, 1).get(timeout=GET_TIMEOUT)
                check_cap("the warm-up")

                samples = []
                for i in range(round_trips):
                    t0 = time.perf_counter()
                    value = add.delay(i, 1).get(timeout=GET_TIMEOUT)
                    samples.append(time.perf_counter() - t0)
                    assert value == i + 1, f"add({i}, 1) returned {value!r}"
                    if i % 10 == 0:
                        check_cap("the round trips")
                result["median_ms"] = statistics.median(samples) * 1000
                result["p90_ms"] = statistics.quantiles(samples, n=10)[-1] * 1000 if len(samples) > 1 else None

                t0 = time.perf_counter()
                pending = [add.delay(i, 1) for i in range(tasks)]
                check_cap("sending the batch")
                for i, async_result in enumerate(pending):
                    assert async_result.get(timeout=GET_TIMEOUT) == i + 1
                    if i % 50 == 0:
                        check_cap("collecting the batch")
                result["tasks_per_s"] = tasks / (time.perf_counter() - t0)
        finally:
            app.close()
    result["seconds"] = time.monotonic() - started
    return result


# --- the driver: one child process per leg, then the table --------------------------------


def spawn_leg(leg: str, tasks: int, round_trips: int, redis_url: str | None, cap: float) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--leg", leg,
        "--tasks", str(tasks), "--round-trips", str(round_trips), "--cap", str(cap),
    ]  # fmt: skip
    if redis_url:
        command += ["--redis-url", redis_url]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        # Outer bound: the leg's own cap, plus time to start and stop its broker and worker.
        done = subprocess.run(command, capture_output=True, text=True, timeout=cap + 30, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return {"leg": leg, "error": f"no answer within {cap + 30:.0f} s: killed", "log": _tail(exc.stderr)}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return {"leg": leg, "error": f"exited with code {done.returncode} and no result", "log": _tail(done.stderr)}


def _tail(text: str | bytes | None, lines: int = 6) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[dict]) -> None:
    real = next((r for r in results if r["leg"] == "real" and "error" not in r), None)
    print("| broker | median round trip ms | tasks/s | ratio to real |")
    print("|---|---:|---:|---:|")
    for r in results:
        name = LEGS[r["leg"]]
        if "error" in r:
            print(f"| {name} | failed | failed | — |")
            continue
        ratio = "—"
        if real and r is not real:
            ratio = f"{r['median_ms'] / real['median_ms']:.2f}× (tasks/s {r['tasks_per_s'] / real['tasks_per_s']:.2f}×)"
        elif r is real:
            ratio = "1.00×"
        batch = f"{fmt(r['tasks_per_s'], 0)} (n={r['tasks']})"
        print(f"| {name} | {fmt(r['median_ms'], 2)} (n={r['round_trips']}) | {batch} | {ratio} |")
    print()
    print("ratio to real: median round trip ÷ real's (lower is better; 1.00× = as fast), then tasks/s ÷ real's.")
    if real:
        for leg in ("child", "inprocess"):
            r = next((x for x in results if x["leg"] == leg and "error" not in x), None)
            if r:
                print(
                    f"embedded/real ({LEGS[leg]}): round trip {r['median_ms'] / real['median_ms']:.2f}×, "
                    f"throughput {r['tasks_per_s'] / real['tasks_per_s']:.2f}×"
                )
    for r in results:
        if "error" in r:
            print(f"\n{LEGS[r['leg']]}: {r['error']}")
            if r.get("log"):
                print("  " + r["log"].replace("\n", "\n  "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the throughput batch (default 1000)")
    parser.add_argument("--round-trips", type=int, default=200, help="sequential round trips timed (default 200)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="a real Redis (default: REDIS_URL)")
    parser.add_argument("--cap", type=float, default=120.0, help="time cap per broker, in seconds (default 120)")
    parser.add_argument(
        "--stock-share", type=float, default=0.1,
        help="fraction of --tasks/--round-trips run on the stock TcpFakeServer, which is slow (default 0.1)",
    )  # fmt: skip
    parser.add_argument("--leg", choices=sorted(LEGS), help=argparse.SUPPRESS)  # internal: run one leg
    args = parser.parse_args()

    if args.leg:
        try:
            result = run_leg(args.leg, args.tasks, args.round_trips, args.redis_url, args.cap)
        except Exception as exc:  # reported as this leg's result, not a crash of the whole run
            result = {"leg": args.leg, "error": f"{type(exc).__name__}: {exc}"}
        print(RESULT_MARK + json.dumps(result), flush=True)
        os._exit(0)  # don't wait on threads a broken leg may have left behind

    legs = ["child", "inprocess", "stock"] + (["real"] if args.redis_url else [])
    print(f"Celery round trips ({args.round_trips}) and a batch of {args.tasks} tasks, thread worker (solo pool)")
    if not args.redis_url:
        print("(no REDIS_URL: the real-Redis leg is skipped)")
    results = []
    for leg in legs:
        tasks, round_trips = args.tasks, args.round_trips
        if leg == "stock":
            tasks = max(10, int(tasks * args.stock_share))
            round_trips = max(10, int(round_trips * args.stock_share))
        print(f"  running: {LEGS[leg]} …", file=sys.stderr, flush=True)
        results.append(spawn_leg(leg, tasks, round_trips, args.redis_url, args.cap))
    print()
    print_table(results)


if __name__ == "__main__":
    main()
