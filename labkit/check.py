"""The course checks itself (like rustlings' ``dev check``): layout and manifest.

Each function returns a list of problems, each a sentence that says what to fix.
The behavioural half (starter fails, solutions pass, notebooks run) lives in
tests/labkit/test_course.py, which grades every lesson both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from labkit.manifest import ROOT, Lesson, lesson_of_test_file, load_course

SLUG = re.compile(r"^\d\d_[a-z0-9_]{1,29}$")
COURSE_MAP_ROW = re.compile(r"^\|\s*(\d\d)\s*\|\s*\[([^\]]+)\]\(lessons/([^)/]+)/?\)", re.MULTILINE)
IGNORED = {"__pycache__", ".ipynb_checkpoints"}


def manifest_problems(root: Path = ROOT) -> list[str]:
    lessons = load_course(root / "course.toml")
    problems = []
    slugs = [lesson.slug for lesson in lessons]
    numbers = [lesson.number for lesson in lessons]
    if len(set(slugs)) != len(slugs) or len(set(numbers)) != len(numbers):
        problems.append("course.toml: lesson slugs and numbers must be unique")
    if numbers != sorted(numbers):
        problems.append("course.toml: list the lessons in number order")
    for lesson in lessons:
        if not SLUG.match(lesson.slug):
            problems.append(f"course.toml: slug {lesson.slug!r} should look like 03_fastapi ([a-z0-9_], two digits first)")
    for tree in ("lessons", "solutions"):
        on_disk = {p.name for p in (root / tree).iterdir() if p.is_dir() and p.name not in IGNORED}
        for extra in sorted(on_disk - set(slugs)):
            problems.append(f"{tree}/{extra}/ is not in course.toml: add a [[lessons]] entry or remove the folder")
    for test in sorted((root / "tests").glob("test_*.py")):
        try:
            lesson_of_test_file(test.stem, lessons)
        except LookupError:
            problems.append(f"tests/{test.name} has no lesson in course.toml")
    notebooks = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    for extra in sorted(notebooks - set(slugs)):
        problems.append(f"notebooks/{extra}.ipynb has no lesson in course.toml")
    return problems


def lesson_problems(lesson: Lesson, root: Path = ROOT) -> list[str]:
    problems = []
    folder = lesson.folder("lessons", root)
    solution = lesson.folder("solutions", root)
    for needed in (folder / "README.md", folder / "hints.md", lesson.notebook(root), lesson.test_file(root)):
        if not needed.exists():
            problems.append(f"{needed.relative_to(root)} is missing")
    hints = folder / "hints.md"
    if hints.exists() and not hints.read_text(encoding="utf-8").strip():
        problems.append(f"{hints.relative_to(root)} is empty: give at least one hint per TODO")
    for name in lesson.files:
        exercise, reference = folder / name, solution / name
        if not exercise.exists():
            problems.append(f"lessons/{lesson.slug}/{name} is listed in course.toml but missing")
        elif "# TODO" not in exercise.read_text(encoding="utf-8"):
            problems.append(f"lessons/{lesson.slug}/{name} has no '# TODO': mark what the student must change")
        if not reference.exists():
            problems.append(f"solutions/{lesson.slug}/{name} is missing: every exercise file has a solution twin")
    listed = set(lesson.files)
    for tree, base in (("lessons", folder), ("solutions", solution)):
        if not base.exists():
            continue
        for path in base.glob("*.py"):
            if path.name not in listed:
                problems.append(f"{tree}/{lesson.slug}/{path.name} is not listed in course.toml's files for {lesson.slug}")
    return problems


def module_name_problems(root: Path = ROOT) -> list[str]:
    """Exercise modules load under their own names, so no two lessons may share one."""
    seen: dict[str, str] = {}
    problems = []
    for lesson in load_course(root / "course.toml"):
        for name in lesson.files:
            stem = Path(name).stem
            if stem in seen:
                problems.append(f"{lesson.slug}/{name} has the same module name as {seen[stem]}: rename one")
            seen[stem] = f"{lesson.slug}/{name}"
    return problems


def notebook_output_problems(root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        if any(cell.get("outputs") or cell.get("execution_count") for cell in cells):
            problems.append(f"{path.relative_to(root)} is stored with outputs: clear them (Jupyter: Edit > Clear Outputs of All Cells)")
    return problems


def course_map_problems(root: Path = ROOT) -> list[str]:
    """The README's course map lists exactly the lessons of course.toml, in order."""
    rows = COURSE_MAP_ROW.findall((root / "README.md").read_text(encoding="utf-8"))
    in_readme = [tuple(row) for row in rows]
    in_manifest = [(lesson.number, lesson.title, lesson.slug) for lesson in load_course(root / "course.toml")]
    if in_readme != in_manifest:
        return [f"README.md's course map lists {in_readme}, but course.toml has {in_manifest}"]
    return []
