"""The course checks itself: the lint (labkit/lint.py), and every lesson graded both ways.

For each lesson: every graded check fails on the starter code in lessons/
(nothing is pre-solved, no check is vacuous) and passes on solutions/, on the
embedded broker and on a real Redis; its notebook runs top to bottom.
This suite expects lessons/ as shipped: it is the course's own CI, not the grader.

The three gradings (starter, solutions on the embedded broker, solutions on a
real Redis) each run once for all selected lessons, side by side: the checks
mostly wait on workers and timers, so this costs little more than the slowest.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labkit import lint
from labkit.broker import is_reachable
from labkit.grade import LessonResult, grade_course
from labkit.manifest import load_course
from labkit.settings import Settings

# The gradings and notebooks below bound their own waits (60 s a check, 120 s a cell);
# the first check that needs them waits for the whole course, so it gets longer.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]  # this repository
SETTINGS = Settings.from_env()
LESSONS = load_course(ROOT / "course.toml")
IDS = [lesson.slug for lesson in LESSONS]
REAL_REDIS = SETTINGS.real_redis


GRADING_CHECKS = (
    "test_every_check_fails_on_the_starter_code",
    "test_solutions_pass_on_the_embedded_broker",
    "test_solutions_pass_on_a_real_redis",
)


@pytest.fixture(scope="session")
def graded(request: pytest.FixtureRequest) -> dict[str, dict[str, LessonResult]]:
    """{leg: {slug: result}} for the lessons this run selected, graded once per leg."""
    items = request.session.items
    slugs = tuple(sorted({i.callspec.params["lesson"].slug for i in items if getattr(i, "originalname", "") in GRADING_CHECKS}))
    legs = {"starter": ("lessons", None), "embedded": ("solutions", None)}
    if is_reachable(REAL_REDIS):
        legs["real"] = ("solutions", REAL_REDIS)
    with ThreadPoolExecutor(max_workers=len(legs)) as pool:
        futures = {leg: pool.submit(grade_course, Settings(course=ROOT, target=target, redis_url=broker), slugs) for leg, (target, broker) in legs.items()}
        return {leg: {result.lesson.slug: result for result in future.result()} for leg, future in futures.items()}


def summary(result: LessonResult, wanted: str) -> str:
    lines = [f"{c.name}: {c.status} {c.message}".strip() for c in result.checks if c.status != wanted]
    return "\n".join(filter(None, [result.problem, *lines]))


def test_the_course_lint_finds_no_problems():
    """The static half (`make check`): TODOs, tags, hints, manifest, notebooks, course map."""
    problems = lint.problems(ROOT)
    assert problems == [], "make check found:\n" + "\n".join(f"- {problem}" for problem in problems)


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_every_check_fails_on_the_starter_code(lesson, graded):
    result = graded["starter"][lesson.slug]
    assert result.checks, result.problem or "no checks ran"
    passing = [c.name for c in result.checks if c.passed]
    assert not passing, f"{lesson.slug}: these checks pass on the unsolved starter code (vacuous or pre-solved): {passing}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_solutions_pass_on_the_embedded_broker(lesson, graded):
    result = graded["embedded"][lesson.slug]
    assert result.done, f"{lesson.slug} on solutions/, embedded broker:\n{summary(result, 'passed')}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_solutions_pass_on_a_real_redis(lesson, graded):
    if "real" not in graded:
        message = f"no Redis answers at {REAL_REDIS} (set LABKIT_REAL_REDIS, or start redis-server)"
        if SETTINGS.ci:
            pytest.fail(message)
        pytest.skip(message)
    result = graded["real"][lesson.slug]
    assert result.done, f"{lesson.slug} on solutions/, real Redis at {REAL_REDIS}:\n{summary(result, 'passed')}"


def run_notebook(path) -> str:
    """Execute a notebook headless; '' when every cell ran, else the error."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,  # per cell: a cell that blocks fails instead of hanging the run
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    loop = asyncio.new_event_loop()  # this thread's own, closed when done
    try:
        loop.run_until_complete(client.async_execute())
    except Exception as exc:  # CellExecutionError, CellTimeoutError, a dead kernel
        return f"{type(exc).__name__}: {exc}"
    finally:
        loop.close()
    return ""


@pytest.fixture(scope="session")
def notebook_errors(request: pytest.FixtureRequest) -> dict[str, str]:
    """{slug: error} for the selected lessons' notebooks, run two at a time (each starts a kernel and a worker)."""
    items = request.session.items
    chosen = {i.callspec.params["lesson"] for i in items if getattr(i, "originalname", "") == "test_notebook_runs_top_to_bottom"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {lesson.slug: pool.submit(run_notebook, lesson.notebook(ROOT)) for lesson in chosen}
        return {slug: future.result() for slug, future in futures.items()}


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_notebook_runs_top_to_bottom(lesson, notebook_errors):
    assert notebook_errors[lesson.slug] == "", f"notebooks/{lesson.slug}.ipynb: {notebook_errors[lesson.slug]}"
