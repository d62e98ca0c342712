"""Lesson 05 checks: late acks, a killed worker, redelivery, and an idempotent charge.

The side effect is visible from outside: the given payment provider, ``charge_card``,
appends one entry per charge to the Redis list CHARGES, and the checks count them.

To kill a worker *while the task runs*, never at a random moment: the worker runs with
PROVIDER_DELAY=30, so the provider records the charge and then waits before it answers.
Once the charge is in the list, the task is known to be inside charge_card(), and the check
kills the worker (or only its pool process). The worker that picks the message up again
runs with a short visibility timeout and restore sweep (VISIBILITY_TIMEOUT=1 and friends),
which the lesson's app reads from the environment.
"""

import json
import threading
import time
from collections import Counter

import pytest
import redis

from labkit.checks import fail, wait_until

MODULE = "delivery1"
AMOUNT = 4200
SLOW_PROVIDER = {"PROVIDER_DELAY": "30"}  # the provider takes the money, then takes 30 s to answer
FAST_RESTORE = {  # a second worker that gives back any message left unacked for over 1 s, every second
    "VISIBILITY_TIMEOUT": "1",
    "UNACKED_RESTORE_INTERVAL": "1",
    "UNACKED_RESTORE_THROTTLE": "1",
    "PROVIDER_DELAY": "0",
}
WAIT = 10.0  # the longest a check waits for a task to run, end or come back
SLOW_READ = 0.3  # seconds added after each Redis read made inside a task (two copies at once)
# Keys of Celery and kombu (queue, results, bindings, unacked messages) and the provider's ledger.
NOT_IDEMPOTENCY = ("celery", "celery-task-meta-", "_kombu.", "unacked", "charges")


# --- looking from outside ------------------------------------------------------------


def charges(redis_client):
    """How many times the provider charged each order: {order_id: count}."""
    entries = [json.loads(raw) for raw in redis_client.lrange("charges", 0, -1)]
    return Counter(entry.get("order_id") for entry in entries)


def idempotency_keys(redis_client):
    """The keys the task wrote besides Celery's own and the provider's ledger."""
    names = [name.decode() for name in redis_client.keys("*")]
    return sorted(name for name in names if name != "celery" and not name.startswith(NOT_IDEMPOTENCY))


def message_in_redis(redis_client, task_id):
    """Where the task's message is: in the queue, in kombu's `unacked` hash, or '' (gone)."""
    if any(task_id.encode() in raw for raw in redis_client.lrange("celery", 0, -1)):
        return "the queue"
    if any(task_id.encode() in raw for raw in redis_client.hvals("unacked")):
        return "kombu's 'unacked' hash"
    return ""


def receipts(worker, task_id):
    """How many times the worker's log says it received the task's message."""
    return sum(f"[{task_id}] received" in line for line in worker.log.splitlines())


def ended_with(result):
    """The stored (state, result) of a task, read fresh from the backend."""
    meta = result.backend.get_task_meta(result.id)
    return meta["status"], meta["result"]


def fail_if_broken(result, description, own_errors=False):
    """A task that failed fails the check with its error, in one line.

    With ``own_errors``, an exception the task raised on purpose is accepted (a duplicate that
    finds an order "pending" may well report it as a failure); NotImplementedError never is.
    """
    state, value = ended_with(result)
    if state != "FAILURE":
        return
    if isinstance(value, NotImplementedError):
        fail(f"{description} failed in the worker with NotImplementedError({str(value)!r}): that TODO is still to do.")
    if not own_errors and type(value).__name__ != "WorkerLostError":
        fail(f"{description} failed in the worker with {type(value).__name__}: {value}")


def wait_charging(result, redis_client, order, description):
    """Wait until the provider has charged `order`: the task is then inside charge_card()."""
    wait_until(
        lambda: charges(redis_client)[order] or result.ready(),
        WAIT,
        f"{description}: no charge for {order!r} after {WAIT:g} s (state {result.state}). "
        "Does charge_order call charge_card(order_id, amount)?",
    )
    if not charges(redis_client)[order]:
        fail_if_broken(result, description)
        fail(f"{description} ended {result.state} without charging {order!r}: it must call charge_card (TODO 3).")


def finish(result, description, own_errors=False):
    """Wait until the task has ended; fail in one line if it failed (see fail_if_broken)."""
    wait_until(result.ready, WAIT, f"{description} had not ended after {WAIT:g} s (state {result.state}).")
    fail_if_broken(result, description, own_errors)
    return ended_with(result)


def kill_at_end(worker):
    """Stop a worker that may be stuck in a 30 s provider call at once, instead of waiting for it."""
    try:
        worker.kill()
    except Exception:
        pass


# --- TODO 1: late acknowledgement ----------------------------------------------------


@pytest.mark.task(1)
def test_killed_worker_leaves_its_task_in_redis(exercise, process_worker, redis_client):
    lesson = exercise(MODULE)
    order = "order-1"
    worker = process_worker(MODULE, concurrency=1, env=SLOW_PROVIDER)
    description = f"charge_order.delay({order!r}, {AMOUNT})"
    result = lesson.charge_order.delay(order, AMOUNT)
    try:
        wait_charging(result, redis_client, order, description)
    finally:
        kill_at_end(worker)  # SIGKILL the whole worker in the middle of the task, as a crash would
    assert message_in_redis(redis_client, result.id), (
        f"Killed the worker (SIGKILL) while {description} ran; its message is gone from Redis: in neither the "
        "queue nor kombu's 'unacked' hash, so no worker will ever run it again. The worker acknowledged it as "
        "the task started (early ack, Celery's default). Acknowledge late (TODO 1)."
    )


@pytest.mark.task(1)
def test_lost_pool_process_gives_its_task_back(exercise, process_worker, redis_client):
    lesson = exercise(MODULE)
    order = "order-2"
    worker = process_worker(MODULE, concurrency=1, env=SLOW_PROVIDER)
    description = f"charge_order.delay({order!r}, {AMOUNT})"
    result = lesson.charge_order.delay(order, AMOUNT)
    try:
        wait_charging(result, redis_client, order, description)
        pool = worker.pool_pids
        if len(pool) != 1:
            fail(f"Expected the worker (pid {worker.pid}, --concurrency=1) to have one pool process, found {pool}.")
        worker.kill_pool_process(pool[0])  # it dies (say, out of memory); the worker lives on

        def outcome():
            if receipts(worker, result.id) >= 2:
                return "again"
            return ended_with(result)[0] == "FAILURE" and "failed"

        seen = wait_until(
            outcome,
            WAIT,
            f"Killed the pool process running {description}; after {WAIT:g} s the worker had neither "
            f"received it again nor marked it failed (state {result.state}).",
        )
    finally:
        kill_at_end(worker)
    if seen == "failed":
        state, value = ended_with(result)
        if lesson.charge_order.acks_late:
            why = "With acks_late alone, Celery still acknowledges a task whose pool process died"
        else:
            why = "The message was acknowledged as the task started (early ack, Celery's default)"
        fail(
            f"Killed the pool process running {description} (the worker itself lived on); the worker marked it "
            f"{state} with {type(value).__name__}, and the task never ran again. {why}: acknowledge late, and "
            "give the message back when the process running it dies (TODO 1)."
        )


# --- TODO 2 and 3: the idempotency key -------------------------------------------------


@pytest.mark.task(2)
def test_charge_order_charges_a_resent_order_once(exercise, thread_worker, redis_client):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    first = lesson.charge_order.delay("order-7", 1999)
    finish(first, "charge_order.delay('order-7', 1999)")
    again = lesson.charge_order.delay("order-7", 1999)  # the client did not hear back, and sent it again
    state, value = finish(again, "charge_order.delay('order-7', 1999), sent a second time", own_errors=True)
    other = lesson.charge_order.delay("order-8", 500)
    finish(other, "charge_order.delay('order-8', 500)")
    counts = {order: charges(redis_client)[order] for order in ("order-7", "order-8")}
    keys = idempotency_keys(redis_client)
    if counts["order-7"] > 1:
        per_delivery = [key for key in keys if first.id in key or again.id in key]
        if per_delivery:
            fail(
                f"Sent charge_order('order-7', 1999) twice; the provider charged it {counts['order-7']} times. "
                f"Your keys {per_delivery} hold the task id: each delay() gets a new one, so a resend never finds the first "
                "key. Name the key after the order (TODO 2)."
            )
        found = f"the keys {keys} were written" if keys else "no key besides Celery's was written to Redis"
        fail(
            f"Sent charge_order('order-7', 1999) twice; the provider charged it {counts['order-7']} times, expected "
            f"once ({found}). Claim a key named after the order, and return without charging when it is taken "
            "(TODO 2 and 3)."
        )
    assert counts == {"order-7": 1, "order-8": 1}, (
        f"Sent order-7 twice, then order-8 once; the provider charged {counts}, expected each order once. "
        f"The keys in Redis are {keys}: is the key different for each order (TODO 2)?"
    )
    assert state == "SUCCESS", (
        f"charge_order('order-7', 1999) was charged, then sent again; the repeat ended {state} with {value!r}. "
        "The client only wants to know the order is paid: a repeat is not an error, return without charging (TODO 3)."
    )


@pytest.fixture
def slow_reads_in_tasks(monkeypatch):
    """Make every Redis read made from a pool thread take SLOW_READ s longer (a busy Redis).

    Two copies of a task that read first ("is it charged?") and write afterwards then both
    read before either writes. One atomic command (SET NX, HSETNX, a Lua script) is unaffected.
    """
    reads = {"GET", "MGET", "EXISTS", "HGET", "HMGET", "HGETALL", "HEXISTS", "SISMEMBER", "SMEMBERS"}
    reads |= {"LRANGE", "LPOS", "ZSCORE", "TTL"}
    original = redis.Redis.execute_command

    def execute_command(self, *args, **options):
        reply = original(self, *args, **options)
        if str(args[0]).upper() in reads and threading.current_thread().name.startswith("ThreadPoolExecutor"):
            time.sleep(SLOW_READ)
        return reply

    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)


@pytest.mark.task(3)
def test_charge_order_charges_once_when_two_copies_run_at_once(
    exercise, thread_worker, redis_client, slow_reads_in_tasks
):
    lesson = exercise(MODULE)
    thread_worker(lesson.app, pool="threads", concurrency=2)
    order = "order-5"
    copies = [lesson.charge_order.delay(order, AMOUNT) for _ in range(2)]  # a double click
    for number, copy in enumerate(copies, 1):
        finish(copy, f"charge_order.delay({order!r}, {AMOUNT}), copy {number} of 2", own_errors=True)
    charged = charges(redis_client)[order]
    sent = f"Sent charge_order({order!r}, {AMOUNT}) twice at once to a worker with two threads"
    keys = idempotency_keys(redis_client)
    if charged > 1 and not keys:
        fail(
            f"{sent}; the provider charged it {charged} times, and no key besides Celery's was written: claim one (TODO 3)."
        )
    if charged > 1 and any(copy.id in key for copy in copies for key in keys):
        fail(
            f"{sent}; the provider charged it {charged} times. Your keys {keys} hold the task id, which differs "
            "for each copy: name the key after the order (TODO 2)."
        )
    assert charged == 1, (
        f"{sent} (each Redis read made {SLOW_READ} s slower); the provider charged it {charged} times, expected once. "
        "Both copies read 'not claimed yet' before either wrote its key: claim with one atomic command, such as "
        "SET with NX, before charging (TODO 3)."
    )


@pytest.mark.task(3)
def test_killed_worker_task_is_redelivered_and_charged_once(exercise, process_worker, redis_client):
    lesson = exercise(MODULE)
    order = "order-3"
    first = process_worker(MODULE, concurrency=1, env=SLOW_PROVIDER)
    description = f"charge_order.delay({order!r}, {AMOUNT})"
    result = lesson.charge_order.delay(order, AMOUNT)
    try:
        wait_charging(result, redis_client, order, description)
    finally:
        kill_at_end(first)  # the provider has taken the money; the worker dies before it hears back
    if not message_in_redis(redis_client, result.id):
        fail(
            f"Killed the worker (SIGKILL) while {description} ran; its message is gone from Redis: in neither the "
            "queue nor kombu's 'unacked' hash, so no worker will ever run it again. The worker acknowledged it as "
            "the task started (early ack, Celery's default). Acknowledge late (TODO 1)."
        )
    second = process_worker(MODULE, concurrency=1, env=FAST_RESTORE)
    wait_until(
        lambda: result.ready() or charges(redis_client)[order] > 1,
        WAIT,
        f"Killed the worker while {description} ran, then started a second worker with VISIBILITY_TIMEOUT=1; "
        f"after {WAIT:g} s the task had not run again (state {result.state}, message in "
        f"{message_in_redis(redis_client, result.id) or 'neither the queue nor unacked'}).",
    )
    charged = charges(redis_client)[order]
    assert charged == 1, (
        f"{description}: the provider charged {order!r}, then the worker was killed before the task returned. The "
        f"second worker ran the message again and the provider charged it {charged} times in all, expected once. "
        f"Your key was not there when the worker died (keys in Redis: {idempotency_keys(redis_client)}): claim it "
        "before charging (TODO 3)."
    )
    try:
        ended = f"{description}: the second run had not ended after {WAIT:g} s (state {result.state})."
        wait_until(result.ready, WAIT, ended)
    finally:
        kill_at_end(second)  # nothing left to finish: no need for a warm shutdown
    fail_if_broken(result, f"{description}, run again by the second worker,", own_errors=True)


# --- TODO 4: how long the key lives ----------------------------------------------------


@pytest.mark.task(4)
def test_idempotency_key_outlives_a_redelivery(exercise, thread_worker, redis_client):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    order = "order-9"
    finish(lesson.charge_order.delay(order, AMOUNT), f"charge_order.delay({order!r}, {AMOUNT})")
    keys = idempotency_keys(redis_client)
    if not keys:
        fail(
            f"Ran charge_order({order!r}, {AMOUNT}); no key besides Celery's was written to Redis. "
            "Claim an idempotency key first (TODO 3), then give it an expiry (TODO 4)."
        )
    options = lesson.app.conf.broker_transport_options
    visibility = options.get("visibility_timeout", 3600)
    sweep = options.get("unacked_restore_interval", 10) * options.get("unacked_restore_throttle", 10)
    ttls = {key: redis_client.ttl(key) for key in keys}
    forever = [key for key, ttl in ttls.items() if ttl == -1]
    if forever:
        if lesson.KEY_TTL is None:
            todo = "Set KEY_TTL (TODO 4)"
        else:
            todo = "Pass KEY_TTL as the key's expiry when you claim it (TODO 3)"
        fail(
            f"Ran charge_order({order!r}, {AMOUNT}); the key(s) {forever} never expire: Redis would keep one per "
            f"order forever, in memory (KEY_TTL is {lesson.KEY_TTL!r}). {todo}."
        )
    short = {key: ttl for key, ttl in ttls.items() if ttl < visibility + sweep}
    assert not short, (
        f"Ran charge_order({order!r}, {AMOUNT}); the key(s) expire in {short} s. A worker killed mid-task has its "
        f"message given back only after visibility_timeout ({visibility} s) plus up to one restore sweep ({sweep} s): "
        "by then the key would be gone, and the redelivered task would charge again. Pick a longer KEY_TTL (TODO 4)."
    )
