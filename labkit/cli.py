"""``python -m labkit …``: thin click commands that hand over to the modules doing the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dataclasses import replace

from labkit.manifest import TARGETS, find_lesson, load_course
from labkit.settings import Settings

pass_settings = click.make_pass_decorator(Settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--course",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The course checkout to work on (default: the folder holding course.toml, from here up; or LABKIT_COURSE).",
)
@click.pass_context
def main(ctx, course: Path | None) -> None:
    """Celery Labs: grade your lessons, get hints, run the embedded broker."""
    from labkit.starters import save_starters

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.obj = replace(settings, course=course.resolve()) if course else settings
    if ctx.invoked_subcommand in ("broker", "gradebook", "check"):
        return
    if not (ctx.obj.course / "course.toml").is_file():
        raise click.UsageError(f"no course.toml in {ctx.obj.course}: run this inside a Celery Labs checkout, or give --course.")
    try:
        save_starters(ctx.obj.course)  # before any edit can happen: what `reset` restores later
    except (OSError, ValueError) as exc:
        click.secho(f"(could not keep a copy of the starter files: {exc})", fg="yellow", err=True)


def _lesson(settings: Settings, key: str, hint: str = "LESSON"):
    try:
        return find_lesson(key, load_course(settings.course / "course.toml"))
    except LookupError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


@main.command()
@click.option("--port", default=0, show_default="a free port", help="TCP port to listen on.")
def broker(port: int) -> None:
    """Run the embedded Redis-compatible broker until Ctrl-C."""
    from labkit.broker import serve

    def announce(url: str) -> None:
        click.echo(f"Embedded broker (fakeredis) listening on {url}")
        click.echo(
            "In another terminal, point Celery at it and start a worker, for example:\n"
            f"  export REDIS_URL={url}\n"
            "  cd lessons/01_first_task && celery -A first_task1 worker --loglevel=INFO\n"
            "Press Ctrl-C to stop (the data lives in memory and goes with it)."
        )

    serve(port, announce)


@main.command()
@click.option("--lesson", "-l", "lessons", multiple=True, help="Grade only this lesson (number or slug).")
@click.option("--target", type=click.Choice(TARGETS), help="What to grade (default: lessons, or LABKIT_TARGET).")
@click.option("--broker", "broker_url", help="A real Redis URL (default: REDIS_URL, else the embedded broker).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write JUnit XML to this file.")
@click.option("-v", "--verbose", is_flag=True, help="Show the full output of failing checks.")
@pass_settings
def grade(settings: Settings, lessons, target, broker_url, as_json, junit, verbose) -> None:
    """Grade the lessons: a table of checks passed, and the next thing to do."""
    from labkit import export
    from labkit.grade import grade_course
    from labkit.progress import Progress
    from labkit.report import print_report

    try:
        settings = replace(settings, target=target or settings.target, redis_url=broker_url or settings.redis_url)
        results = grade_course(settings, lessons)
    except LookupError as exc:
        raise click.BadParameter(str(exc), param_hint="--lesson") from None
    if settings.target == "lessons":
        Progress(settings.course).record(results)
    if junit:
        export.write_junit(results, junit)
    if as_json:
        click.echo(json.dumps(export.as_dict(results), indent=2))
        all_passed = all(result.done for result in results)
    else:
        all_passed = print_report(results, verbose=verbose)
    sys.exit(0 if all_passed else 1)


@main.command(name="list")
@pass_settings
def list_lessons(settings: Settings) -> None:
    """Every lesson with its status and checks passed (as last graded)."""
    from labkit.progress import Progress
    from labkit.report import print_list

    print_list(load_course(settings.course / "course.toml"), Progress(settings.course))


@main.command()
@click.argument("lesson")
@pass_settings
def hint(settings: Settings, lesson: str) -> None:
    """Show the next hint of LESSON (a number such as 01), one per call."""
    from labkit.hints import next_hint, read_hints
    from labkit.progress import Progress

    chosen = _lesson(settings, lesson)
    hints = read_hints(chosen.folder("lessons", settings.course) / "hints.md")
    progress = Progress(settings.course)
    last = progress.last(chosen.slug) or {}
    index = next_hint(hints, progress.hints_seen(chosen.slug), last.get("next_todo"))
    if index is None:
        click.echo(f"You have seen all {len(hints)} hints of lesson {chosen.number}. They are all in lessons/{chosen.slug}/hints.md.")
        return
    progress.mark_hint_seen(chosen.slug, index)
    shown = len(progress.hints_seen(chosen.slug))
    click.secho(f"Lesson {chosen.number}, {hints[index].heading}  (hint {shown} of {len(hints)})", bold=True)
    click.echo(hints[index].text)


@main.command()
@click.argument("lesson")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
def reset(settings: Settings, lesson: str, yes: bool) -> None:
    """Put the starter files of LESSON back (your changes to them are lost)."""
    from labkit.starters import changed_files, reset_lesson

    chosen = _lesson(settings, lesson)
    changed = changed_files(chosen, settings.course)
    if not changed:
        click.echo(f"Lesson {chosen.number} already has its starter files.")
        return
    listing = ", ".join(f"lessons/{chosen.slug}/{name}" for name in changed)
    if not yes and not click.confirm(f"Replace {listing} with the starter version? Your changes will be lost."):
        click.echo("Nothing changed.")
        return
    try:
        restored = reset_lesson(chosen, settings.course)
    except FileNotFoundError as exc:
        click.echo(f"Cannot reset lesson {chosen.number}: {exc}")
        sys.exit(1)
    click.echo(f"Restored {', '.join(restored)} in lessons/{chosen.slug}/.")


@main.command()
@click.argument("lesson")
@click.option("--force", is_flag=True, help="Show it even though the lesson is not done yet.")
@pass_settings
def solution(settings: Settings, lesson: str, force: bool) -> None:
    """Show how your files differ from the reference solution (once the lesson passes)."""
    from labkit.progress import DONE, Progress
    from labkit.report import print_solution_diff

    chosen = _lesson(settings, lesson)
    if Progress(settings.course).status(chosen.slug) != DONE:
        if not force:
            click.echo(
                f"Lesson {chosen.number} is not done yet (as last graded): finish it first, "
                f"then `make grade LESSON={chosen.number}` and ask again. `--force` shows it anyway."
            )
            sys.exit(1)
        click.secho("Showing the solution of a lesson you have not finished: try the hints first next time.", fg="yellow")
    print_solution_diff(chosen, settings.course)


@main.command()
@click.option("--poll", is_flag=True, help="Poll files for changes (for WSL and network drives).")
@click.option("--manual", is_flag=True, help="Grade only when Enter is pressed.")
@pass_settings
def watch(settings: Settings, poll: bool, manual: bool) -> None:
    """Grade the current lesson on every save, and move on when it passes."""
    from labkit.watch import run

    try:
        sys.exit(run(replace(settings, target="lessons"), poll=poll, manual=manual))
    except KeyboardInterrupt:
        sys.exit(1)


@main.command()
@click.argument("submissions", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("gradebook"), show_default=True)
@click.option("--tests", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Your own copy of tests/ (hidden checks included).")
@click.option("--student", help="Regrade only this submission and update its rows.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds per submission.")
@click.option("--memory-mb", default=2048, show_default=True, help="Memory cap per process.")
@pass_settings
def gradebook(settings: Settings, submissions, out, tests, student, timeout, memory_mb) -> None:
    """Grade every student checkout (folder or .zip) in SUBMISSIONS; write a gradebook."""
    from labkit import gradebook as book

    try:
        limits = book.Limits(timeout, memory_mb)
        rows = book.run(submissions, out, settings.course, tests=tests, student=student, limits=limits, progress=click.echo)
    except LookupError as exc:
        raise click.BadParameter(str(exc), param_hint="--student") from None
    click.echo(f"Graded {len(rows)} submission(s): {out / 'gradebook.csv'}, {out / 'gradebook.json'}, {out / 'feedback'}/")


@main.command()
@pass_settings
def check(settings: Settings) -> None:
    """The course's static lint (for course authors): TODOs, tags, hints, manifest, notebooks, course map."""
    from labkit import lint

    root = settings.course
    problems = lint.problems(root)
    for problem in problems:
        click.echo(f"- {problem}")
    if problems:
        click.secho(f"Course check: {len(problems)} problem{'s' if len(problems) != 1 else ''} to fix", fg="red", bold=True)
        sys.exit(1)
    count = len(load_course(root / "course.toml"))
    click.echo(f"Course check: {count} lesson{'s' if count != 1 else ''}, no problems")


@main.command()
def snapshot() -> None:
    """Keep a copy of the starter files (make runs this during setup)."""
    # The group callback has already done the work.
