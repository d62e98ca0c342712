"""A lesson's hints, one at a time, from its ``hints.md``.

``hints.md`` repeats the lesson's numbered tasks as ``## n. …`` headings, each
with bullets that go from a question to a nudge. Every bullet is one hint, in
file order, shown under its heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HEADING = re.compile(r"^##\s+(.*)$")
BULLET = re.compile(r"^[-*]\s+")


@dataclass(frozen=True)
class Hint:
    heading: str  # e.g. "2. Turn add into a task"
    text: str

    @property
    def todo(self) -> int | None:
        match = re.match(r"(?:TODO\s+)?(\d+)[.:)]?", self.heading)  # "1. …", "TODO 1", "TODO 1: …", "1) …"
        return int(match.group(1)) if match else None


def read_hints(path: Path) -> list[Hint]:
    hints: list[Hint] = []
    heading, bullet = "", None
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := HEADING.match(line):
            heading, bullet = match.group(1).strip(), None
        elif BULLET.match(line):
            hints.append(Hint(heading, BULLET.sub("", line).strip()))
            bullet = len(hints) - 1
        elif line.strip() and bullet is not None:  # a bullet's continuation line
            hints[bullet] = Hint(heading, hints[bullet].text + " " + line.strip())
        else:
            bullet = None if not line.strip() else bullet
    return hints


def next_hint(hints: list[Hint], seen: set[int], stuck_on: int | None) -> int | None:
    """Index of the hint to show: the first unseen one for the TODO the learner is
    stuck on (from the last grading), else the first unseen one; None when all were shown."""
    unseen = [i for i in range(len(hints)) if i not in seen]
    for index in unseen:
        if stuck_on is not None and hints[index].todo == stuck_on:
            return index
    return unseen[0] if unseen else None
