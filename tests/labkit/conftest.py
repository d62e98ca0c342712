"""Fixtures shared by test_cli.py and test_gradebook.py: a self-contained copy of the course.

The copy holds lesson 01 only, taken from git's HEAD (the working tree when git
has no copy), so lessons being written right now in the same tree never leak in.
Commands run with the copy as their current folder: labkit finds the course
there (the nearest course.toml, from the current folder up), so every command
(``list``, ``hint``, ``reset``, ``solution`` included) works on the copy as on a
learner's checkout, and nothing it starts ever reads or writes this repository.
labkit itself comes from this repository (no copy of it in the course).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from labkit.settings import LABKIT_HOME

ROOT = Path(__file__).resolve().parents[2]  # this repository

SLUG = "01_first_task"
COURSE_FILES = (
    "pyproject.toml",
    f"tests/test_{SLUG}.py",
    f"lessons/{SLUG}/first_task1.py",
    f"lessons/{SLUG}/hints.md",
    f"lessons/{SLUG}/README.md",
    f"solutions/{SLUG}/first_task1.py",
)
CLEARED_ENV = ("REDIS_URL", "LABKIT_TARGET", "LABKIT_COURSE", "LABKIT_GRADE_TIMEOUT", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "COLUMNS")


def _committed(path: str) -> str | None:
    try:
        shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 else None


def _lesson_01_manifest() -> str:
    """course.toml's header and its lesson 01 entry, nothing else."""
    text = _committed("course.toml") or (ROOT / "course.toml").read_text(encoding="utf-8")
    header, *entries = re.split(r"(?m)^(?=\[\[lessons\]\]\s*$)", text)
    (entry,) = [e for e in entries if tomllib.loads(e)["lessons"][0]["slug"] == SLUG]
    manifest = header + entry.rstrip() + "\n"
    assert [lesson["slug"] for lesson in tomllib.loads(manifest)["lessons"]] == [SLUG]
    return manifest


def build_course(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "course.toml").write_text(_lesson_01_manifest(), encoding="utf-8")
    for path in COURSE_FILES:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        text = _committed(path)
        target.write_text(text if text is not None else (ROOT / path).read_text(encoding="utf-8"), encoding="utf-8")
    return dest


def labkit_env(course: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    return {**env, "PYTHONPATH": str(LABKIT_HOME)}


def run_labkit(course: Path, *args: str, timeout: float = 120, input: str | None = None, env: dict | None = None):
    """``python -m labkit ARGS`` in ``course``, as a learner types it; every process it started is
    killed (its whole process group) if it outlives ``timeout``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "labkit", *args], cwd=course, env=env or labkit_env(course), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=10)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class Kit:
    """What both test files need: build a course copy, run ``python -m labkit`` in it, its env."""

    def __init__(self) -> None:
        self.checked: set[Path] = set()

    def build(self, dest: Path) -> Path:
        course = build_course(dest)
        if course not in self.checked:  # never let a command run on the real repository by mistake
            shown = subprocess.run(
                [sys.executable, "-c", "from labkit.settings import Settings; print(Settings.from_env().course)"],
                cwd=course, env=labkit_env(course), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert Path(shown.stdout.strip()) == course, f"python -m labkit in {course} is not the copy: {shown}"
            self.checked.add(course)
        return course

    run = staticmethod(run_labkit)
    env = staticmethod(labkit_env)


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit()


@pytest.fixture
def course_copy(tmp_path: Path, kit: Kit) -> Path:
    """A minimal course in tmp_path: lesson 01 only, its starter, solution, hints, tests; no .git."""
    return kit.build(tmp_path / "course")


@pytest.fixture
def labkit_cli(course_copy: Path, kit: Kit):
    """``labkit_cli("grade", "--json")`` runs ``python -m labkit`` on ``course_copy``."""

    def run(*args: str, **options):
        return kit.run(course_copy, *args, **options)

    return run
