"""How long grading takes: `grade` per lesson and for the course, and `gradebook` on N submissions.

    .venv/bin/python bench/grade_course.py                 # every lesson in course.toml, 20 copies
    .venv/bin/python bench/grade_course.py --lessons 01 --copies 20

Each measurement is a subprocess, as a learner or an instructor runs it:
- `python -m labkit grade --target solutions --lesson NN`, per lesson, then once for the
  chosen lessons together (wall time; the checks' own time comes from its --junit file);
- `python -m labkit gradebook` on `--copies` submission folders, each holding the reference
  solutions at lessons/<slug>/<file>, graded against a course of the chosen lessons only.

Targets on 2 cores: a lesson's feedback in < 5 s, 20 submissions in < 10 minutes.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labkit.manifest import Lesson, find_lesson, load_course  # noqa: E402

LESSON_TARGET = 5.0  # seconds: a lesson's feedback
BOOK_TARGET = 600.0  # seconds: 20 submissions


def run(command: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_TARGET"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - started, done


def time_grade(lessons: list[Lesson], repeat: int, tmp: Path) -> dict:
    """Median wall time of `grade --target solutions` for these lessons, and what it found."""
    walls, checks_time = [], []
    junit = tmp / "grade.xml"
    command = [sys.executable, "-m", "labkit", "grade", "--target", "solutions", "--junit", str(junit)]
    for lesson in lessons:
        command += ["--lesson", lesson.number]
    for _ in range(repeat):
        wall, done = run(command, timeout=1800)
        walls.append(wall)
        cases = list(ET.parse(junit).getroot().iter("testcase")) if junit.exists() else []
        checks_time.append(sum(float(case.get("time", 0)) for case in cases))
    failing = sum(1 for case in cases if len(case))  # a failure, error or skipped element
    return {
        "wall": statistics.median(walls),
        "checks": statistics.median(checks_time),
        "result": f"{len(cases) - failing}/{len(cases)} pass" + ("" if done.returncode == 0 else f", exit {done.returncode}"),
    }


def course_of(lessons: list[Lesson], dest: Path) -> Path:
    """A course of the chosen lessons only: course.toml (their entries), pyproject.toml, their tests."""
    text = (ROOT / "course.toml").read_text(encoding="utf-8")
    chosen = {lesson.slug for lesson in lessons}
    header, *entries = text.split("\n[[lessons]]\n")
    kept = [e for e in entries if tomllib.loads("[[lessons]]\n" + e)["lessons"][0]["slug"] in chosen]
    (dest / "tests").mkdir(parents=True)
    (dest / "course.toml").write_text(header + "".join("\n[[lessons]]\n" + e for e in kept), encoding="utf-8")
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for lesson in lessons:
        shutil.copy2(lesson.test_file(ROOT), dest / "tests" / lesson.test_file(ROOT).name)
    assert [lesson.slug for lesson in load_course(dest / "course.toml")] == [lesson.slug for lesson in lessons]
    return dest


def time_gradebook(lessons: list[Lesson], copies: int, tmp: Path) -> dict:
    course = course_of(lessons, tmp / "course")
    submissions = tmp / "submissions"
    for index in range(copies):
        for lesson in lessons:
            folder = submissions / f"student{index + 1:02d}" / "lessons" / lesson.slug
            folder.mkdir(parents=True)
            for name in lesson.files:
                shutil.copy2(lesson.folder("solutions", ROOT) / name, folder / name)
    out = tmp / "gradebook"
    command = [sys.executable, "-m", "labkit", "--course", str(course), "gradebook", str(submissions), "--out", str(out)]
    wall, done = run(command, timeout=7200)
    with (out / "gradebook.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    full = sum(row["status"] == "ok" and row["total"] == row["max"] for row in rows)
    result = f"{full}/{copies} full marks" + ("" if done.returncode == 0 else f", exit {done.returncode}")
    return {"wall": wall, "per": wall / copies, "result": result}


def verdict(seconds: float, target: float) -> str:
    return f"< {target:.0f} s: {'yes' if seconds < target else 'NO'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="submissions in the gradebook run (default 20)")
    parser.add_argument("--lessons", nargs="*", help="lesson numbers or slugs (default: all in course.toml)")
    parser.add_argument("--repeat", type=int, default=1, help="grade runs per lesson; the median is shown (default 1)")
    args = parser.parse_args()
    course = load_course(ROOT / "course.toml")
    keys = [key for value in args.lessons or [] for key in value.split(",") if key]
    lessons = [find_lesson(key, course) for key in keys] if keys else course

    print(
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"broker: {os.environ.get('REDIS_URL') or 'embedded'}; lessons: {', '.join(l.number for l in lessons)}\n"
    )
    print("| What | Wall time | Checks' own time | Result | Target |")
    print("|---|---:|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        for lesson in lessons:
            row = time_grade([lesson], args.repeat, Path(tmp))
            print(f"| `grade --lesson {lesson.number}` (solutions) | {row['wall']:.1f} s | {row['checks']:.1f} s | {row['result']} | {verdict(row['wall'], LESSON_TARGET)} |", flush=True)  # fmt: skip
        if len(lessons) > 1:
            row = time_grade(lessons, args.repeat, Path(tmp))
            print(f"| `grade`, {len(lessons)} lessons together (solutions) | {row['wall']:.1f} s | {row['checks']:.1f} s | {row['result']} | |", flush=True)  # fmt: skip
        book = time_gradebook(lessons, args.copies, Path(tmp))
        target = BOOK_TARGET * args.copies / 20
        print(f"| `gradebook`, {args.copies} submissions, 2 at a time | {book['wall']:.1f} s ({book['per']:.1f} s each) | | {book['result']} | {verdict(book['wall'], target)} |")  # fmt: skip


if __name__ == "__main__":
    main()
