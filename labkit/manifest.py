"""The course manifest, ``course.toml``: which lessons exist, in which order.

The grader, the course check and the README's course map all read it, so
adding a lesson means adding one ``[[lessons]]`` entry here.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from labkit.settings import TARGETS  # noqa: F401  (re-exported: the trees a grade can read)


@dataclass(frozen=True)
class Lesson:
    """One ``[[lessons]]`` entry of course.toml.

    slug   -- ``NN_name``: the folder in lessons/ and solutions/, the notebook
              ``notebooks/<slug>.ipynb`` and the test file ``tests/test_<slug>.py``.
    title  -- shown in the grade table and the README's course map.
    files  -- the exercise files (relative to the lesson folder) a student edits;
              each has a twin of the same name in solutions/.
    hint   -- one to three lines that ``grade`` prints under a failing lesson.
    needs  -- what the lesson's checks start besides a thread worker, e.g.
              ``["process-worker"]``: documentation for instructors.
    """

    slug: str
    title: str
    files: tuple[str, ...]
    hint: str = ""
    needs: tuple[str, ...] = field(default_factory=tuple)

    @property
    def number(self) -> str:
        return self.slug.split("_", 1)[0]

    def folder(self, target: str, root: Path) -> Path:
        return root / target / self.slug

    def notebook(self, root: Path) -> Path:
        return root / "notebooks" / f"{self.slug}.ipynb"

    def test_file(self, root: Path) -> Path:
        return root / "tests" / f"test_{self.slug}.py"

    def test_files(self, root: Path) -> list[Path]:
        """``test_<slug>.py`` and any ``test_<slug>_*.py`` (e.g. an instructor's hidden checks)."""
        extra = sorted((root / "tests").glob(f"test_{self.slug}_*.py"))
        return [self.test_file(root), *extra]


def load_course(path: Path) -> list[Lesson]:
    """The lessons of the manifest at ``path`` (a course's course.toml), in order."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    if data.get("format_version") != 1:
        raise ValueError(f"{path}: expected format_version = 1")
    return [
        Lesson(
            slug=entry["slug"],
            title=entry["title"],
            files=tuple(entry["files"]),
            hint=entry.get("hint", "").strip(),
            needs=tuple(entry.get("needs", ())),
        )
        for entry in data["lessons"]
    ]


def lesson_of_test_file(stem: str, lessons: list[Lesson]) -> Lesson:
    """The lesson a test file belongs to: ``test_01_first_task`` or ``test_01_first_task_hidden``."""
    name = stem.removeprefix("test_")
    for lesson in lessons:
        if name == lesson.slug or name.startswith(lesson.slug + "_"):
            return lesson
    raise LookupError(f"tests/{stem}.py belongs to no lesson in course.toml")


def find_lesson(key: str, lessons: list[Lesson]) -> Lesson:
    """A lesson by number (``"1"``, ``"01"``) or slug (``"01_first_task"``)."""
    for lesson in lessons:
        if key in (lesson.slug, lesson.number) or (key.isdigit() and int(key) == int(lesson.number)):
            return lesson
    known = ", ".join(lesson.number for lesson in lessons)
    raise LookupError(f"no lesson {key!r} in course.toml (lessons: {known})")
