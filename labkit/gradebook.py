"""``gradebook``: grade a folder of student submissions, two at a time.

Each submission (a folder, or a .zip of one) is graded in a fresh workspace:
the course's own course.toml, pytest settings and tests (or the instructor's
``--tests``), plus only the student's exercise files, the ones course.toml
lists. A student's edited tests or harness are never used, and nothing is
written into the submissions. Each grading runs in its own subprocess, with
its own embedded broker, a time limit and a memory cap.

This is NOT a security sandbox: student code runs as you, with your files and
network. For untrusted code, run the gradebook inside a throwaway container or
VM, as an unprivileged user, without network access.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from labkit.manifest import Lesson, load_course
from labkit.settings import LABKIT_HOME

JOBS = 2  # two at a time on a two-core machine


@dataclass
class Limits:
    seconds: float = 600.0  # per submission
    memory_mb: int = 2048  # address space per process


@dataclass
class Submission:
    name: str
    path: Path  # a folder or a .zip


def find_submissions(folder: Path, skip: Path | None = None) -> list[Submission]:
    found = []
    for path in sorted(folder.iterdir()):
        if skip is not None and path.resolve() == skip.resolve():
            continue  # the gradebook's own output folder
        if path.is_dir() and not path.name.startswith("."):
            found.append(Submission(path.name, path))
        elif path.suffix == ".zip":
            found.append(Submission(path.stem, path))
    return found


def _unpack(submission: Submission, into: Path) -> Path:
    """The folder holding the submission's lessons/ (zip archives are extracted safely)."""
    if submission.path.is_dir():
        source = submission.path
    else:
        source = into / "unzipped"
        with zipfile.ZipFile(submission.path) as archive:
            for member in archive.namelist():
                target = (source / member).resolve()
                if not target.is_relative_to(source.resolve()):
                    raise ValueError(f"unsafe path in zip: {member}")
            archive.extractall(source)
    candidates = [source, *sorted(p for p in source.iterdir() if p.is_dir())] if source.exists() else []
    return next((c for c in candidates if (c / "lessons").is_dir()), source)


def build_workspace(submission: Submission, workspace: Path, tests: Path | None, course: Path) -> None:
    """Course files from the course, exercise files from the student: nothing else."""
    for name in ("course.toml", "pyproject.toml"):
        shutil.copy2(course / name, workspace / name)
    shutil.copytree(tests or course / "tests", workspace / "tests", ignore=shutil.ignore_patterns("labkit", "__pycache__"))
    student = _unpack(submission, workspace)
    for lesson in load_course(course / "course.toml"):
        folder = workspace / "lessons" / lesson.slug
        folder.mkdir(parents=True)
        for name in lesson.files:
            theirs = student / "lessons" / lesson.slug / name
            if theirs.is_file() and not theirs.is_symlink():
                shutil.copy2(theirs, folder / name)


def _limit_memory(megabytes: int):
    def apply() -> None:  # runs in the child before exec
        cap = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return apply


def grade_submission(submission: Submission, tests: Path | None, limits: Limits, course: Path) -> dict:
    """One row of the gradebook: status ok | timeout | error, and the grader's JSON."""
    with tempfile.TemporaryDirectory(prefix=f"labkit-gradebook-{submission.name}-") as tmp:
        workspace = Path(tmp) / "course"
        workspace.mkdir()
        try:
            build_workspace(submission, workspace, tests, course)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            return {"student": submission.name, "status": "error", "problem": f"could not read the submission: {exc}"}
        output, log = Path(tmp) / "results.json", Path(tmp) / "grade.log"
        command = [sys.executable, "-m", "labkit", "grade", "--json"]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABKIT_TARGET")}  # the embedded broker, lessons/
        env.update(LABKIT_COURSE=str(workspace), PYTHONPATH=str(LABKIT_HOME))
        with output.open("wb") as out, log.open("wb") as err:
            process = subprocess.Popen(
                command, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, preexec_fn=_limit_memory(limits.memory_mb),
            )  # fmt: skip
            try:
                process.wait(limits.seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"student": submission.name, "status": "timeout", "problem": f"grading took longer than {limits.seconds:.0f} s"}
        try:
            graded = json.loads(output.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            tail = log.read_bytes()[-600:].decode("utf-8", "replace").strip()
            return {"student": submission.name, "status": "error", "problem": f"the grader crashed (exit {process.returncode}): {tail}"}
    return {"student": submission.name, "status": "ok", "problem": "", **graded}


def public_check_names(course: Path) -> set[str]:
    """Names of the checks in the course's public tests (a parametrized check counts once)."""
    names = set()
    for path in (course / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return names


def feedback(row: dict, public: set[str]) -> str:
    lines = [f"# Feedback for {row['student']}", ""]
    if row["status"] != "ok":
        return "\n".join([*lines, f"Not graded ({row['status']}): {row['problem']}", ""])
    checks = [check for lesson in row["lessons"] for check in lesson["checks"]]
    shown = [check for check in checks if check["name"].split("[")[0] in public]
    hidden = len(checks) - len(shown)
    passed = sum(check["status"] == "passed" for check in shown)
    lines.append(f"Public checks passed: {passed}/{len(shown)}.")
    if hidden:
        lines.append(f"Your grade also includes {hidden} hidden check(s), not listed here.")
    lines.append(f"Points: {row['points']}/{row['max_points']}.")
    failing = [check for check in shown if check["status"] != "passed"]
    if failing:
        lines += ["", "## Checks to fix", ""]
        for check in failing:
            todo = f", TODO {check['todo']}" if check["todo"] is not None else ""
            lines.append(f"- {check['lesson']}{todo} ({check['name']}): {check['message'] or check['status']}")
    return "\n".join([*lines, ""])


def write_outputs(rows: list[dict], lessons: list[Lesson], out: Path, public: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda row: row["student"])
    (out / "gradebook.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with (out / "gradebook.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["student", "status", *(lesson.slug for lesson in lessons), "total", "max"])
        for row in rows:
            if row["status"] != "ok":  # blank, not 0: a timeout is no score, and must not skew averages
                writer.writerow([row["student"], row["status"], *([""] * len(lessons)), "", ""])
                continue
            by_slug = {lesson["lesson"]: lesson["points"] for lesson in row["lessons"]}
            writer.writerow([row["student"], "ok", *(by_slug.get(l.slug, 0) for l in lessons), row["points"], row["max_points"]])
    feedback_dir = out / "feedback"
    feedback_dir.mkdir(exist_ok=True)
    for row in rows:
        (feedback_dir / f"{row['student']}.md").write_text(feedback(row, public), encoding="utf-8")


def run(
    submissions: Path,
    out: Path,
    course: Path,
    tests: Path | None = None,
    student: str | None = None,
    limits: Limits = Limits(),
    progress=print,
) -> list[dict]:
    chosen = find_submissions(submissions, skip=out)
    if student:
        chosen = [s for s in chosen if s.name == student]
        if not chosen:
            raise LookupError(f"no submission named {student!r} in {submissions}")
    previous = []
    if student and (out / "gradebook.json").exists():
        previous = [row for row in json.loads((out / "gradebook.json").read_text(encoding="utf-8")) if row["student"] != student]

    def grade_one(submission: Submission) -> dict:
        row = grade_submission(submission, tests, limits, course)
        score = f"{row['points']}/{row['max_points']} points" if row["status"] == "ok" else row["problem"]
        progress(f"{row['student']}: {row['status']}, {score}")
        return row

    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        rows = list(pool.map(grade_one, chosen))
    write_outputs(previous + rows, load_course(course / "course.toml"), out, public_check_names(course))
    return rows
