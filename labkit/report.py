"""Print grading results: one row per lesson, then the next thing to do."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from labkit.grade import CheckResult, LessonResult

console = Console(highlight=False)


def status_of(result: LessonResult) -> str:
    if result.problem and not result.checks:
        return "[red]cannot run[/]"
    if result.done:
        return "[green]done[/]"
    if result.passed == 0:
        return "[yellow]to do[/]"
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
        if first.lesson.hint and check.status != "not run":
            console.print(f"[dim]Hint: {' '.join(first.lesson.hint.split())}[/]")
    if verbose:
        for result in pending:
            for failed in (c for c in result.checks if not c.passed):
                console.rule(f"{result.lesson.slug}::{failed.name} ({failed.status})")
                console.print(failed.detail or failed.message, markup=False)
                if failed.output:
                    console.print(failed.output, markup=False)
    else:
        console.print("[dim]Run `make grade LESSON=NN` for one lesson, or add -v for the full output.[/]")
    return False
