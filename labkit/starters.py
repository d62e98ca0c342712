"""The starter files of each lesson, kept so that ``reset`` works without git.

The first labkit command (``make`` runs one while setting up) keeps a copy of
every exercise file in ``.labkit/starters/<slug>/``: git's committed version
when there is one (in case the learner edited the file before running any
command), else the file as it is. If that copy is gone, ``reset`` falls back
to the version git has committed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from labkit.manifest import Lesson, load_course


def snapshot_dir(root: Path) -> Path:
    return root / ".labkit" / "starters"


def save_starters(root: Path) -> None:
    """Keep a copy of each exercise file that has none yet (never overwrites one)."""
    for lesson in load_course(root / "course.toml"):
        for name in lesson.files:
            source, copy = lesson.folder("lessons", root) / name, snapshot_dir(root) / lesson.slug / name
            if copy.exists() or not source.exists():
                continue
            copy.parent.mkdir(parents=True, exist_ok=True)
            committed = _committed(lesson, name, root)
            if committed is None:
                shutil.copy2(source, copy)
            else:
                copy.write_text(committed, encoding="utf-8")


def _committed(lesson: Lesson, name: str, root: Path) -> str | None:
    """The file as git has it at HEAD, or None (no git, or not committed)."""
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:lessons/{lesson.slug}/{name}"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 else None


def starter_text(lesson: Lesson, name: str, root: Path) -> str | None:
    """The starter version of ``lessons/<slug>/<name>``, or None if neither the copy nor git has it."""
    copy = snapshot_dir(root) / lesson.slug / name
    if copy.exists():
        return copy.read_text(encoding="utf-8")
    return _committed(lesson, name, root)


def changed_files(lesson: Lesson, root: Path) -> list[str]:
    """The exercise files of ``lesson`` that differ from their starter version."""
    changed = []
    for name in lesson.files:
        current = lesson.folder("lessons", root) / name
        starter = starter_text(lesson, name, root)
        if starter is None or not current.exists() or current.read_text(encoding="utf-8") != starter:
            changed.append(name)
    return changed


def reset_lesson(lesson: Lesson, root: Path) -> list[str]:
    """Write the starter files back; returns the files restored."""
    restored = []
    for name in lesson.files:
        starter = starter_text(lesson, name, root)
        if starter is None:
            raise FileNotFoundError(f"no starter copy of lessons/{lesson.slug}/{name} (.labkit/starters/ is gone and git has none)")
        target = lesson.folder("lessons", root) / name
        if not target.exists() or target.read_text(encoding="utf-8") != starter:
            target.write_text(starter, encoding="utf-8")
            restored.append(name)
    return restored
