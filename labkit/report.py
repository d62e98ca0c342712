"""Print grading results: one row per lesson, then the next thing to do."""

from __future__ import annotations

import difflib
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from labkit.grade import CheckResult, LessonResult
from labkit.manifest import Lesson
from labkit.progress import Progress

console = Console(highlight=False)


def status_of(result: LessonResult) -> str:
    if result.problem and not result.checks:
        return "[red]cannot run[/]"
    if result.done:
        return "[green]done[/]"
    if result.passed == 0:
        return "[yellow]not started[/]"
    return "[yellow]in progress[/]"


def describe_failure(result: LessonResult, check: CheckResult) -> str:
    """Which lesson, which TODO, what was expected and what happened: one or two lines."""
    todo = f", TODO {check.todo}" if check.todo is not None else ""
    where = f"Lesson {result.lesson.number}{todo} ({check.name})"
    message = check.message or result.problem or f"the check {check.status}"
    return f"{where}: {message}"


def print_report(results: list[LessonResult], verbose: bool = False) -> bool:
    """Print the table and the next step; True when every check passed."""
    table = Table(title="Celery Labs", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("Lesson")
    table.add_column("Checks", justify="right")
    table.add_column("Status")
    for result in results:
        table.add_row(result.lesson.number, result.lesson.title, f"{result.passed}/{len(result.checks)}", status_of(result))
    console.print(table)

    pending = [result for result in results if not result.done]
    if not pending:
        console.print("[green]All checks pass.[/] Well done: on to the next lesson's README.")
        return True
    first = pending[0]
    check = first.first_failure
    console.print("[bold]Next:[/] ", end="")
    if check is None:
        console.print(f"Lesson {first.lesson.number} could not be graded: {first.problem}", markup=False)
    else:
        console.print(describe_failure(first, check), markup=False)
        if first.passed == 0 and first.lesson.hint:  # just starting: the lesson's own first nudge
            console.print(f"[dim]Hint: {' '.join(first.lesson.hint.split())}[/]")
        elif check.todo is not None:
            console.print(f"[dim]Stuck? `make hint LESSON={first.lesson.number}` gives a hint for TODO {check.todo}.[/]")
    if verbose:
        for result in pending:
            for failed in (c for c in result.checks if not c.passed):
                console.rule(escape(f"{result.lesson.slug}::{failed.name} ({failed.status})"))
                console.print(failed.detail or failed.message, markup=False)
                if failed.output:
                    console.print(failed.output, markup=False)
    else:
        console.print("[dim]`make grade LESSON=NN` grades one lesson; `make grade ARGS=-v` shows the full output.[/]")
    return False


def print_list(lessons: list[Lesson], progress: Progress) -> None:
    table = Table(title="Celery Labs", title_justify="left")
    for column, justify in (("#", "right"), ("Lesson", "left"), ("Checks", "right"), ("Status", "left")):
        table.add_column(column, justify=justify)
    for lesson in lessons:
        last = progress.last(lesson.slug)
        checks = f"{last['passed']}/{last['total']}" if last else "-"
        status = progress.status(lesson.slug)
        colour = {"done": "green", "in progress": "yellow"}.get(status, "dim")
        table.add_row(lesson.number, lesson.title, checks, f"[{colour}]{status}[/]")
    console.print(table)
    console.print("[dim]As last graded; `make grade` grades again.[/]")


def print_solution_diff(lesson: Lesson, root: Path) -> None:
    for name in lesson.files:
        mine, reference = lesson.folder("lessons", root) / name, lesson.folder("solutions", root) / name
        diff = difflib.unified_diff(
            mine.read_text(encoding="utf-8").splitlines(keepends=True),
            reference.read_text(encoding="utf-8").splitlines(keepends=True),
            fromfile=f"lessons/{lesson.slug}/{name} (yours)",
            tofile=f"solutions/{lesson.slug}/{name} (reference)",
        )
        text = "".join(diff)
        if not text:
            console.print(f"lessons/{lesson.slug}/{name} is the same as the reference solution.")
        else:
            console.print(Syntax(text, "diff", theme="ansi_dark", background_color="default"))
