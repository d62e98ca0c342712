"""Lesson 10 checks: the student's tests for orders10, graded like a mutation test.

The student's orders10_tests.py runs with pytest in child processes, side by side, once
against each version of orders10.py:

- the correct module (the course's copy, tests/mutants_10_testing/orders10.py, so an edited
  lessons/10_testing/orders10.py changes nothing): every test must pass;
- a hollow module, built from it, whose every function and task does nothing and returns None:
  a test that passes there too checks nothing orders10 does (it asserts nothing, or only that a
  task exists), so it counts for nothing;
- one copy per planted bug (MUTANTS). A bug is caught when a test that counts (passes on the
  correct module, fails on the hollow one) fails on its copy.

Each version goes, under the name orders10.py, into a folder of its own that comes first on the
run's import path (sys.path, as PYTHONPATH would put it), next to a copy of the student's file.
Each run has its own key prefix on the broker (ORDERS_KEY_PREFIX, which orders10 passes to kombu
as global_keyprefix), so the worker threads of runs side by side never take each other's tasks.
The runs happen once, for all the checks. Feedback describes a surviving bug in words, never by
its code.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import sys
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labkit.checks import fail
from labkit.manifest import lesson_of_test_file, load_course
from labkit.procs import ChildProcess

MODULE = "orders10"
TESTS = "orders10_tests.py"
REFERENCE = Path(__file__).parent / "mutants_10_testing" / f"{MODULE}.py"
RUN_TIMEOUT = 45.0  # seconds for all the runs together (the check that waits for them has 60)
TEST_TIMEOUT = 15  # seconds for one of the student's tests (pytest-timeout, in the child)

# The child's whole pytest configuration, that of lessons/10_testing/pytest.ini: none of the course's
# (no -p labkit.fixtures, warnings stay warnings), and celery.contrib.pytest loaded (PYTEST_ARGS).
# The runner below imports pytest's plugins before pytest starts, so pytest cannot rewrite their
# asserts and says so; the student's file is imported by pytest, and its asserts are rewritten.
PYTEST_INI = f"""\
[pytest]
timeout = {TEST_TIMEOUT}
junit_family = xunit2
filterwarnings =
    ignore:Call to deprecated setex:DeprecationWarning
    ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what is wrong, in words: what the student reads when it survives
    edits: tuple[tuple[str, str], ...]  # (text of orders10.py, what replaces it): each found exactly once

    def source(self, reference: str) -> str:
        for old, new in self.edits:
            if reference.count(old) != 1:
                raise AssertionError(f"planted bug {self.name!r}: {old!r} is not in {REFERENCE} exactly once")
            reference = reference.replace(old, new)
        return reference


MUTANTS = [
    pytest.param(
        Mutant(
            "quantity",
            "order_total counts each line once, whatever its quantity: 3 apples cost as much as 1",
            (("sum(quantity * unit_price for", "sum(unit_price for"),),
        ),
        marks=pytest.mark.task(1),
        id="quantity-ignored",
    ),
    pytest.param(
        Mutant(
            "euros",
            "charge_card asks the gateway for the amount in euros, not cents: 3.9 for an order of 390 cents",
            (('"amount": amount_cents,', '"amount": amount_cents / 100,'),),
        ),
        marks=pytest.mark.task(2),
        id="amount-in-euros",
    ),
    pytest.param(
        Mutant(
            "twice",
            "place_order sends the charge to the gateway twice: the customer pays twice",
            (
                (
                    "        charge_id = charge_card(",
                    "        charge_card(order_id, total)\n        charge_id = charge_card(",
                ),
            ),
        ),
        marks=pytest.mark.task(2),
        id="charged-twice",
    ),
    pytest.param(
        Mutant(
            "fraction",
            "place_order's result holds a number that equals the right total in your own process, but "
            "that JSON cannot encode, so a real worker fails the task",
            (
                ("import json\n", "import json\nfrom fractions import Fraction\n"),
                ('"total": total,', '"total": Fraction(total),'),
            ),
        ),
        marks=pytest.mark.task(3),
        id="result-not-json",
    ),
    pytest.param(
        Mutant(
            "swallowed",
            "place_order swallows a declined card: the task succeeds with None, as if the order were placed",
            (
                (
                    "    except GatewayDown as exc:",
                    "    except CardDeclined:\n        return None\n    except GatewayDown as exc:",
                ),
            ),
        ),
        marks=pytest.mark.task(4),
        id="declined-card-swallowed",
    ),
    pytest.param(
        Mutant(
            "one-retry",
            "place_order gives up after 1 retry instead of 3 while the gateway is down",
            (("max_retries=3", "max_retries=1"),),
        ),
        marks=pytest.mark.task(5),
        id="too-few-retries",
    ),
]


def hollow(source: str) -> str:
    """``source`` with every function body replaced by ``return None`` (docstrings, decorators,
    classes, routes and settings kept): a module that exists, registers its tasks, and does nothing."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = node.body[:1] if ast.get_docstring(node) is not None else []
            node.body = [*docstring, ast.Return(ast.Constant(None))]
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


@dataclass
class Run:
    """One pytest run of the student's file against one version of orders10."""

    version: str
    folder: Path
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by test name
    problem: str = ""  # the run itself went wrong: not collected, did not finish...

    def read(self) -> None:
        exit_code = self.folder / "exit_code"
        code = int(exit_code.read_text()) if exit_code.exists() else None
        junit = self.folder / "junit.xml"
        if junit.exists():
            self.outcomes = read_junit(junit)
        output = self.folder / "output.txt"
        tail = output.read_text(encoding="utf-8", errors="replace").splitlines()[-6:] if output.exists() else []
        last_lines = " ".join(line.strip() for line in tail if line.strip())
        collect_error = self.outcomes.pop(Path(TESTS).stem, None)  # how JUnit reports a collection error
        if code is None:
            self.problem = f"they had not finished after {RUN_TIMEOUT:g} s (does a test wait without a timeout?)"
        elif collect_error is not None:
            self.problem = f"pytest could not collect {TESTS}: {collect_error.last_error_line()}"
        elif code == 5 or (code == 0 and not self.outcomes):
            self.problem = f"pytest found no test in {TESTS} (a test is a function whose name starts with test_)"
        elif code not in (0, 1) or not self.outcomes:
            self.problem = f"pytest ended with exit code {code}: {last_lines[-300:]}"


@dataclass
class Outcome:
    status: str  # passed | failed | skipped
    message: str = ""  # pytest's one-line summary of the failure
    details: str = ""  # the traceback

    def last_error_line(self) -> str:
        """The "E   ..." line pytest ends a traceback with: the error itself."""
        errors = [line[1:].strip() for line in self.details.splitlines() if line.startswith("E ")]
        return (errors or [self.message or "(no message)"])[-1][:300]


def read_junit(path: Path) -> dict[str, Outcome]:
    """{test name: Outcome} from pytest's JUnit XML report."""
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        prefix = classname.split(".", 1)[1] + "." if "." in classname else ""  # a test class
        outcome = Outcome("passed")
        for child in case:
            if child.tag in ("failure", "error") and outcome.status != "failed":
                outcome = Outcome("failed", (child.get("message") or "").strip(), child.text or "")
            elif child.tag == "skipped" and outcome.status == "passed":
                outcome = Outcome("skipped", (child.get("message") or "").strip())
        outcomes[prefix + case.get("name", "?")] = outcome
    return outcomes


# HARNESS-CANDIDATE: move to labkit (a warm pytest runner for checks that grade a student's tests).
# One child process imports pytest, Celery, kombu and redis once (about 0.9 s of CPU), then forks
# a pytest run per folder: eight runs cost one import instead of eight. Each fork gets the folder
# as its current directory and first on sys.path, that folder's variables (env.json), its output
# in output.txt and its exit code in exit_code; it dies with the runner, and the runner with us.
RUNNER = r"""
import ctypes, json, os, signal, sys

import importlib
import pytest

for name in (  # what a pytest run of Celery tests imports: the worker's parts, pytest's plugins
    "celery.backends.redis celery.contrib.pytest celery.contrib.testing.worker celery.worker.consumer "
    "celery.worker.components celery.worker.strategy celery.worker.autoscale celery.concurrency.solo "
    "celery.app.control celery.app.events celery.app.log celery.events.dispatcher celery.loaders.app "
    "celery.fixups.django billiard.pool kombu.pidbox kombu.transport.redis redis pytest_timeout "
    "celery.worker.consumer.delayed_delivery platformdirs.pytest_plugin pdb readline unittest.mock urllib.request "
    "http.client xml.etree.ElementTree faulthandler"
).split():
    try:
        importlib.import_module(name)
    except ImportError:
        pass

def run(folder, args):
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the runner (Linux)
    except AttributeError:
        pass
    output = os.open(os.path.join(folder, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.chdir(folder)
    sys.path[:1] = [folder]  # python -c put "" (the runner's own folder) first
    with open("env.json") as given:
        os.environ.update(json.load(given))
    code = 3
    try:
        code = int(pytest.main(args))
    finally:
        with open("exit_code", "w") as out:
            out.write(str(code))
        sys.stdout.flush()
        os._exit(code)

args, folders = json.loads(sys.argv[1]), sys.argv[2:]
children = []
for folder in folders:
    pid = os.fork()
    if pid == 0:
        run(folder, args)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def prepare_run(version: str, source: str, tests_source: str, broker_url: str, root: Path) -> Run:
    """A folder with this version of orders10, the student's tests, and what the run needs."""
    folder = root / version
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(source, encoding="utf-8")
    (folder / TESTS).write_text(tests_source, encoding="utf-8")
    (folder / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
    env = {
        "REDIS_URL": broker_url,
        "ORDERS_KEY_PREFIX": f"labkit-l10-{version}-{uuid.uuid4().hex[:8]}:",
    }
    (folder / "env.json").write_text(json.dumps(env), encoding="utf-8")
    return Run(version, folder)


# anyio's plugin (it comes with the notebooks' Jupyter) is left out: 0.2 s of imports per run, unused.
PYTEST_ARGS = [
    TESTS, "-c", "pytest.ini", "-q", "--no-header", "-p", "no:cacheprovider", "-p", "no:anyio",
    "-p", "celery.contrib.pytest", "--junitxml=junit.xml",
]  # fmt: skip


@dataclass
class Results:
    runs: dict[str, Run]
    edited: bool = False  # the graded tree's orders10.py differs from the course's copy
    problem: str = ""  # nothing could run: every check fails with this (a fixture that raised would
    # show it to the first check only)

    @property
    def correct(self) -> Run:
        return self.runs["correct"]

    def failing_on_correct(self) -> list[tuple[str, Outcome]]:
        return [(test, outcome) for test, outcome in self.correct.outcomes.items() if outcome.status != "passed"]

    def vacuous(self) -> list[str]:
        """Tests that pass on the correct module and on the hollow one too: they check nothing."""
        on_hollow = self.runs["hollow"].outcomes
        return [test for test in self._passing() if test in on_hollow and on_hollow[test].status == "passed"]

    def counting(self) -> list[str]:
        """Tests that pass on the correct module and fail (or cannot run) on the hollow one."""
        vacuous = set(self.vacuous())
        return [test for test in self._passing() if test not in vacuous]

    def _passing(self) -> list[str]:
        return [test for test, outcome in self.correct.outcomes.items() if outcome.status == "passed"]

    def caught(self, mutant: Mutant) -> bool:
        """Some test that counts does not pass on the mutant (or the run could not finish there)."""
        counting = [] if self.correct.problem else self.counting()
        outcomes = self.runs[mutant.name].outcomes
        if not outcomes:
            return bool(counting)  # the suite crashed or hung on this copy: that is not a pass
        return any(test not in outcomes or outcomes[test].status != "passed" for test in counting)


@pytest.fixture(scope="module")
def results(target: str, course_root: Path, broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Results:
    """The student's file, run once against every version of orders10: what all the checks read."""
    lesson = lesson_of_test_file(Path(__file__).stem, load_course(course_root / "course.toml"))
    folder = lesson.folder(target, course_root)
    reference = REFERENCE.read_text(encoding="utf-8")
    graded_module = folder / f"{MODULE}.py"
    if target == "solutions":  # the course's own CI: the three copies of orders10 must agree
        for copy in (graded_module, lesson.folder("lessons", course_root) / f"{MODULE}.py"):
            if copy.read_text(encoding="utf-8") != reference:
                return Results({}, problem=f"{copy} differs from {REFERENCE}: the three copies must be the same.")
    tests_file, shown_file = folder / TESTS, f"{target}/{lesson.slug}/{TESTS}"
    if not tests_file.exists():
        return Results({}, problem=f"{shown_file} is missing: `make reset LESSON={lesson.number}` brings back the starter.")
    edited = not graded_module.exists() or graded_module.read_text(encoding="utf-8") != reference
    versions = {"correct": reference, "hollow": hollow(reference)}
    versions.update({param.values[0].name: param.values[0].source(reference) for param in MUTANTS})
    root = tmp_path_factory.mktemp("lesson10-runs")
    tests_source = tests_file.read_text(encoding="utf-8")
    try:
        ast.parse(tests_source)
    except SyntaxError as exc:
        problem = f"{shown_file} has a SyntaxError on line {exc.lineno}: {exc.msg}. Fix it, then grade again."
        return Results({}, problem=problem)
    runs = {name: prepare_run(name, source, tests_source, broker_url, root) for name, source in versions.items()}
    command = [sys.executable, "-c", RUNNER, json.dumps(PYTEST_ARGS), *(str(run.folder) for run in runs.values())]
    env = {"PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1"}  # nothing of the course: orders10 comes from each folder
    runner = ChildProcess(command, name="lesson10-runner", cwd=root, env=env, stop_signal=signal.SIGKILL)
    with runner:  # stopped on the way out: SIGKILL to its process group, forks included
        runner.wait(RUN_TIMEOUT)
    for run in runs.values():
        run.read()
    return Results(runs, edited=edited)


# What a failing test's error usually means here: (text in the error, what to say).
HINTS = [
    (
        "could not reach the payment gateway",
        "the test reached for the real payment gateway; replace it where orders10 looks it up (TODO 2)",
    ),
    ("celery.ping", "start_worker's ping check needs Celery's own ping task; pass perform_ping_check=False (TODO 3)"),
    (
        "TimeoutError: The operation timed out",
        "no worker ran the task in time; does yours take the queue place_order is routed to (TODO 3)?",
    ),
    ("from pytest-timeout", f"the test ran over {TEST_TIMEOUT} s; does it wait for something without a timeout?"),
]


def shown(test: str, outcome: Outcome) -> str:
    """One failing test in a line: its name, its error, and what that error usually means here."""
    line = (outcome.message.splitlines() or [outcome.last_error_line()])[0]
    fixture = re.match(r'^failed on (?:setup|teardown) with "(.*?)"?$', line)
    line, where = (fixture.group(1), " in a fixture") if fixture else (line, "")
    todo = re.search(r"NotImplementedError: TODO (\d+)", line)
    if todo:
        return f"{test} raised NotImplementedError{where}: TODO {todo.group(1)} is still to do"
    text = f"{outcome.message}\n{outcome.details}"
    meaning = next((f": {hint}" for clue, hint in HINTS if clue in text), "")
    return f"{test} failed with {line[:200].rstrip('.')}{where}{meaning}"


def of(count: int, total: int, noun: str) -> str:
    """ "1 of your 6 tests fails", "2 of your 6 tests fail" """
    return f"{count} of your {total} {noun}{'s' if total != 1 else ''} fail{'s' if count == 1 else ''}"


def edited_note(results: Results) -> str:
    if not results.edited:
        return ""
    return f" (Your {MODULE}.py differs from the course's copy, so the grader tests the course's: leave it as it is.)"


def test_your_tests_pass_against_the_correct_module(results):
    if results.problem:
        fail(results.problem)
    correct = results.correct
    if correct.problem:
        fail(f"Your tests could not run against the correct {MODULE}: {correct.problem}.{edited_note(results)}")
    failing = results.failing_on_correct()
    if failing:
        more = f"; and {len(failing) - 1} more" if len(failing) > 1 else ""
        fail(
            f"{of(len(failing), len(correct.outcomes), 'test')} against the correct {MODULE}, where every test "
            f"must pass: {shown(*failing[0])}{more}.{edited_note(results)}"
        )
    if not results.counting():
        fail(
            f"Your tests pass against {MODULE}, and also against a hollow {MODULE} whose every function returns "
            "None at once: they check nothing it does. Assert what the functions and tasks return, what reaches "
            "the gateway, and how the task fails."
        )


def not_counted(results: Results) -> str:
    """Which of the student's tests count for nothing, and why, in a sentence or two ('' if all count)."""
    if results.correct.problem:
        return f" Your tests could not run against the correct {MODULE} (see the first check)."
    failing, vacuous = results.failing_on_correct(), results.vacuous()
    words = ""
    if failing:
        they = "it counts" if len(failing) == 1 else "they count"
        failing_ones = of(len(failing), len(results.correct.outcomes), "test")
        words += f" {failing_ones} against the correct {MODULE}, so {they} for nothing (see the first check)."
    if vacuous:
        names = ", ".join(vacuous[:3]) + (" and more" if len(vacuous) > 3 else "")
        verb, pronoun = ("passes", "it counts") if len(vacuous) == 1 else ("pass", "they count")
        words += f" {names} {verb} against a hollow {MODULE} too, where every function returns None: {pronoun} for nothing."
    return words


@pytest.mark.parametrize("mutant", MUTANTS)
def test_planted_bug_is_caught(results, mutant, request):
    if results.problem:
        fail(results.problem)
    if results.caught(mutant):
        return
    todo = request.node.get_closest_marker("task").args[0]
    survivors = sum(not results.caught(param.values[0]) for param in MUTANTS)
    fail(
        f"Survived: {mutant.bug} (TODO {todo}). No test of yours fails against {MODULE} with this bug planted.\n"
        f"{survivors} of {len(MUTANTS)} planted bugs {'survives' if survivors == 1 else 'survive'} your tests."
        f"{not_counted(results)}"
    )
