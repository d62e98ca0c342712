"""Run a lesson's graded checks in a pytest subprocess and read back what happened.

Points live on the checks (``@pytest.mark.points(n)``, default 1); a lesson's
total is the sum over its checks, worked out here and nowhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from labkit.manifest import Lesson, find_lesson, load_course
from labkit.settings import LABKIT_HOME, Settings


@dataclass
class CheckResult:
    lesson: str  # the lesson's slug
    name: str  # the test function, e.g. test_add_returns_the_sum
    todo: int | None  # the TODO it grades (@pytest.mark.task)
    points: int
    status: str = "not run"  # passed | failed | error | skipped | not run
    message: str = ""  # one or two plain lines for the student
    output: str = ""  # captured output of a failing check (shown with -v)
    detail: str = ""  # pytest's own report (shown with -v)
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class LessonResult:
    lesson: Lesson
    checks: list[CheckResult] = field(default_factory=list)
    problem: str = ""  # why the checks could not run at all (a collection error, a timeout)

    @property
    def passed(self) -> int:
        return sum(check.passed for check in self.checks)

    @property
    def points(self) -> tuple[int, int]:
        return sum(c.points for c in self.checks if c.passed), sum(c.points for c in self.checks)

    @property
    def done(self) -> bool:
        return bool(self.checks) and not self.problem and self.passed == len(self.checks)

    @property
    def first_failure(self) -> CheckResult | None:
        return next((c for c in self.checks if not c.passed), None)


def pytest_command(test_files: list[Path], target: str, broker_url: str | None, results: Path, root: Path) -> list[str]:
    command = [
        sys.executable, "-m", "pytest", *map(str, test_files),
        f"--target={target}", "-p", "labkit.collect", f"--labkit-results={results}",
        "-q", "--no-header", "-p", "no:cacheprovider", f"--rootdir={root}",
    ]  # fmt: skip
    if broker_url:
        command.append(f"--broker={broker_url}")
    return command


def grade_course(
    settings: Settings, keys: tuple[str, ...] = (), run: Callable[[list[str], Path, Path, float], str] | None = None
) -> list[LessonResult]:
    """Grade the lessons named by ``keys`` (all when empty) in one pytest run.

    What is graded and where come from ``settings``: the course, the target tree,
    the broker (``redis_url``, else the embedded one) and the run's time limit.
    ``run`` runs the pytest command instead of ``_run`` (same arguments and answer):
    ``labkit.warm.WarmSession.run`` runs it in the warm grader.
    """
    root = settings.course
    course = load_course(root / "course.toml")
    lessons = [find_lesson(key, course) for key in keys] if keys else course
    graded = {lesson.slug: LessonResult(lesson) for lesson in lessons}
    by_file = {path.name: graded[lesson.slug] for lesson in lessons for path in lesson.test_files(root)}
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        results = Path(tmp) / "results.jsonl"
        results.touch()
        test_files = [path for lesson in lessons for path in lesson.test_files(root)]
        command = pytest_command(test_files, settings.target, settings.redis_url, results, root)
        problem = (run or _run)(command, root, Path(tmp) / "pytest.log", settings.grade_timeout)
        _read(results, by_file)
    for result in graded.values():
        if problem and not result.problem and any(c.status == "not run" for c in result.checks):
            result.problem = problem
        if not result.checks and not result.problem:
            result.problem = f"no checks found in tests/{result.lesson.test_file(root).name}"
    return list(graded.values())


def _run(command: list[str], root: Path, log: Path, timeout: float) -> str:
    """Run pytest; return what went wrong with the run itself ('' when it ended normally).

    Its output goes to a file, not to memory: a student's task may print megabytes.
    """
    env = {**os.environ, "PYTHONPATH": str(LABKIT_HOME)}  # grade with this very labkit
    with log.open("wb") as out:
        try:
            returncode = subprocess.run(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return run_problem(0, True, log, timeout)
    return run_problem(returncode, False, log, timeout)


def run_problem(returncode: int, timed_out: bool, log: Path, timeout: float) -> str:
    """What went wrong with a grading run, in one sentence ('' when it ended normally)."""
    if timed_out:
        return f"the grading run was stopped after {timeout:.0f} s"
    if returncode in (0, 1):  # all passed / some checks failed
        return ""
    with log.open("rb") as out:
        out.seek(max(0, log.stat().st_size - 2000))
        tail = out.read().decode("utf-8", "replace").strip().splitlines()[-3:]
    return f"the grading run ended early (exit {returncode}): " + " ".join(tail)


def _read(results: Path, by_file: dict[str, LessonResult]) -> None:
    checks: dict[str, CheckResult] = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == "collected" and record["file"] in by_file:
            check = CheckResult(
                lesson=by_file[record["file"]].lesson.slug, name=record["name"], todo=record["todo"], points=record["points"]
            )
            checks[record["nodeid"]] = check
            by_file[record["file"]].checks.append(check)
        elif record["kind"] == "collect-error" and record["file"] in by_file:
            by_file[record["file"]].problem = record["message"]
        elif record["kind"] == "result" and record["nodeid"] in checks:
            check = checks[record["nodeid"]]
            for key in ("status", "message", "output", "detail", "duration"):
                setattr(check, key, record[key])
