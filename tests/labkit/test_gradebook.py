"""``python -m labkit gradebook`` on a folder of submissions, good and bad.

The course is a copy holding lesson 01 only (conftest.py). Submissions:
alice (the starter), bob (solved), carol.zip (solved, inside a top-level folder),
dave (endless loop at import: a timeout row), erin (solved, but prints 5 MB and
deletes the other files of her lesson folder at import), frank (the starter, with
his copy of the tests edited so that every check passes).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

SLUG = "01_first_task"
EXERCISE = Path("lessons", SLUG, "first_task1.py")
TOTAL = 12
TIMEOUT = "20"  # seconds per submission: dave's endless loop must hit it
ERIN_PRELUDE = '''import os as _os
import sys as _sys

_sys.stdout.write("x" * (5 * 1024 * 1024) + "\\n")  # 5 MB at import
_here = _os.path.dirname(_os.path.abspath(__file__))
for _name in _os.listdir(_here):  # and delete the other files of this folder
    if _name.endswith(".md"):
        _os.remove(_os.path.join(_here, _name))
'''
HIDDEN_CHECK = '''


@pytest.mark.task(3)
@pytest.mark.points(2)
def test_hidden_count_words_splits_on_tabs_and_newlines(exercise, thread_worker):
    lesson = exercise(MODULE)
    thread_worker(lesson.app)
    value = result_of(lesson.count_words.delay("a\\tb\\nc"), "count_words.delay('a\\\\tb\\\\nc')")
    assert value == 3, f"count_words.delay('a\\\\tb\\\\nc') returned {value!r}, expected 3."
'''


def checkout(course: Path, dest: Path, exercise: str | None = None) -> Path:
    """A student's checkout: the whole course, with their version of the exercise."""
    shutil.copytree(course, dest, ignore=shutil.ignore_patterns(".labkit", "__pycache__"))
    if exercise is not None:
        (dest / EXERCISE).write_text(exercise, encoding="utf-8")
    return dest


def every_check_passes(test_file: Path) -> str:
    """The test file with every check's body replaced by `pass`: what a cheater would try."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            node.body = [ast.Pass()]
    return ast.unparse(tree)


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def csv_rows(out: Path) -> list[list[str]]:
    with (out / "gradebook.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def json_rows(out: Path) -> dict[str, dict]:
    return {row["student"]: row for row in json.loads((out / "gradebook.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def book(tmp_path_factory, kit):
    """One gradebook run over the six submissions."""
    base = tmp_path_factory.mktemp("gradebook")
    course = kit.build(base / "course")
    starter = (course / EXERCISE).read_text(encoding="utf-8")
    solution = (course / "solutions" / SLUG / "first_task1.py").read_text(encoding="utf-8")
    subs = base / "submissions"
    checkout(course, subs / "alice")
    checkout(course, subs / "bob", solution)
    solved = checkout(course, base / "zips" / "carol-celery-labs", solution)
    with zipfile.ZipFile(subs / "carol.zip", "w") as archive:
        for path in sorted(solved.rglob("*")):
            archive.write(path, path.relative_to(solved.parent))
    checkout(course, subs / "dave", "while True:\n    pass\n")
    checkout(course, subs / "erin", ERIN_PRELUDE + solution)
    frank = checkout(course, subs / "frank", starter)
    (frank / "tests" / f"test_{SLUG}.py").write_text(every_check_passes(course / "tests" / f"test_{SLUG}.py"), encoding="utf-8")

    before = fingerprint(subs)
    out = base / "out"
    started = time.monotonic()
    run = kit.run(course, "gradebook", str(subs), "--out", str(out), "--timeout", TIMEOUT, timeout=120)
    took = time.monotonic() - started
    return SimpleNamespace(base=base, course=course, subs=subs, out=out, run=run, took=took, before=before)


def test_gradebook_grades_every_submission_and_says_where_the_results_are(book, capsys):
    assert book.run.returncode == 0, book.run.stderr[-2000:]
    lines = book.run.stdout.splitlines()
    assert sorted(line for line in lines if ": " in line and not line.startswith("Graded")) == [
        "alice: ok, 0/12 points", "bob: ok, 12/12 points", "carol: ok, 12/12 points",
        "dave: timeout, grading took longer than 20 s", "erin: ok, 12/12 points", "frank: ok, 0/12 points",
    ]  # fmt: skip
    assert lines[-1].startswith("Graded 6 submission(s):") and str(book.out / "gradebook.csv") in lines[-1]
    with capsys.disabled():
        print(f"\n[gradebook] 6 submissions, 2 at a time: {book.took:.1f} s")


def test_gradebook_csv_has_a_row_per_student_with_points_per_lesson(book):
    assert csv_rows(book.out) == [
        ["student", "status", SLUG, "total", "max"],
        ["alice", "ok", "0", "0", "12"],
        ["bob", "ok", "12", "12", "12"],
        ["carol", "ok", "12", "12", "12"],
        ["dave", "timeout", "", "", ""],  # blank, not 0: no score
        ["erin", "ok", "12", "12", "12"],
        ["frank", "ok", "0", "0", "12"],
    ]


def test_gradebook_json_has_every_checks_outcome(book):
    rows = json_rows(book.out)
    assert sorted(rows) == ["alice", "bob", "carol", "dave", "erin", "frank"]
    for student, status in (("alice", "failed"), ("frank", "failed"), ("bob", "passed"), ("carol", "passed"), ("erin", "passed")):
        (lesson,) = rows[student]["lessons"]
        assert lesson["lesson"] == SLUG and len(lesson["checks"]) == TOTAL
        assert {check["status"] for check in lesson["checks"]} == {status}, student
        if status == "failed":
            assert all(check["message"] for check in lesson["checks"]), student
    first = rows["alice"]["lessons"][0]["checks"][0]
    assert (first["name"], first["todo"]) == ("test_app_sends_tasks_through_redis_url", 1)
    assert "broker=REDIS_URL" in first["message"]
    assert rows["dave"]["status"] == "timeout" and rows["dave"]["problem"] == "grading took longer than 20 s"


def test_gradebook_feedback_lists_the_failing_checks(book):
    feedback = book.out / "feedback"
    assert sorted(p.name for p in feedback.iterdir()) == [f"{s}.md" for s in ("alice", "bob", "carol", "dave", "erin", "frank")]
    alice = (feedback / "alice.md").read_text(encoding="utf-8")
    assert alice.startswith("# Feedback for alice\n")
    assert "Public checks passed: 0/12." in alice and "Points: 0/12." in alice and "## Checks to fix" in alice
    for check in json_rows(book.out)["alice"]["lessons"][0]["checks"]:
        assert f"({check['name']}): {check['message']}" in alice
    bob = (feedback / "bob.md").read_text(encoding="utf-8")
    assert "Public checks passed: 12/12." in bob and "Points: 12/12." in bob and "Checks to fix" not in bob
    assert "hidden" not in bob
    dave = (feedback / "dave.md").read_text(encoding="utf-8")
    assert "Not graded (timeout): grading took longer than 20 s" in dave


def test_a_student_who_edits_the_tests_gains_nothing(book):
    frank = json_rows(book.out)["frank"]
    assert (frank["points"], frank["max_points"]) == (0, TOTAL)
    assert "Checks to fix" in (book.out / "feedback" / "frank.md").read_text(encoding="utf-8")


def test_regrading_one_student_keeps_the_other_rows(book, kit, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(book.out, out)
    rows = json.loads((out / "gradebook.json").read_text(encoding="utf-8"))
    for row in rows:
        if row["student"] == "bob":
            row["points"] = 999  # a stale row: the regrade must replace it
    (out / "gradebook.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")

    run = kit.run(book.course, "gradebook", str(book.subs), "--out", str(out), "--student", "bob", "--timeout", "60")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0] == "bob: ok, 12/12 points"
    assert "Graded 1 submission(s)" in run.stdout and "alice" not in run.stdout

    assert csv_rows(out) == csv_rows(book.out)
    before, after = json_rows(book.out), json_rows(out)
    assert after["bob"]["points"] == TOTAL
    assert {k: v for k, v in after.items() if k != "bob"} == {k: v for k, v in before.items() if k != "bob"}
    for student in ("alice", "carol", "dave", "erin", "frank"):
        name = f"feedback/{student}.md"
        assert (out / name).read_text(encoding="utf-8") == (book.out / name).read_text(encoding="utf-8")


def test_regrading_an_unknown_student_is_a_usage_error(book, kit, tmp_path):
    """BUG: gradebook.run's LookupError escapes as a traceback. Fix in cli.gradebook:
    catch LookupError and raise click.BadParameter(str(exc), param_hint="--student")."""
    run = kit.run(book.course, "gradebook", str(book.subs), "--out", str(tmp_path / "out"), "--student", "zed")
    assert "Traceback" not in run.stderr, run.stderr[-600:]
    assert run.returncode == 2
    assert "no submission named 'zed'" in run.stderr


def test_hidden_checks_count_in_the_grade_but_are_not_shown(book, kit, tmp_path):
    tests = tmp_path / "instructor-tests"
    shutil.copytree(book.course / "tests", tests)
    with (tests / f"test_{SLUG}.py").open("a", encoding="utf-8") as handle:
        handle.write(HIDDEN_CHECK)
    subs = tmp_path / "submissions"
    for student in ("alice", "bob"):
        shutil.copytree(book.subs / student, subs / student)
    out = tmp_path / "out"
    run = kit.run(book.course, "gradebook", str(subs), "--out", str(out), "--tests", str(tests), "--timeout", "60")
    assert run.returncode == 0, run.stderr[-2000:]

    assert csv_rows(out)[1:] == [["alice", "ok", "0", "0", "14"], ["bob", "ok", "14", "14", "14"]]
    hidden = [c for c in json_rows(out)["bob"]["lessons"][0]["checks"] if c["name"].startswith("test_hidden_")]
    assert [(c["status"], c["points"]) for c in hidden] == [("passed", 2)]
    bob = (out / "feedback" / "bob.md").read_text(encoding="utf-8")
    assert "Public checks passed: 12/12." in bob
    assert "1 hidden check(s)" in bob and "Points: 14/14." in bob
    alice = (out / "feedback" / "alice.md").read_text(encoding="utf-8")
    assert "Public checks passed: 0/12." in alice and "Points: 0/14." in alice
    assert "test_hidden_" not in alice and "tabs" not in alice  # a hidden check stays hidden


def test_the_submissions_are_left_exactly_as_they_were(book):
    assert fingerprint(book.subs) == book.before
    assert not list(book.subs.rglob("__pycache__")) and not (book.subs / "erin" / ".labkit").exists()
    assert (book.subs / "erin" / "lessons" / SLUG / "hints.md").is_file()  # erin's code ran elsewhere
