"""``python -m labkit …``: thin click commands that hand over to the modules doing the work."""

from __future__ import annotations

import sys
import threading

import click

from labkit.manifest import TARGETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Celery Labs: grade your lessons, run the embedded broker, check the course."""


@main.command()
@click.option("--port", default=0, show_default="a free port", help="TCP port to listen on.")
def broker(port: int) -> None:
    """Run the embedded Redis-compatible broker until Ctrl-C."""
    from labkit.broker import EmbeddedBroker

    with EmbeddedBroker(port=port) as server:
        # The first line is read by labkit's own broker_process(): keep the URL on it.
        click.echo(f"Embedded broker (fakeredis) listening on {server.url}", nl=True)
        sys.stdout.flush()
        if sys.stdin is not None and sys.stdin.isatty():
            click.echo(
                "In another terminal, point Celery at it and start a worker, for example:\n"
                f"  export REDIS_URL={server.url}\n"
                "  cd lessons/01_first_task && celery -A first_task1 worker --loglevel=INFO\n"
                "Press Ctrl-C to stop (the data lives in memory and goes with it)."
            )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--lesson", "-l", "lessons", multiple=True, help="Grade only this lesson (number or slug).")
@click.option("--target", type=click.Choice(TARGETS), default="lessons", envvar="LAB_TARGET", show_default=True)
@click.option("--broker", "broker_url", envvar="REDIS_URL", default=None, help="A real Redis URL (default: embedded).")
@click.option("-v", "--verbose", is_flag=True, help="Show the full output of failing checks.")
def grade(lessons: tuple[str, ...], target: str, broker_url: str | None, verbose: bool) -> None:
    """Grade the lessons: a table of checks passed, and the next thing to do."""
    from labkit.grade import grade_course
    from labkit.report import print_report

    results = grade_course(lessons, target=target, broker_url=broker_url)
    sys.exit(0 if print_report(results, verbose=verbose) else 1)
