"""The warm grader (labkit/warm.py): quick, and each grade as isolated as a cold one.

Most checks grade a tiny course, "probe", whose first check reports what its grade
found before doing anything (Redis keys in every database, connected clients, loaded
modules, Celery apps, marks left on a library and in the environment); the second
starts a `python -m` server as uvicorn is started, runs its task on a worker and
leaves such traces behind on purpose, for the next grade to (not) find.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labkit.checks import wait_until
from labkit.grade import grade_course
from labkit.settings import Settings

ROOT = Path(__file__).resolve().parents[2]  # this repository
from labkit.warm import WarmSession

SLUG = "01_probe"

PROBE_MODULE = '''
import os
from celery import Celery

VERSION = {version!r}
app = Celery("probe1", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])


@app.task(name="probe1.version_{version}")
def version():
    return VERSION
'''

PROBE_CHECKS = '''
import json, os, subprocess, sys, time
import celery, celery._state, redis
from labkit.procs import ChildProcess


def report(**values):
    with open(os.environ["PROBE_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps(values) + "\\n")


def test_what_the_grade_found_and_leaves(broker_url):
    report(pid=os.getpid())
    with redis.Redis.from_url(broker_url) as client:
        clients = len(client.client_list())  # this one only
        keys = {}
        for db in range(16):
            client.execute_command("SELECT", db)
            keys.update({db: sorted(k.decode() for k in client.keys())} if client.dbsize() else {})
    report(found={
        "keys": keys,
        "clients": clients,
        "modules": sorted(name for name in sys.modules if name.startswith("probe")),
        "apps": sorted(app.main or "?" for app in celery._state._apps),
        "library_mark": getattr(celery, "probe_mark", None),
        "environment_mark": os.environ.get("PROBE_MARK"),
    })


def test_run_the_task_and_leave_traces(exercise, thread_worker, broker_url):
    lesson = exercise("probe1")
    command = [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"]
    with ChildProcess(command, name="probe server", ready="Serving HTTP") as server:  # as uvicorn is started
        with open(f"/proc/{server.pid}/stat") as stat:
            parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        report(server=server.pid, server_parent=parent, grade_parent=os.getppid())
        if os.environ.get("PROBE_HANG") == "loop":
            report(sleeper=subprocess.Popen(["sleep", "300"]).pid)  # in the grade's process group
            while True:
                pass
    report(server_exit=server.returncode)
    thread_worker(lesson.app)
    value = lesson.version.delay().get(timeout=10)
    report(value=value, tasks=sorted(name for name in lesson.app.tasks if name.startswith("probe1.")))
    for db in (0, 15):
        with redis.Redis.from_url(broker_url, db=db) as client:
            client.set(f"probe:left-by-{value}", 1)
    celery.probe_mark = value
    os.environ["PROBE_MARK"] = str(value)
    sys.modules["probe_left_module"] = sys.modules["probe1"]
'''


def write_probe(course: Path, version: int | str = 1, body: str | None = None) -> None:
    path = course / "lessons" / SLUG / "probe1.py"
    path.write_text(body if body is not None else PROBE_MODULE.format(version=version), encoding="utf-8")


@pytest.fixture(scope="module")
def probe_course(tmp_path_factory) -> Path:
    course = tmp_path_factory.mktemp("probe")
    (course / "course.toml").write_text(
        f'format_version = 1\n\n[[lessons]]\nslug = "{SLUG}"\ntitle = "Probe"\nfiles = ["probe1.py"]\n', encoding="utf-8"
    )
    shutil.copy2(ROOT / "pyproject.toml", course / "pyproject.toml")
    (course / "tests").mkdir()
    (course / "tests" / f"test_{SLUG}.py").write_text(PROBE_CHECKS, encoding="utf-8")
    (course / "lessons" / SLUG).mkdir(parents=True)
    write_probe(course)
    return course


@pytest.fixture(scope="module")
def notes() -> list[str]:
    return []


@pytest.fixture(scope="module")
def warm(probe_course: Path, notes: list[str]):
    """One warm session for this file, on the probe course."""
    with WarmSession(Settings(course=probe_course), note=notes.append) as session:
        yield session


@pytest.fixture
def probe_out(tmp_path: Path, monkeypatch) -> Path:
    out = tmp_path / "probe.jsonl"
    monkeypatch.setenv("PROBE_OUT", str(out))
    return out


def reported(out: Path) -> dict:
    values: dict = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        values.update(json.loads(line))
    return values


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # dead, waiting for init to reap it


def grade(warm: WarmSession, out: Path):
    out.unlink(missing_ok=True)
    (result,) = warm.grade((SLUG,))
    warm.prepare()
    return result, reported(out)


NOTHING = {"keys": {}, "clients": 1, "modules": [], "apps": [], "library_mark": None, "environment_mark": None}


def test_each_grade_sees_the_code_saved_and_nothing_of_the_grade_before(warm, probe_course, probe_out, notes):
    grader = warm.grader.pid
    first, seen = grade(warm, probe_out)
    assert first.done, first.problem or [(c.name, c.message) for c in first.checks]
    assert seen["found"] == NOTHING
    assert (seen["value"], seen["tasks"]) == (1, ["probe1.version_1"])
    # a `python -m` process the grade started was forked from the warm grader, and stopped as usual
    assert seen["server_parent"] == seen["grade_parent"] == grader and seen["server_exit"] == -signal.SIGTERM

    write_probe(probe_course, version=22)  # saved again: new code, a new task name
    second, seen = grade(warm, probe_out)
    assert second.done, second.problem or [(c.name, c.message) for c in second.checks]
    assert seen["found"] == NOTHING  # no key, client, module, app or mark left by the first grade
    assert (seen["value"], seen["tasks"]) == (22, ["probe1.version_22"])  # the saved code, not a cached module
    assert warm.grader.pid == grader and notes == []  # both went through the same warm grader


def test_a_grade_that_never_ends_is_killed_and_the_next_one_runs(warm, probe_course, probe_out, monkeypatch, notes):
    grader = warm.grader.pid
    monkeypatch.setattr(warm, "timeout", 2.0)
    for hang, body in (("import", "while True:\n    pass\n"), ("loop", None)):  # at import; in a check
        monkeypatch.setenv("PROBE_HANG", hang)
        write_probe(probe_course, version=3, body=body)
        started = time.monotonic()
        stuck, seen = grade(warm, probe_out)
        assert time.monotonic() - started < 10
        assert stuck.problem == "the grading run was stopped after 2 s"
        started_by_grade = (seen["pid"], seen.get("sleeper"), seen.get("server"))  # the grade, what it started
        for pid in filter(None, started_by_grade):
            wait_until(lambda: gone(pid), 5, f"process {pid} of the stopped grade still runs")

    monkeypatch.delenv("PROBE_HANG")
    write_probe(probe_course, version=4)
    after, seen = grade(warm, probe_out)
    assert after.done and seen["value"] == 4 and seen["found"] == NOTHING
    assert warm.grader.pid == grader and notes == []


def test_warm_results_equal_cold_results_for_lesson_01_solutions(warm, notes):
    with ThreadPoolExecutor(1) as pool:  # side by side: the checks mostly wait
        cold = pool.submit(grade_course, Settings(course=ROOT, target="solutions"), ("01",))
        warmed = warm.grade(("01",), target="solutions", course=ROOT)
        cold = cold.result()
    shown = lambda results: [(c.name, c.status, c.message) for r in results for c in r.checks]  # noqa: E731
    assert shown(warmed) == shown(cold)
    assert all(r.done for r in warmed) and notes == []


def test_when_the_warm_grader_dies_the_grade_runs_cold_with_a_note(warm, probe_course, probe_out, notes, monkeypatch):
    monkeypatch.setattr(warm, "restarts", 0)  # watch would start a new one for the next grade (2 s here)
    write_probe(probe_course, version=5)
    os.kill(warm.grader.pid, signal.SIGKILL)
    result, seen = grade(warm, probe_out)
    assert result.done and seen["value"] == 5 and seen["found"] == NOTHING
    assert len(notes) == 1 and "grading the slow way" in notes[0], notes
    assert warm.grader is None
