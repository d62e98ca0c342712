"""Every setting labkit takes from the environment, read once, here.

| variable                 | default                       | what it changes                                   |
|--------------------------|-------------------------------|---------------------------------------------------|
| `REDIS_URL`              | (unset: the embedded broker)  | grade on this real Redis instead                  |
| `LABKIT_COURSE`          | the folder holding course.toml, from the current folder up | which course checkout the commands work on |
| `LABKIT_TARGET`          | `lessons`                     | grade `lessons/` or the reference `solutions/`    |
| `LABKIT_REDIS_DB`        | `15`                          | the database checks use (and empty) on a real Redis |
| `LABKIT_WORKER_LOGLEVEL` | `WARNING`                     | log level of the checks' thread workers           |
| `LABKIT_GRADE_TIMEOUT`   | `900`                         | seconds a whole grading run may take              |
| `LABKIT_REAL_REDIS`      | `redis://127.0.0.1:6379`      | the course's own test: the real-Redis leg         |
| `CI`                     | (unset)                       | `true`: that leg fails instead of skipping when no Redis answers |

The CLI builds one ``Settings`` and hands it down; the pytest plugin builds its
own in the grading process. Nothing else reads these variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# Where this labkit package lives: child processes get it on PYTHONPATH, so they grade with the same harness.
LABKIT_HOME = Path(__file__).resolve().parent.parent
TARGETS = ("lessons", "solutions")


def find_course(start: Path) -> Path | None:
    """The nearest folder, from ``start`` up, that holds a course.toml."""
    for folder in (start, *start.parents):
        if (folder / "course.toml").is_file():
            return folder
    return None


@dataclass(frozen=True)
class Settings:
    course: Path  # the course checkout: course.toml, lessons/, solutions/, tests/
    target: str = "lessons"
    redis_url: str | None = None
    redis_db: int = 15
    worker_loglevel: str = "WARNING"
    grade_timeout: float = 900.0
    real_redis: str = "redis://127.0.0.1:6379"
    ci: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
        env = os.environ if environ is None else environ
        given = env.get("LABKIT_COURSE")
        course = Path(given).resolve() if given else find_course((cwd or Path.cwd()).resolve()) or LABKIT_HOME
        target = env.get("LABKIT_TARGET") or "lessons"
        if target not in TARGETS:
            raise ValueError(f"LABKIT_TARGET={target!r}: use one of {', '.join(TARGETS)}")
        return cls(
            course=course,
            target=target,
            redis_url=env.get("REDIS_URL") or None,
            redis_db=int(env.get("LABKIT_REDIS_DB") or 15),
            worker_loglevel=env.get("LABKIT_WORKER_LOGLEVEL") or "WARNING",
            grade_timeout=float(env.get("LABKIT_GRADE_TIMEOUT") or 900),
            real_redis=env.get("LABKIT_REAL_REDIS") or "redis://127.0.0.1:6379",
            ci=env.get("CI") == "true",
        )
