"""How long grading takes: `watch` per save, `grade` per lesson and for the course, and `gradebook` on N submissions.

    .venv/bin/python bench/grade_course.py                 # every lesson in course.toml, 20 copies
    .venv/bin/python bench/grade_course.py --lessons 01 --copies 20
    .venv/bin/python bench/grade_course.py --saves 5 --copies 0   # watch and grade only

Each measurement is a subprocess, as a learner or an instructor runs it:
- watch, save -> feedback (warm): `python -m labkit watch` on a course of that lesson alone,
  starter code in place; once it is watching, the reference solution is saved into the
  lesson folder `--read` seconds (default 2) after watch showed the starter's feedback,
  and the time until watch prints "N/N checks pass" is taken. One watch
  session per save (a passing lesson ends the session); the median of `--saves` is shown.
  Its warm grader and broker were started with the session, as for a learner;
- `python -m labkit grade --target solutions --lesson NN`, per lesson (the cold way: what
  watch paid per save before labkit/warm.py), then once for the chosen lessons together
  (wall time; the checks' own time comes from its --junit file);
- the chosen lessons together through a warm grader (labkit.warm.WarmSession, started and
  ready beforehand): the same pytest run, forked from the warm process, on a fresh broker;
- `python -m labkit gradebook` on `--copies` submission folders, each holding the reference
  solutions at lessons/<slug>/<file>, graded against a course of the chosen lessons only.

Targets on 2 cores: watch feedback in < 3 s, a lesson's `grade` in < 5 s, 20 submissions
in < 10 minutes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labkit.manifest import Lesson, find_lesson, load_course  # noqa: E402
from labkit.settings import Settings  # noqa: E402
from labkit.warm import WarmSession  # noqa: E402

WATCH_TARGET = 3.0  # seconds: watch, save -> feedback
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


class WatchSession:
    """`python -m labkit watch` on ``course``; its output lines, each with the time it arrived."""

    def __init__(self, course: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("LABKIT_TARGET", "LABKIT_COURSE", "REDIS_URL")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labkit", "watch"], cwd=course, env={**env, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend((time.monotonic(), line) for line in self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [at for at, line in list(self.lines) if needle in line]
            if len(hits) >= count:
                return hits[count - 1]
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.005)
        raise RuntimeError(f"watch never printed {needle!r} (#{count}):\n" + "".join(line for _, line in self.lines))

    def watching(self, timeout: float = 30) -> None:
        """Until its file watcher (an inotify descriptor) exists: a save before that is missed."""
        deadline = time.monotonic() + timeout
        fdinfo = Path(f"/proc/{self.process.pid}/fdinfo")
        while time.monotonic() < deadline:
            for entry in fdinfo.iterdir() if fdinfo.is_dir() else ():
                try:
                    if "inotify wd:" in entry.read_text():
                        return
                except OSError:
                    pass
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process.stdin.close()
        self.reader.join(10)


def time_watch(lesson: Lesson, saves: int, tmp: Path, read: float) -> dict:
    """Median seconds from saving the solution to watch's feedback, one watch session per save."""
    course = course_of([lesson], tmp / f"watch-{lesson.slug}")
    folder = course / "lessons" / lesson.slug
    feedback, shown = [], ""
    for _ in range(saves):
        shutil.rmtree(course / ".labkit", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(lesson.folder("lessons", ROOT), folder, ignore=shutil.ignore_patterns("__pycache__"))
        session = WatchSession(course)
        try:
            session.wait_for(f"Watching lessons/{lesson.slug}/")  # the starter was graded
            session.watching()
            time.sleep(read)  # the learner reads the feedback and edits; meanwhile the next broker starts
            saved = time.monotonic()
            for name in lesson.files:
                shutil.copyfile(lesson.folder("solutions", ROOT) / name, folder / name)
            feedback.append(session.wait_for("checks pass", 2) - saved)
            shown = [line for _, line in session.lines if "checks pass" in line][1].strip()
        finally:
            session.stop()
    return {"median": statistics.median(feedback), "all": feedback, "result": shown.removeprefix(f"Lesson {lesson.number}: ")}


def time_warm_grade(lessons: list[Lesson], repeat: int) -> dict:
    """Median seconds of one grading run of these lessons through a warm grader that is ready."""
    walls = []
    with WarmSession(Settings(course=ROOT)) as warm:
        for _ in range(repeat):
            warm.prepare()
            time.sleep(1.0)  # the learner reads; the next broker starts meanwhile
            started = time.perf_counter()
            results = warm.grade(tuple(lesson.slug for lesson in lessons), target="solutions")
            walls.append(time.perf_counter() - started)
    passed, total = sum(r.passed for r in results), sum(len(r.checks) for r in results)
    return {"wall": statistics.median(walls), "result": f"{passed}/{total} pass"}


def verdict(seconds: float, target: float) -> str:
    return f"< {target:.0f} s: {'yes' if seconds < target else 'NO'}"


def time_worker_stops(tmp: Path) -> dict:
    """Seconds to stop an idle process worker: the default stop (a kill) and a warm shutdown."""
    from labkit.broker import broker_process
    from labkit.workers import process_worker

    folder = tmp / "stop-probe"
    folder.mkdir()
    (folder / "stop_probe.py").write_text('import os\nfrom celery import Celery\napp = Celery("stop_probe", broker=os.environ["REDIS_URL"])\n')
    with broker_process() as url:
        env = {"REDIS_URL": url}
        with process_worker("stop_probe", folder, concurrency=1, env=env) as worker:
            started = time.perf_counter()
        killed = time.perf_counter() - started
        with process_worker("stop_probe", folder, concurrency=1, env=env) as worker:
            warm = worker.stop_warm(timeout=15)
    return {"kill": killed, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="submissions in the gradebook run (default 20; 0 skips it)")
    parser.add_argument("--lessons", nargs="*", help="lesson numbers or slugs (default: all in course.toml)")
    parser.add_argument("--repeat", type=int, default=1, help="grade runs per lesson; the median is shown (default 1)")
    parser.add_argument("--saves", type=int, default=5, help="watch saves per lesson; the median is shown (default 5; 0 skips)")
    parser.add_argument("--read", type=float, default=2.0, help="seconds between watch's feedback and the save (default 2)")
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a learner's machine: compiled (and assert-rewritten) files are kept
    course = load_course(ROOT / "course.toml")
    keys = [key for value in args.lessons or [] for key in value.split(",") if key]
    lessons = [find_lesson(key, course) for key in keys] if keys else course

    print(
        f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}, "
        f"broker: {os.environ.get('REDIS_URL') or 'embedded'}; lessons: {', '.join(l.number for l in lessons)}\n"
    )
    print("| What | Cold | Warm | Result | Target |")
    print("|---|---:|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        for lesson in lessons:
            cold = time_grade([lesson], args.repeat, Path(tmp))
            warm = time_watch(lesson, args.saves, Path(tmp), args.read) if args.saves else None
            shown = f"{warm['median']:.1f} s ({' '.join(f'{s:.1f}' for s in warm['all'])})" if warm else "-"
            target = verdict(warm["median"], WATCH_TARGET) if warm else verdict(cold["wall"], LESSON_TARGET)
            print(f"| lesson {lesson.number}: save -> feedback (cold: `grade --lesson {lesson.number}`; warm: `watch`, median of {args.saves} saves) | {cold['wall']:.1f} s | {shown} | {cold['result']}; watch: {warm['result'] if warm else '-'} | {target} |", flush=True)  # fmt: skip
        if len(lessons) > 1:
            cold = time_grade(lessons, args.repeat, Path(tmp))
            warm = time_warm_grade(lessons, args.repeat)
            print(f"| {len(lessons)} lessons together (cold: `grade`; warm: the warm grader, ready) | {cold['wall']:.1f} s | {warm['wall']:.1f} s | {cold['result']}; warm: {warm['result']} | |", flush=True)  # fmt: skip
        stops = time_worker_stops(Path(tmp))
        print(f"| a `celery worker` process (prefork, 1 slot) stopped at a check's end: kill / warm shutdown | {stops['kill']:.2f} s | {stops['warm']:.2f} s | | < 0.5 s / bounded |", flush=True)  # fmt: skip
        if args.copies:
            book = time_gradebook(lessons, args.copies, Path(tmp))
            target = BOOK_TARGET * args.copies / 20
            print(f"| `gradebook`, {args.copies} submissions, 2 at a time | {book['wall']:.1f} s ({book['per']:.1f} s each) | | {book['result']} | {verdict(book['wall'], target)} |")  # fmt: skip


if __name__ == "__main__":
    main()
