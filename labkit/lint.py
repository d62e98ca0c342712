"""The course lints itself (like rustlings' ``dev check``): ``make check``, in about a second.

``problems(root)`` runs every rule on the course at ``root`` and returns a list
of sentences, each naming the file and the fix; ``[]`` means the course is
consistent. Each rule is a function of the course root that returns such a list.
It reads files only: it grades nothing, runs no notebook and imports no Celery.
The behavioural half (starter fails, solutions pass, notebooks run) lives in
tests/labkit/test_course.py, which grades every lesson both ways.

What the rules hold together, for each lesson: the ``# TODO n:`` numbers of its
exercise files (1, 2, … with no gap) = the ``@pytest.mark.task(n)`` tags of its
checks = the numbered sections of its hints.md = the numbered tasks of its
README's "Your turn".
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
import tomllib
from pathlib import Path

from labkit.manifest import Lesson, lesson_of_test_file, load_course

FORMAT_VERSION = 1
TOP_LEVEL_KEYS = ("format_version", "lessons")
# The fields of labkit.manifest.Lesson (documented there): required first, then optional.
REQUIRED_KEYS = ("slug", "title", "files")
OPTIONAL_KEYS = ("hint", "needs")

SLUG = re.compile(r"^\d\d_[a-z0-9_]{1,29}$")
COURSE_MAP_ROW = re.compile(r"^\|\s*(\d\d)\s*\|\s*\[([^\]]+)\]\(lessons/([^)/]+)/?\)", re.MULTILINE)
IGNORED = {"__pycache__", ".ipynb_checkpoints"}

TODO_COMMENT = re.compile(r"#\s*TODO\b\s*(\d*)\s*(:?)")  # "# TODO 3: …" (and malformed ones, to report)
TODO_RAISE = re.compile(r"NotImplementedError\(\s*[\"']TODO (\d+)[\"']\s*\)")
TASK_TAG = re.compile(r"\bmark\.task\(\s*(?:taskno\s*=\s*)?(\d+)\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A numbered heading: "1. Connect the app", "1) …", "TODO 1", "TODO 1: …", "Task 1 - …".
NUMBERED = re.compile(r"^(?:(?:TODO|Task)\s+)?(\d+)(?:[.:)]|\s+[-–—]|\s*$)", re.IGNORECASE)
YOUR_TURN = re.compile(r"^your turn\b", re.IGNORECASE)
FORBIDDEN_IMPORTS = ("labkit", "pytest")
LESSON_REFERENCE = re.compile(r"\b[Ll]esson (\d\d)\b")  # "lesson 05", "Lesson 12"
UNKNOWN_KEY = "unknown key"  # the one manifest problem the other rules can run past


def problems(root: Path) -> list[str]:
    """Every rule, on the course at ``root``. A manifest that cannot be read stops the rest."""
    found = manifest_key_problems(root)
    if any(UNKNOWN_KEY not in problem for problem in found):
        return found  # the lessons cannot be read, so every other rule would only add noise
    try:
        lessons = load_course(root / "course.toml")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [*found, f"course.toml cannot be read: {exc}"]
    found += manifest_problems(root)
    for lesson in lessons:
        found += lesson_problems(lesson, root)
        found += todo_problems(lesson, root)
        found += solution_todo_problems(lesson, root)
        found += import_problems(lesson, root)
    found += module_name_problems(root)
    found += app_name_problems(root)
    found += notebook_output_problems(root)
    found += course_map_problems(root)
    found += lesson_reference_problems(root)
    return found


# --- course.toml -----------------------------------------------------------------------------


def manifest_key_problems(root: Path) -> list[str]:
    """course.toml read as plain TOML: format_version, and only known keys in each entry."""
    path = root / "course.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ["course.toml is missing: the course needs its manifest (format_version = 1, then [[lessons]] entries)"]
    except tomllib.TOMLDecodeError as exc:
        return [f"course.toml is not valid TOML ({exc}): fix the syntax"]
    found = []
    version = data.get("format_version")
    if version is None:
        found.append(f"course.toml has no format_version: add `format_version = {FORMAT_VERSION}` at the top")
    elif version != FORMAT_VERSION:
        found.append(f"course.toml has format_version = {version!r}, but labkit reads format_version = {FORMAT_VERSION}: set it to {FORMAT_VERSION}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            found.append(f"course.toml has an {UNKNOWN_KEY} {key!r} at the top level: it holds only format_version and [[lessons]]")
    entries = data.get("lessons")
    if not isinstance(entries, list) or not entries:
        found.append("course.toml lists no lessons: add a [[lessons]] entry per lesson")
        return found
    known = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
    for position, entry in enumerate(entries, start=1):
        name = f"lesson {entry['slug']!r}" if isinstance(entry.get("slug"), str) else f"[[lessons]] entry {position}"
        for key in REQUIRED_KEYS:
            if key not in entry:
                found.append(f"course.toml: {name} has no {key!r}: add it (the keys are documented on Lesson in labkit/manifest.py)")
        for key in entry:
            if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
                found.append(f"course.toml: {name} has an {UNKNOWN_KEY} {key!r}: the known keys are {known}")
        files = entry.get("files")
        if "files" in entry and (not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files)):
            found.append(f"course.toml: {name} has files = {files!r}: list the exercise file names, e.g. files = [\"tasks1.py\"]")
    return found


def manifest_problems(root: Path) -> list[str]:
    """course.toml against the folders on disk: no stray lesson, test or notebook."""
    lessons = load_course(root / "course.toml")
    found = []
    slugs = [lesson.slug for lesson in lessons]
    numbers = [lesson.number for lesson in lessons]
    if len(set(slugs)) != len(slugs) or len(set(numbers)) != len(numbers):
        found.append("course.toml: lesson slugs and numbers must be unique")
    if numbers != sorted(numbers):
        found.append("course.toml: list the lessons in number order")
    for lesson in lessons:
        if not SLUG.match(lesson.slug):
            found.append(f"course.toml: slug {lesson.slug!r} should look like 03_fastapi ([a-z0-9_], two digits first)")
    for tree in ("lessons", "solutions"):
        if not (root / tree).is_dir():
            continue
        on_disk = {p.name for p in (root / tree).iterdir() if p.is_dir() and p.name not in IGNORED}
        for extra in sorted(on_disk - set(slugs)):
            found.append(f"{tree}/{extra}/ is not in course.toml: add a [[lessons]] entry or remove the folder")
    for test in sorted((root / "tests").glob("test_*.py")):
        try:
            lesson_of_test_file(test.stem, lessons)
        except LookupError:
            found.append(f"tests/{test.name} has no lesson in course.toml")
    notebooks = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    for extra in sorted(notebooks - set(slugs)):
        found.append(f"notebooks/{extra}.ipynb has no lesson in course.toml")
    return found


# --- one lesson ------------------------------------------------------------------------------


def lesson_problems(lesson: Lesson, root: Path) -> list[str]:
    """A lesson has all its parts: README, hints, notebook, checks, and each exercise's solution twin."""
    found = []
    folder = lesson.folder("lessons", root)
    solution = lesson.folder("solutions", root)
    for needed in (folder / "README.md", folder / "hints.md", lesson.notebook(root), lesson.test_file(root)):
        if not needed.exists():
            found.append(f"{needed.relative_to(root)} is missing")
    hints = folder / "hints.md"
    if hints.exists() and not hints.read_text(encoding="utf-8").strip():
        found.append(f"{hints.relative_to(root)} is empty: give at least one hint per TODO")
    for name in lesson.files:
        if not (folder / name).exists():
            found.append(f"lessons/{lesson.slug}/{name} is listed in course.toml but missing")
        if not (solution / name).exists():
            found.append(f"solutions/{lesson.slug}/{name} is missing: every exercise file has a solution twin")
    listed = set(lesson.files)
    for tree, base in (("lessons", folder), ("solutions", solution)):
        if not base.exists():
            continue
        for path in sorted(base.glob("*.py")):
            if path.name not in listed:
                found.append(f"{tree}/{lesson.slug}/{path.name} is not listed in course.toml's files for {lesson.slug}")
    return found


def exercise_todos(lesson: Lesson, root: Path) -> tuple[set[int], list[str]]:
    """The ``# TODO n:`` numbers of a lesson's exercise files, and what is wrong with them file by file."""
    numbers: set[int] = set()
    found = []
    for name in lesson.files:
        path = lesson.folder("lessons", root) / name
        if not path.exists():
            continue  # lesson_problems says so
        where = f"lessons/{lesson.slug}/{name}"
        text = path.read_text(encoding="utf-8")
        in_file: set[int] = set()
        for line_number, comment in comments(text):
            for match in TODO_COMMENT.finditer(comment):
                if match.group(1) and match.group(2):
                    in_file.add(int(match.group(1)))
                else:
                    found.append(f"{where}, line {line_number}: write the TODO as `# TODO n: <what to do>`, numbered like the README's tasks")
        if not in_file and not provided(lesson, name, root):
            found.append(f"{where} has no `# TODO n:`: mark what the student must change, numbered from 1")
        for todo in sorted({int(n) for n in TODO_RAISE.findall(text)} - in_file):
            found.append(f'{where} raises NotImplementedError("TODO {todo}") but has no `# TODO {todo}:` comment: add it, or fix the number')
        numbers |= in_file
    if numbers and sorted(numbers) != list(range(1, max(numbers) + 1)):
        found.append(
            f"lessons/{lesson.slug}/ has TODO {_listed(numbers)}: number the TODOs 1 to n with no gap "
            f"({_gaps(numbers)})"
        )
    return numbers, found


def provided(lesson: Lesson, name: str, root: Path) -> bool:
    """A file the lesson hands out complete (a module to read or to test, not to edit): it has no
    TODO and is the same in lessons/ and solutions/, since there is nothing in it to solve."""
    ours, theirs = lesson.folder("lessons", root) / name, lesson.folder("solutions", root) / name
    return ours.exists() and theirs.exists() and ours.read_bytes() == theirs.read_bytes()


def defines_tests(module: ast.Module) -> bool:
    """A file of tests (top-level ``def test_…``): pytest runs it, so it may import pytest."""
    return any(isinstance(node, ast.FunctionDef) and node.name.startswith("test_") for node in module.body)


def comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of each ``#`` comment of Python source (not ``#`` inside strings); [] if it does not tokenize."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    return [(token.start[0], token.string) for token in tokens if token.type == tokenize.COMMENT]


def solution_todo_problems(lesson: Lesson, root: Path) -> list[str]:
    """A solution has no TODO left: each became a ``# Why:`` comment, each body is written."""
    found = []
    for name in lesson.files:
        path = lesson.folder("solutions", root) / name
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        todos = [line for line, comment in comments(text) if TODO_COMMENT.search(comment)]
        if todos:
            found.append(f"solutions/{lesson.slug}/{name}, line {todos[0]}, still has a `# TODO`: turn it into a `# Why:` comment that explains the decision")
        if TODO_RAISE.search(text):
            found.append(f'solutions/{lesson.slug}/{name} still raises NotImplementedError("TODO n"): write the solution')
    return found


def todo_problems(lesson: Lesson, root: Path) -> list[str]:
    """The exercise's TODO numbers = the checks' task tags = hints.md's sections = the README's tasks."""
    todos, found = exercise_todos(lesson, root)
    if not todos or sorted(todos) != list(range(1, len(todos) + 1)):
        return found  # fix the exercise's numbering first: comparing the rest to it would only add noise
    folder = f"lessons/{lesson.slug}/"
    expected = sorted(todos)
    test = lesson.test_file(root)
    if test.exists():
        tags = {int(n) for n in TASK_TAG.findall(test.read_text(encoding="utf-8"))}
        if tags != todos:
            tagged = f"tags checks @pytest.mark.task(n) for n = {_listed(tags)}" if tags else "tags no check @pytest.mark.task(n)"
            found.append(
                f"tests/{test.name} {tagged}, but {folder} has TODO {_listed(todos)}: "
                f"tag at least one check per TODO and none for a TODO that does not exist ({_difference(tags, todos)})"
            )
    hints = lesson.folder("lessons", root) / "hints.md"
    if hints.exists() and hints.read_text(encoding="utf-8").strip():
        sections = numbered_headings(hints.read_text(encoding="utf-8"))
        if sections != expected:
            found.append(
                f"lessons/{lesson.slug}/hints.md has numbered sections {_listed(sections)}, but {folder} has TODO {_listed(todos)}: "
                f"give each TODO one section, in order, headed `## n. <task>` ({_difference(sections, todos)})"
            )
    readme = lesson.folder("lessons", root) / "README.md"
    if readme.exists():
        tasks = your_turn_tasks(readme.read_text(encoding="utf-8"))
        if tasks is None:
            found.append(f"lessons/{lesson.slug}/README.md has no \"## Your turn\" section: add one, with a `## n. <task>` heading per TODO")
        elif tasks != expected:
            found.append(
                f"lessons/{lesson.slug}/README.md's \"Your turn\" has tasks {_listed(tasks)}, but {folder} has TODO {_listed(todos)}: "
                f"give each TODO one task, in order, headed `## n. <task>` ({_difference(tasks, todos)})"
            )
    return found


def headings(markdown: str) -> list[tuple[int, str]]:
    """(level, text) of each Markdown heading, skipping fenced code blocks (their ``#`` lines are comments)."""
    found, fence = [], ""
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = "" if fence == marker else (fence or marker)
            continue
        if not fence and (match := HEADING.match(line)):
            found.append((len(match.group(1)), match.group(2)))
    return found


def _number(heading: str) -> int | None:
    match = NUMBERED.match(heading)
    return int(match.group(1)) if match else None


def numbered_headings(markdown: str) -> list[int]:
    """The numbers of hints.md's sections: ``## 1. …`` or ``## TODO 1``, in file order."""
    return [n for _, text in headings(markdown) if (n := _number(text)) is not None]


def your_turn_tasks(markdown: str) -> list[int] | None:
    """The numbered task headings after "## Your turn", up to the next unnumbered heading of its
    level or above (e.g. "## Check your work"); None when the README has no "Your turn"."""
    tasks, level = None, 0
    for depth, text in headings(markdown):
        if tasks is None:
            if YOUR_TURN.match(text):
                tasks, level = [], depth
            continue
        number = _number(text)
        if number is not None:
            tasks.append(number)
        elif depth <= level:
            break
    return tasks


def import_problems(lesson: Lesson, root: Path) -> list[str]:
    """Lesson and solution files run without the harness: no labkit import, and no pytest import
    outside a file of tests (a testing lesson's exercise is a test file, and pytest runs it)."""
    found = []
    for tree in ("lessons", "solutions"):
        for name in lesson.files:
            path = lesson.folder(tree, root) / name
            where = f"{tree}/{lesson.slug}/{name}"
            module = _parse(path, where, found)
            if module is None:
                continue
            forbidden = ("labkit",) if defines_tests(module) else FORBIDDEN_IMPORTS
            for node in ast.walk(module):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for imported in modules:
                    if imported.split(".")[0] in forbidden:
                        found.append(
                            f"{where}, line {node.lineno}, imports {imported}: lesson and solution files must run "
                            f"without the harness (a student runs them with plain celery and python); remove the import"
                        )
    return found


def _parse(path: Path, where: str, found: list[str]) -> ast.Module | None:
    if not path.exists():
        return None
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        found.append(f"{where} is not valid Python (line {exc.lineno}: {exc.msg}): fix it")
        return None


# --- the whole course ------------------------------------------------------------------------


def module_name_problems(root: Path) -> list[str]:
    """Exercise modules load under their own names, so no two lessons may share one."""
    seen: dict[str, str] = {}
    found = []
    for lesson in load_course(root / "course.toml"):
        for name in lesson.files:
            stem = Path(name).stem
            if stem in seen:
                found.append(f"{lesson.slug}/{name} has the same module name as {seen[stem]}: rename one")
            seen[stem] = f"{lesson.slug}/{name}"
    return found


def app_name_problems(root: Path) -> list[str]:
    """``Celery("<module>")`` names the app after its file (Celery names tasks after it), in the
    exercises, the solutions and the notebooks' demo modules."""
    paths = []
    for lesson in load_course(root / "course.toml"):
        for tree in ("lessons", "solutions"):
            paths += [lesson.folder(tree, root) / name for name in lesson.files]
    paths += sorted((root / "notebooks").glob("*.py"))
    found: list[str] = []
    for path in paths:
        where = str(path.relative_to(root))
        module = _parse(path, where, []) if path.exists() else None  # import_problems reports syntax errors
        for node in ast.walk(module) if module else ():
            if not (isinstance(node, ast.Call) and _called(node.func) == "Celery"):
                continue
            main = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "main"), None)
            name = main.value if isinstance(main, ast.Constant) else None
            if name != path.stem:
                shown = "no name" if main is None else (repr(name) if isinstance(main, ast.Constant) else ast.unparse(main))
                found.append(
                    f"{where}, line {node.lineno}: Celery() gets {shown}, but the module is {path.stem!r}: "
                    f'write Celery("{path.stem}", …) so task names read {path.stem}.<task> everywhere'
                )
    return found


def _called(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def notebook_output_problems(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        except json.JSONDecodeError as exc:
            found.append(f"{path.relative_to(root)} is not valid JSON ({exc}): save it again from Jupyter")
            continue
        if any(cell.get("outputs") or cell.get("execution_count") for cell in cells):
            found.append(f"{path.relative_to(root)} is stored with outputs: clear them (Jupyter: Edit > Clear Outputs of All Cells)")
    return found


def course_map_problems(root: Path) -> list[str]:
    """The README's course map has one row per lesson of course.toml, in order, with its title."""
    readme = root / "README.md"
    if not readme.exists():
        return ["README.md is missing: the course map lives there"]
    rows = {number: (title, slug) for number, title, slug in COURSE_MAP_ROW.findall(readme.read_text(encoding="utf-8"))}
    order = list(rows)
    lessons = load_course(root / "course.toml")
    found = []
    for lesson in lessons:
        if lesson.number not in rows:
            found.append(
                f"README.md's course map has no row for lesson {lesson.number}: add "
                f"`| {lesson.number} | [{lesson.title}](lessons/{lesson.slug}/) | <what the learner builds> |` at the end of the table"
            )
            continue
        title, slug = rows[lesson.number]
        if title != lesson.title:
            found.append(f"README.md's course map calls lesson {lesson.number} {title!r}, but course.toml calls it {lesson.title!r}: use course.toml's title")
        if slug != lesson.slug:
            found.append(f"README.md's course map links lesson {lesson.number} to lessons/{slug}/, but its folder is lessons/{lesson.slug}/: fix the link")
    numbers = [lesson.number for lesson in lessons]
    for extra in [n for n in order if n not in numbers]:
        found.append(f"README.md's course map has a row for lesson {extra}, which course.toml does not list: remove the row or add the lesson")
    if [n for n in order if n in numbers] != [n for n in numbers if n in rows]:
        found.append("README.md's course map lists the lessons out of order: put the rows in course.toml's order")
    return found


# --- wording ---------------------------------------------------------------------------------


def _listed(numbers) -> str:
    shown = sorted(numbers) if isinstance(numbers, set) else list(numbers)
    return ", ".join(str(n) for n in shown) if shown else "none"


def _gaps(numbers: set[int]) -> str:
    missing = [n for n in range(1, max(numbers) + 1) if n not in numbers]
    return f"missing {_listed(missing)}" if missing else "they must start at 1"


def _difference(have, todos: set[int]) -> str:
    """What to change, in words: "no 3; 4 has no TODO; 2 twice"."""
    have_list = list(have)
    parts = []
    missing = sorted(todos - set(have_list))
    extra = sorted(set(have_list) - todos)
    twice = sorted({n for n in have_list if have_list.count(n) > 1}) if not isinstance(have, set) else []
    if missing:
        parts.append(f"missing {_listed(missing)}")
    if extra:
        parts.append(f"{_listed(extra)} {'has' if len(extra) == 1 else 'have'} no TODO")
    if twice:
        parts.append(f"{_listed(twice)} more than once")
    if not parts:
        parts.append("out of order")
    return "; ".join(parts)


def lesson_reference_problems(root: Path) -> list[str]:
    """A lesson text, hint or notebook that names "lesson NN" names a lesson that exists."""
    numbers = {lesson.number for lesson in load_course(root / "course.toml")}
    texts = [*sorted((root / "lessons").glob("*/*.md")), *sorted((root / "notebooks").glob("*.ipynb")), root / "course.toml"]
    found = []
    for path in texts:
        if not path.is_file():
            continue
        missing = sorted(set(LESSON_REFERENCE.findall(path.read_text(encoding="utf-8"))) - numbers)
        if missing:
            named = ", ".join(f"lesson {number}" for number in missing)
            found.append(
                f"{path.relative_to(root)} points to {named}, which course.toml does not have: "
                "name the topic instead (\"the workflows lesson\") until that lesson exists"
            )
    return found
