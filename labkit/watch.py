"""``watch``: stay in one loop (edit, save, see the next check) until the course is done.

It grades the first lesson that is not done, again on every save of a file in
that lesson's folder, and moves to the next lesson once this one passes and the
learner presses Enter (so an accidental save never skips ahead).

File events do not fire on some setups (WSL, network drives): ``--poll`` polls
the files instead, and ``--manual`` grades only when Enter is pressed. Enter
also grades at once in the default mode.

Grades run in a warm grader (labkit/warm.py: the libraries already imported, each
grade a fork of that process) on an embedded broker started before the save, so
feedback comes about 2 s sooner than with ``grade``.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

import watchfiles

from labkit.grade import LessonResult
from labkit.manifest import Lesson, load_course
from labkit.settings import Settings
from labkit.progress import Progress
from labkit.report import console, describe_failure
from labkit.warm import WarmSession

QUIT, GRADE = "quit", "grade"


class Keyboard:
    """Lines typed by the learner, read on a thread so file events can be watched meanwhile."""

    def __init__(self) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.typed = threading.Event()
        self.closed = threading.Event()  # no keyboard (stdin closed): file events only
        threading.Thread(target=self._read, name="labkit-keyboard", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            self.lines.put(line.strip().lower())
            self.typed.set()
        self.closed.set()
        self.lines.put("q")  # wakes a waiting next_line(): nobody can press Enter any more

    def next_line(self) -> str:
        line = self.lines.get()
        if self.lines.empty():
            self.typed.clear()
        return line


def progress_line(lessons: list[Lesson], progress: Progress) -> str:
    done = sum(progress.status(lesson.slug) == "done" for lesson in lessons)
    width = 24
    filled = round(width * done / len(lessons))
    return f"Course [{'#' * filled}{'.' * (width - filled)}] {done}/{len(lessons)} lessons done"


def show(result: LessonResult, lessons: list[Lesson], progress: Progress) -> None:
    console.rule(f"Lesson {result.lesson.number}: {result.lesson.title}")
    console.print(progress_line(lessons, progress), markup=False)
    console.print(f"Lesson {result.lesson.number}: {result.passed}/{len(result.checks)} checks pass", markup=False)
    if result.done:
        return
    check = result.first_failure
    if check is None:
        console.print(f"Next: lesson {result.lesson.number} could not be graded: {result.problem}", markup=False)
    else:
        console.print("Next: " + describe_failure(result, check), markup=False)


def wait_for_change(folder: Path, keyboard: Keyboard, poll: bool, manual: bool) -> str:
    """Block until a .py file in ``folder`` is saved, or a line is typed; return what to do."""
    if not manual:
        console.print(f"[dim]Watching lessons/{folder.name}/ (save a file, or press Enter to grade now; q + Enter quits)[/]")
        stop = threading.Event()
        if not keyboard.closed.is_set():
            threading.Thread(target=lambda: (keyboard.typed.wait(), stop.set()), daemon=True).start()
        for changes in watchfiles.watch(folder, stop_event=stop, force_polling=poll, watch_filter=_python_files):
            if changes:
                stop.set()
                return GRADE
    else:
        console.print("[dim]Press Enter to grade again (q + Enter quits).[/]")
    return QUIT if keyboard.next_line() == "q" else GRADE


def _stamp(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*.py")}


def _python_files(change: watchfiles.Change, path: str) -> bool:
    return path.endswith(".py")


def run(settings: Settings, poll: bool = False, manual: bool = False) -> int:
    # Between saves a warm grader and the next grade's broker wait, ready (labkit/warm.py).
    with WarmSession(settings, note=lambda text: console.print(text, style="dim", markup=False)) as warm:
        return _watch(settings.course, poll, manual, warm)


def _watch(root: Path, poll: bool, manual: bool, warm: WarmSession) -> int:
    lessons = load_course(root / "course.toml")
    progress = Progress(root)
    keyboard = Keyboard()
    index = next((i for i, lesson in enumerate(lessons) if progress.status(lesson.slug) != "done"), 0)
    while True:
        lesson = lessons[index]
        before = _stamp(lesson.folder("lessons", root))
        console.print(f"[dim]Grading lesson {lesson.number}…[/]")
        (result,) = warm.grade((lesson.slug,))
        progress.record([result])
        show(result, lessons, progress)
        warm.prepare()  # the next grade's broker starts while the learner reads
        if result.done:
            if index == len(lessons) - 1:
                console.print("[green]Every lesson is done. Congratulations![/]")
                return 0
            following = lessons[index + 1]
            console.print(
                f"[green]Lesson {lesson.number} is done.[/] Press Enter to move on to lesson "
                f"{following.number} ({following.title}), or q + Enter to stop here."
            )
            if keyboard.next_line() == "q":
                return 0
            index += 1
            continue
        if not manual and _stamp(lesson.folder("lessons", root)) != before:
            console.print("[dim]A file changed while grading: grading again.[/]")
            continue
        if wait_for_change(lesson.folder("lessons", root), keyboard, poll, manual) == QUIT:
            return 1
