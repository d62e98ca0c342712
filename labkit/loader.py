"""Load a lesson's exercise modules from the tree being graded.

Modules are imported under their own file names (``first_task1``), the names a
student uses with ``celery -A first_task1 worker``. Celery names tasks after
their module, so the test process, a worker subprocess and the student's own
terminal all agree on task names. The course check keeps module names unique
across lessons, and one process only ever grades one tree.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from types import ModuleType

from labkit.manifest import Lesson


class LessonError(Exception):
    """A lesson's code could not be loaded; the message is meant for the student."""


class Exercise:
    """A loaded exercise module whose missing names fail with a clear message."""

    def __init__(self, module: ModuleType, shown_path: str) -> None:
        self._module = module
        self._shown_path = shown_path

    def __getattr__(self, name: str):
        try:
            return getattr(self._module, name)
        except AttributeError:
            raise LessonError(
                f"MISSING `{name}` in {self._shown_path}: the checks use this name. Did you rename or delete it?"
            ) from None

    @property
    def module(self) -> ModuleType:
        return self._module


def load_exercise(lesson: Lesson, name: str, target: str, root: Path) -> Exercise:
    """Import ``<target>/<lesson>/<name>.py`` (once per process) and wrap it."""
    folder = lesson.folder(target, root)
    path = folder / f"{name}.py"
    shown = f"{target}/{lesson.slug}/{name}.py"
    if not path.exists():
        raise LessonError(f"{shown} is missing: `make reset LESSON={lesson.number}` brings back the starter file.")
    if path in _failed_imports:  # fail every later check at once, not after another wait
        raise LessonError(_failed_imports[path])
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != path.resolve():
            raise LessonError(f"cannot load {shown}: a module named {name!r} was already loaded from {loaded.__file__}")
        return Exercise(loaded, shown)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # so a lesson's files can import each other
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        sys.modules.pop(name, None)
        _failed_imports[path] = f"{shown} could not be imported: {_describe(exc, path)}"
        raise LessonError(_failed_imports[path]) from None
    except BaseException as exc:  # the check's time limit struck while importing
        sys.modules.pop(name, None)
        _failed_imports[path] = f"importing {shown} never finished: is there an endless loop at module level?"
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise LessonError(_failed_imports[path]) from None
    return Exercise(module, shown)


_failed_imports: dict[Path, str] = {}


def _describe(exc: BaseException, path: Path) -> str:
    """One line: the error and the line of the student's file where it happened."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError on line {exc.lineno}: {exc.msg}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
