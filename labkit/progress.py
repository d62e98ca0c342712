"""The learner's progress: a small JSON file, ``.labkit/progress.json`` (git-ignored).

``grade`` and ``watch`` record each lesson's last result here, so ``list`` and
``watch`` start where the learner left off; ``hint`` remembers which hints
of a lesson were shown.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from labkit.grade import LessonResult

NOT_STARTED, IN_PROGRESS, DONE = "not started", "in progress", "done"


class Progress:
    def __init__(self, root: Path) -> None:
        self.path = root / ".labkit" / "progress.json"
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            self.data = {}
        self.data.setdefault("lessons", {})
        self.data.setdefault("hints", {})

    def save(self) -> None:
        self.path.parent.mkdir(exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True), encoding="utf-8")

    def record(self, results: list[LessonResult]) -> None:
        for result in results:
            failure = result.first_failure
            self.data["lessons"][result.lesson.slug] = {
                "passed": result.passed,
                "total": len(result.checks),
                "done": result.done,
                "next_todo": failure.todo if failure else None,
                "graded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        self.save()

    def last(self, slug: str) -> dict | None:
        return self.data["lessons"].get(slug)

    def status(self, slug: str) -> str:
        last = self.last(slug)
        if last is None or last["passed"] == 0:
            return NOT_STARTED
        return DONE if last["done"] else IN_PROGRESS

    def hints_seen(self, slug: str) -> set[int]:
        return set(self.data["hints"].get(slug, []))

    def mark_hint_seen(self, slug: str, index: int) -> None:
        self.data["hints"][slug] = sorted(self.hints_seen(slug) | {index})
        self.save()
