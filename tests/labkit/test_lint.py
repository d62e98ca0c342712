"""The course lint (`make check`, labkit/lint.py) on small courses, one broken thing each.

Exercism style: a tiny valid course, written by this file into tmp_path, has no
problems; each case below breaks one thing in it and names the sentence `make check`
must print for it. No grading and no worker: everything here reads files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import lint
from labkit.settings import LABKIT_HOME as ROOT  # labkit itself, for PYTHONPATH

MANIFEST = '''\
format_version = 1

[[lessons]]
slug = "01_x"
title = "A lesson"
files = ["x1.py"]
hint = "Start with TODO 1."
needs = ["smtp"]
'''

LESSON_README = """\
# Lesson 01 — A lesson

## You will learn

- something

## Your turn

Open `x1.py`. Each task below is one `# TODO n:` in that file:

```bash
# Terminal 1: not a heading, a shell comment
celery -A x1 worker
```

1. a numbered list item, not a task

## 1. Make a task

Do it.

### A subsection of task 1

## 2. Send it later

Do that.

## Check your work

`make grade LESSON=01`
"""

HINTS = """\
# Lesson 01 — Hints

## 1. Make a task

- Which decorator?

## 2. Send it later

- Which option of apply_async?
"""

EXERCISE = '''\
"""Lesson 01.

Usage::

    celery -A x1 worker
"""

import os

from celery import Celery

app = Celery("x1", broker=os.environ.get("REDIS_URL"))


# TODO 1: make `add` a task.
def add(x, y):
    raise NotImplementedError("TODO 1")


def add_later(x, y):
    # TODO 2: send add with a countdown.
    raise NotImplementedError("TODO 2")
'''

SOLUTION = '''\
"""Lesson 01.

Usage::

    celery -A x1 worker
"""

import os

from celery import Celery

app = Celery("x1", broker=os.environ.get("REDIS_URL"))


# Why: a task, so a worker can run it.
@app.task
def add(x, y):
    return x + y


def add_later(x, y):
    # Why: a countdown, so it waits.
    return add.apply_async((x, y), countdown=1)
'''

TESTS = """\
import pytest


@pytest.mark.task(1)
def test_add_is_a_task(exercise):
    pass


@pytest.mark.task(2)
def test_add_later_waits(exercise):
    pass


@pytest.mark.task(2)
def test_add_later_returns_a_result(exercise):
    pass
"""

COURSE_README = """\
# A course

## Course map

| #  | Lesson | You will build |
|----|--------|----------------|
| 01 | [A lesson](lessons/01_x/) | a task |
"""

CODE_CELL = {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [], "source": ["print('hi')"]}
NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "id": "m1", "metadata": {}, "source": ["# Lesson 01, live"]}, CODE_CELL],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}

FILES = {
    "course.toml": MANIFEST,
    "README.md": COURSE_README,
    "lessons/01_x/README.md": LESSON_README,
    "lessons/01_x/hints.md": HINTS,
    "lessons/01_x/x1.py": EXERCISE,
    "solutions/01_x/x1.py": SOLUTION,
    "tests/test_01_x.py": TESTS,
    "notebooks/01_x.ipynb": json.dumps(NOTEBOOK, indent=1),
    "notebooks/x_demo.py": 'from celery import Celery\n\napp = Celery("x_demo")\n',
}


@pytest.fixture
def course(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def edit(path: str, old: str, new: str):
    """A mutation: replace ``old`` (which must be there) by ``new`` in one file of the course."""

    def mutate(root: Path) -> None:
        target = root / path
        text = target.read_text(encoding="utf-8")
        assert old in text, f"the valid course's {path} has no {old!r}: fix the test case"
        target.write_text(text.replace(old, new), encoding="utf-8")

    return mutate


def write(path: str, text: str):
    def mutate(root: Path) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")

    return mutate


def remove(path: str):
    return lambda root: (root / path).unlink()


def with_output(root: Path) -> None:
    cell = {**CODE_CELL, "execution_count": 1, "outputs": [{"name": "stdout", "output_type": "stream", "text": ["hi\n"]}]}
    (root / "notebooks/01_x.ipynb").write_text(json.dumps({**NOTEBOOK, "cells": [cell]}), encoding="utf-8")


def test_the_valid_course_has_no_problems(course):
    assert lint.problems(course) == []


def test_a_provided_module_and_a_test_file_exercise_are_allowed(course):
    """A testing lesson hands out a complete module (same in both trees, no TODO) and has the
    student write a test file, which imports pytest; neither is a problem. labkit stays forbidden."""
    edit("course.toml", 'files = ["x1.py"]', 'files = ["x1.py", "given1.py", "x1_tests.py"]')(course)
    for tree in ("lessons", "solutions"):
        write(f"{tree}/01_x/given1.py", "def total(items):\n    return sum(items)\n")(course)
    write("lessons/01_x/x1_tests.py", "import pytest\n\n\ndef test_total():\n    # TODO 1: check it.\n    raise NotImplementedError(\"TODO 1\")\n")(course)
    write("solutions/01_x/x1_tests.py", "import pytest\n\n\ndef test_total():\n    assert True\n")(course)
    assert lint.problems(course) == []
    write("solutions/01_x/x1_tests.py", "import labkit\n\n\ndef test_total():\n    assert True\n")(course)
    assert lint.problems(course) == [
        "solutions/01_x/x1_tests.py, line 1, imports labkit: lesson and solution files must run without the harness "
        "(a student runs them with plain celery and python); remove the import"
    ]


def test_the_real_course_has_no_problems():
    """The same as test_course.py's, kept here so this file alone proves `make check` passes."""
    assert lint.problems(ROOT) == []


BROKEN = [
    # --- TODO numbers: exercise = task tags = hints sections = "Your turn" tasks ---
    pytest.param(
        edit("tests/test_01_x.py", "@pytest.mark.task(1)", "@pytest.mark.task(3)"),
        "tests/test_01_x.py tags checks @pytest.mark.task(n) for n = 2, 3, but lessons/01_x/ has TODO 1, 2: "
        "tag at least one check per TODO and none for a TODO that does not exist (missing 1; 3 has no TODO)",
        id="task-tag-without-a-todo",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", "    # TODO 2: send add with a countdown.\n", ""),
        "tests/test_01_x.py tags checks @pytest.mark.task(n) for n = 1, 2, but lessons/01_x/ has TODO 1: "
        "tag at least one check per TODO and none for a TODO that does not exist (2 has no TODO)",
        id="todo-removed-from-the-exercise",
    ),
    pytest.param(
        edit("lessons/01_x/hints.md", "## 2. Send it later", "## Send it later"),
        "lessons/01_x/hints.md has numbered sections 1, but lessons/01_x/ has TODO 1, 2: "
        "give each TODO one section, in order, headed `## n. <task>` (missing 2)",
        id="hints-section-not-numbered",
    ),
    pytest.param(
        edit("lessons/01_x/hints.md", "## 2. Send it later", "## 3. Send it later"),
        "lessons/01_x/hints.md has numbered sections 1, 3, but lessons/01_x/ has TODO 1, 2: "
        "give each TODO one section, in order, headed `## n. <task>` (missing 2; 3 has no TODO)",
        id="hints-section-misnumbered",
    ),
    pytest.param(
        edit("lessons/01_x/README.md", "## 2. Send it later", "## 1. Send it later"),
        "lessons/01_x/README.md's \"Your turn\" has tasks 1, 1, but lessons/01_x/ has TODO 1, 2: "
        "give each TODO one task, in order, headed `## n. <task>` (missing 2; 1 more than once)",
        id="your-turn-task-numbered-twice",
    ),
    pytest.param(
        edit("lessons/01_x/README.md", "## Your turn", "## Exercises"),
        "lessons/01_x/README.md has no \"## Your turn\" section: add one, with a `## n. <task>` heading per TODO",
        id="readme-without-your-turn",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", "TODO 2", "TODO 3"),
        "lessons/01_x/ has TODO 1, 3: number the TODOs 1 to n with no gap (missing 2)",
        id="todo-numbers-with-a-gap",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", "# TODO 1: make", "# TODO: make"),
        "lessons/01_x/x1.py, line 15: write the TODO as `# TODO n: <what to do>`, numbered like the README's tasks",
        id="todo-without-a-number",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", 'raise NotImplementedError("TODO 2")', 'raise NotImplementedError("TODO 4")'),
        'lessons/01_x/x1.py raises NotImplementedError("TODO 4") but has no `# TODO 4:` comment: add it, or fix the number',
        id="raise-names-an-unknown-todo",
    ),
    pytest.param(
        write("lessons/01_x/x1.py", 'from celery import Celery\n\napp = Celery("x1")\n'),
        "lessons/01_x/x1.py has no `# TODO n:`: mark what the student must change, numbered from 1",
        id="exercise-without-todo",
    ),
    pytest.param(
        edit("solutions/01_x/x1.py", "# Why: a countdown, so it waits.", "# TODO 2: send add with a countdown."),
        "solutions/01_x/x1.py, line 22, still has a `# TODO`: turn it into a `# Why:` comment that explains the decision",
        id="solution-keeps-a-todo",
    ),
    # --- course.toml ---
    pytest.param(
        edit("course.toml", 'needs = ["smtp"]', 'needs = ["smtp"]\npoints = 3'),
        "course.toml: lesson '01_x' has an unknown key 'points': the known keys are slug, title, files, hint, needs",
        id="manifest-unknown-key",
    ),
    pytest.param(
        edit("course.toml", 'title = "A lesson"\n', ""),
        "course.toml: lesson '01_x' has no 'title': add it (the keys are documented on Lesson in labkit/manifest.py)",
        id="manifest-missing-key",
    ),
    pytest.param(
        edit("course.toml", 'slug = "01_x"\n', ""),
        "course.toml: [[lessons]] entry 1 has no 'slug': add it (the keys are documented on Lesson in labkit/manifest.py)",
        id="manifest-missing-slug",
    ),
    pytest.param(
        edit("course.toml", 'files = ["x1.py"]', 'files = "x1.py"'),
        "course.toml: lesson '01_x' has files = 'x1.py': list the exercise file names, e.g. files = [\"tasks1.py\"]",
        id="manifest-files-not-a-list",
    ),
    pytest.param(
        edit("course.toml", "format_version = 1", "format_version = 1\nwelcome = 'hi'"),
        "course.toml has an unknown key 'welcome' at the top level: it holds only format_version and [[lessons]]",
        id="manifest-unknown-top-level-key",
    ),
    pytest.param(
        edit("course.toml", "format_version = 1", "format_version = 2"),
        "course.toml has format_version = 2, but labkit reads format_version = 1: set it to 1",
        id="format-version-2",
    ),
    pytest.param(
        edit("course.toml", "format_version = 1", ""),
        "course.toml has no format_version: add `format_version = 1` at the top",
        id="format-version-missing",
    ),
    pytest.param(
        edit("course.toml", 'title = "A lesson"', 'title = "A lesson'),
        "course.toml is not valid TOML",
        id="manifest-not-toml",
    ),
    pytest.param(
        write("lessons/02_y/y1.py", "# TODO 1: y\n"),
        "lessons/02_y/ is not in course.toml: add a [[lessons]] entry or remove the folder",
        id="lesson-folder-not-in-manifest",
    ),
    # --- a lesson's parts ---
    pytest.param(
        remove("solutions/01_x/x1.py"),
        "solutions/01_x/x1.py is missing: every exercise file has a solution twin",
        id="solution-missing",
    ),
    pytest.param(
        remove("lessons/01_x/hints.md"),
        "lessons/01_x/hints.md is missing",
        id="hints-missing",
    ),
    # --- lesson code ---
    pytest.param(
        edit("lessons/01_x/x1.py", "import os\n", "import os\n\nfrom labkit.checks import fail\n"),
        "lessons/01_x/x1.py, line 10, imports labkit.checks: lesson and solution files must run without the harness "
        "(a student runs them with plain celery and python); remove the import",
        id="lesson-imports-labkit",
    ),
    pytest.param(
        edit("solutions/01_x/x1.py", "import os\n", "import os\n\nimport labkit\n"),
        "solutions/01_x/x1.py, line 10, imports labkit: lesson and solution files must run without the harness "
        "(a student runs them with plain celery and python); remove the import",
        id="solution-imports-labkit",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", 'Celery("x1"', 'Celery("wrong"'),
        "lessons/01_x/x1.py, line 12: Celery() gets 'wrong', but the module is 'x1': "
        'write Celery("x1", …) so task names read x1.<task> everywhere',
        id="celery-app-named-wrong",
    ),
    pytest.param(
        edit("notebooks/x_demo.py", 'Celery("x_demo")', "Celery()"),
        "notebooks/x_demo.py, line 3: Celery() gets no name, but the module is 'x_demo': "
        'write Celery("x_demo", …) so task names read x_demo.<task> everywhere',
        id="demo-app-without-a-name",
    ),
    pytest.param(
        edit("lessons/01_x/x1.py", "def add(x, y):", "def add(x, y)"),
        "lessons/01_x/x1.py is not valid Python (line 16: expected ':'): fix it",
        id="exercise-does-not-parse",
    ),
    # --- notebooks ---
    pytest.param(
        with_output,
        "notebooks/01_x.ipynb is stored with outputs: clear them (Jupyter: Edit > Clear Outputs of All Cells)",
        id="notebook-with-outputs",
    ),
    # --- the README's course map ---
    pytest.param(
        edit("README.md", "| 01 | [A lesson](lessons/01_x/) | a task |\n", ""),
        "README.md's course map has no row for lesson 01: add "
        "`| 01 | [A lesson](lessons/01_x/) | <what the learner builds> |` at the end of the table",
        id="course-map-row-missing",
    ),
    pytest.param(
        edit("README.md", "[A lesson]", "[An old title]"),
        "README.md's course map calls lesson 01 'An old title', but course.toml calls it 'A lesson': use course.toml's title",
        id="course-map-title-stale",
    ),
    pytest.param(
        edit("README.md", "(lessons/01_x/)", "(lessons/01_old/)"),
        "README.md's course map links lesson 01 to lessons/01_old/, but its folder is lessons/01_x/: fix the link",
        id="course-map-link-stale",
    ),
    pytest.param(
        edit("README.md", "| a task |\n", "| a task |\n| 02 | [Gone](lessons/02_gone/) | nothing |\n"),
        "README.md's course map has a row for lesson 02, which course.toml does not list: remove the row or add the lesson",
        id="course-map-extra-row",
    ),
    # --- texts that point at lessons ---
    pytest.param(
        write("lessons/01_x/hints.md", (
            "## 1. Connect\n\nMore in lesson 07.\n\n## 2. Send it later\n\nA question.\n"
        )),
        "lessons/01_x/hints.md points to lesson 07, which course.toml does not have: "
        'name the topic instead ("the workflows lesson") until that lesson exists',
        id="a-text-points-to-a-lesson-that-does-not-exist",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), BROKEN)
def test_a_broken_course_gets_a_sentence_naming_the_fix(course, mutate, expected):
    mutate(course)
    found = lint.problems(course)
    assert any(expected in problem for problem in found), f"expected {expected!r} among:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "mutate",
    [
        edit("lessons/01_x/x1.py", 'Celery("x1"', 'Celery("wrong"'),
        edit("course.toml", 'title = "A lesson"\n', ""),
        edit("course.toml", 'files = ["x1.py"]', 'files = "x1.py"'),
        edit("course.toml", "format_version = 1", "format_version = 2"),
        edit("lessons/01_x/hints.md", "## 2. Send it later", "## Send it later"),
        edit("lessons/01_x/x1.py", "TODO 2", "TODO 3"),  # the comment and the raise
        write("lessons/01_x/x1.py", 'from celery import Celery\n\napp = Celery("x1")\n'),
    ],
    ids=["app-name", "missing-title", "files-not-a-list", "format-version", "hints-section", "todo-gap", "no-todo"],
)
def test_one_broken_thing_gives_one_problem(course, mutate):
    """A single mistake reads as one sentence, not a cascade: a manifest that cannot be read stops the other rules."""
    mutate(course)
    found = lint.problems(course)
    assert len(found) == 1, "\n".join(found)


def test_hints_and_your_turn_accept_todo_headings():
    """`## TODO 1` and `## 1. …` both number a section; code fences and list items never do."""
    markdown = "## TODO 1\n\n```\n## 7. in a fence\n```\n\n1. a list item\n\n## TODO 2: send it\n\n## 3) third\n\n## 50x replies\n"
    assert lint.numbered_headings(markdown) == [1, 2, 3]
    readme = "## Your turn\n\n### 1. one\n\n#### a detail\n\n### 2. two\n\n## Check your work\n\n## 3. not a task\n"
    assert lint.your_turn_tasks(readme) == [1, 2]


def run_check(course: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "labkit", "check"], cwd=course, env=env, capture_output=True, text=True, timeout=60
    )


def test_make_check_passes_a_valid_course(course):
    shown = run_check(course)
    assert (shown.returncode, shown.stdout) == (0, "Course check: 1 lesson, no problems\n"), shown.stderr
    assert not (course / ".labkit").exists(), "`check` must not snapshot the starters"


def test_make_check_lists_each_problem_and_fails(course):
    edit("course.toml", "format_version = 1", "format_version = 2")(course)
    shown = run_check(course)
    assert shown.returncode == 1, shown
    assert shown.stdout == (
        "- course.toml has format_version = 2, but labkit reads format_version = 1: set it to 1\n"
        "Course check: 1 problem to fix\n"
    )
