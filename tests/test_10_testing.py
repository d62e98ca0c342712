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

Each version goes, under the name orders10.py, into a folder of its own that is first on
PYTHONPATH, next to a copy of the student's file. Each run has its own key prefix on the broker
(ORDERS_KEY_PREFIX, which orders10 passes to kombu as global_keyprefix), so the worker threads of
runs side by side never take each other's tasks. The runs happen once, for all the checks.
Feedback describes a surviving bug in words, never by its code.
"""

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
RUN_TIMEOUT = 40.0  # seconds for all the runs together
TEST_TIMEOUT = 15  # seconds for one of the student's tests (pytest-timeout, in the child)

# The child's whole pytest configuration: none of the course's (no -p labkit.fixtures, warnings
# stay warnings). celery.contrib.pytest is loaded for it, so its fixtures work without a line.
PYTEST_INI = f"""\
[pytest]
timeout = {TEST_TIMEOUT}
junit_family = xunit2
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
            "order_total counts each line once, whatever its quantity (3 apples cost as much as 1)",
            (("sum(quantity * unit_price for", "sum(unit_price for"),),
        ),
        marks=pytest.mark.task(1),
        id="quantity-ignored",
    ),
    pytest.param(
        Mutant(
            "euros",
            "charge_card asks the gateway for the amount in euros, not cents (3.9 for an order of 390 cents)",
            (('"amount": amount_cents,', '"amount": amount_cents / 100,'),),
        ),
        marks=pytest.mark.task(2),
        id="amount-in-euros",
    ),
    pytest.param(
        Mutant(
            "twice",
            "place_order sends the charge to the gateway twice: the customer pays twice",
            (("        charge_id = charge_card(", "        charge_card(order_id, total)\n        charge_id = charge_card("),),
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
            (("    except GatewayDown as exc:", "    except CardDeclined:\n        return None\n    except GatewayDown as exc:"),),
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
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # test -> (passed|failed|skipped, message)
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
        if code is None:
            self.problem = f"the tests had not finished after {RUN_TIMEOUT:g} s (a test that waits without a timeout?)"
        elif code == 5 or (code == 0 and not self.outcomes):
            self.problem = f"pytest found no test in {TESTS}: test functions are named test_…"
        elif code not in (0, 1) or not self.outcomes:
            self.problem = f"pytest could not run {TESTS} (exit {code}): {last_lines[-400:]}"


def read_junit(path: Path) -> dict[str, tuple[str, str]]:
    """{test name: (status, first line of its failure)} from pytest's JUnit XML report."""
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        prefix = classname.split(".", 1)[1] + "." if "." in classname else ""  # a test class
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                message = message or (child.get("message") or child.text or "").strip()
            elif child.tag == "skipped" and status == "passed":
                status = "skipped"
        outcomes[prefix + case.get("name", "?")] = (status, message)
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
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the runner
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


PYTEST_ARGS = [
    TESTS, "-c", "pytest.ini", "-q", "--no-header", "-p", "no:cacheprovider", "-p", "no:anyio",
    "-p", "celery.contrib.pytest", "--junitxml=junit.xml",
]  # fmt: skip


@dataclass
class Results:
    runs: dict[str, Run]
    edited: bool  # the graded tree's orders10.py differs from the course's copy

    @property
    def correct(self) -> Run:
        return self.runs["correct"]

    def failing_on_correct(self) -> list[tuple[str, str]]:
        return [(test, message) for test, (status, message) in self.correct.outcomes.items() if status != "passed"]

    def vacuous(self) -> list[str]:
        """Tests that pass on the correct module and on the hollow one: they check nothing."""
        hollow_outcomes = self.runs["hollow"].outcomes
        return [t for t, (s, _) in self.correct.outcomes.items() if s == "passed" and hollow_outcomes.get(t, ("",))[0] == "passed"]

    def counting(self) -> list[str]:
        """Tests that pass on the correct module and fail on the hollow one."""
        vacuous = set(self.vacuous())
        return [t for t, (s, _) in self.correct.outcomes.items() if s == "passed" and t not in vacuous]

    def caught(self, mutant: Mutant) -> bool:
        run = self.runs[mutant.name]
        if self.correct.problem or self.runs["hollow"].problem:
            return False
        if run.problem and not run.outcomes:
            return bool(self.counting())  # the suite crashed or hung on this copy: that is not a pass
        return any(run.outcomes.get(test, ("missing",))[0] != "passed" for test in self.counting())


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, target: str, course_root: Path, broker_url: str, tmp_path_factory) -> Results:
    lesson = lesson_of_test_file(Path(__file__).stem, load_course(course_root / "course.toml"))
    folder = lesson.folder(target, course_root)
    reference = REFERENCE.read_text(encoding="utf-8")
    graded_module = folder / f"{MODULE}.py"
    if target == "solutions":  # the course's own CI: the three copies of orders10 must agree
        for copy in (graded_module, lesson.folder("lessons", course_root) / f"{MODULE}.py"):
            if copy.read_text(encoding="utf-8") != reference:
                fail(f"{copy} differs from {REFERENCE}: the course keeps three identical copies of orders10.py.")
    tests_file = folder / TESTS
    if not tests_file.exists():
        fail(f"{target}/{lesson.slug}/{TESTS} is missing: `make reset LESSON={lesson.number}` brings back the starter file.")
    edited = not graded_module.exists() or graded_module.read_text(encoding="utf-8") != reference
    versions = {"correct": reference, "hollow": hollow(reference)}
    versions.update({param.values[0].name: param.values[0].source(reference) for param in MUTANTS})
    root = tmp_path_factory.mktemp("lesson10-runs")
    tests_source = tests_file.read_text(encoding="utf-8")
    runs = {version: prepare_run(version, source, tests_source, broker_url, root) for version, source in versions.items()}
    command = [sys.executable, "-c", RUNNER, json.dumps(PYTEST_ARGS), *(str(run.folder) for run in runs.values())]
    # Nothing of the course on the path: each run imports orders10 from its own folder.
    runner = ChildProcess(command, name="lesson10-runner", cwd=root, env={"PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1"}, stop_signal=signal.SIGKILL)
    with runner:  # stopped on the way out: SIGKILL to its process group, forks included
        runner.wait(RUN_TIMEOUT)
    for run in runs.values():
        run.read()
    return Results(runs, edited)


def shown(test: str, message: str) -> str:
    """One failing test in a line: its name and the first line of its error."""
    line = (message.strip().splitlines() or ["(no message)"])[0]
    line = re.sub(r'^failed on (setup|teardown) with "(.*?)"?$', r"\2 (in a fixture)", line)
    todo = re.search(r"NotImplementedError: TODO (\d+)", line)
    if todo:
        return f"{test} raised NotImplementedError (TODO {todo.group(1)} is still to do)"
    return f"{test}: {line[:200]}"


def edited_note(results: Results) -> str:
    if not results.edited:
        return ""
    return f" (Your {MODULE}.py differs from the course's copy: the grader tests against the course's. Do not edit it.)"


def test_your_tests_pass_against_the_correct_module(results):
    correct = results.correct
    if correct.problem:
        fail(f"Your tests could not run against the correct {MODULE}: {correct.problem}.{edited_note(results)}")
    failing = results.failing_on_correct()
    if failing:
        more = f"; and {len(failing) - 1} more" if len(failing) > 1 else ""
        fail(
            f"{len(failing)} of your {len(correct.outcomes)} tests fail against the correct {MODULE}, where every "
            f"test must pass: {shown(*failing[0])}{more}.{edited_note(results)}"
        )
    if not results.counting():
        fail(
            f"Your tests pass against {MODULE}, and also against a hollow {MODULE} whose every function returns "
            "None at once: they check nothing it does. Assert what the functions and tasks return, what reaches "
            "the gateway, and how the task fails."
        )


def why_nothing_counts(results: Results) -> str:
    """Why tests did not count, in a few words ('' when every test counts)."""
    if results.correct.problem:
        return f": they could not run against the correct {MODULE} ({results.correct.problem})"
    failing, vacuous = results.failing_on_correct(), results.vacuous()
    reasons = []
    if failing:
        reasons.append(f"{len(failing)} of them fail against the correct {MODULE}, so they count for nothing")
    if vacuous:
        reasons.append(f"{', '.join(vacuous[:3])} pass against a hollow {MODULE} too (every function returns None), so they count for nothing")
    return f" ({'; '.join(reasons)})" if reasons else ""


@pytest.mark.parametrize("mutant", MUTANTS)
def test_planted_bug_is_caught(results, mutant, request):
    if results.caught(mutant):
        return
    todo = request.node.get_closest_marker("task").args[0]
    survivors = [param.values[0] for param in MUTANTS if not results.caught(param.values[0])]
    fail(
        f"Survived: {mutant.bug} (TODO {todo}). No test of yours fails against {MODULE} with this bug planted.\n"
        f"{len(survivors)} of {len(MUTANTS)} planted bugs survive your tests{why_nothing_counts(results)}."
    )
