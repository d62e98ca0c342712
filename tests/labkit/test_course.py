"""The course checks itself: layout, manifest, and every lesson graded both ways.

For each lesson: every graded check fails on the starter code in lessons/
(nothing is pre-solved, no check is vacuous) and passes on solutions/, on the
embedded broker and on a real Redis; its notebook runs top to bottom.
This suite expects lessons/ as shipped: it is the course's own CI, not the grader.
"""

from __future__ import annotations

import os

import pytest

from labkit import check
from labkit.broker import is_reachable
from labkit.grade import LessonResult, grade_course
from labkit.manifest import ROOT, load_course

LESSONS = load_course()
IDS = [lesson.slug for lesson in LESSONS]
REAL_REDIS = os.environ.get("LABKIT_REAL_REDIS", "redis://127.0.0.1:6379")


def summary(result: LessonResult, wanted: str) -> str:
    lines = [f"{c.name}: {c.status} {c.message}".strip() for c in result.checks if c.status != wanted]
    return "\n".join(filter(None, [result.problem, *lines]))


def test_manifest_matches_the_files_on_disk():
    assert check.manifest_problems() == []


def test_exercise_module_names_are_unique():
    assert check.module_name_problems() == []


def test_readme_course_map_matches_the_manifest():
    assert check.course_map_problems() == []


def test_notebooks_are_stored_without_outputs():
    assert check.notebook_output_problems() == []


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_lesson_has_all_its_parts(lesson):
    assert check.lesson_problems(lesson) == []


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_every_check_fails_on_the_starter_code(lesson):
    (result,) = grade_course((lesson.slug,), target="lessons")
    assert result.checks, result.problem or "no checks ran"
    passing = [c.name for c in result.checks if c.passed]
    assert not passing, f"{lesson.slug}: these checks pass on the unsolved starter code (vacuous or pre-solved): {passing}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_solutions_pass_on_the_embedded_broker(lesson):
    (result,) = grade_course((lesson.slug,), target="solutions")
    assert result.done, f"{lesson.slug} on solutions/, embedded broker:\n{summary(result, 'passed')}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_solutions_pass_on_a_real_redis(lesson):
    if not is_reachable(REAL_REDIS):
        message = f"no Redis answers at {REAL_REDIS} (set LABKIT_REAL_REDIS, or start redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    (result,) = grade_course((lesson.slug,), target="solutions", broker_url=REAL_REDIS)
    assert result.done, f"{lesson.slug} on solutions/, real Redis at {REAL_REDIS}:\n{summary(result, 'passed')}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_notebook_runs_top_to_bottom(lesson, tmp_path):
    import nbclient
    import nbformat

    notebook = nbformat.read(lesson.notebook(), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,  # per cell: a cell that blocks fails instead of hanging the run
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
