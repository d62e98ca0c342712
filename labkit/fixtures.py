"""The pytest plugin: options, the broker for the session, lessons and workers.

Options: ``--target lessons|solutions`` (also ``LABKIT_TARGET``) picks the tree to
grade; ``--broker URL`` (also ``REDIS_URL``) picks a real Redis instead of the
embedded one. On a real Redis the checks use database 15 (``LABKIT_REDIS_DB``)
and empty it before every check, so a shared server is safe. The environment
is read once, by ``labkit.settings``.

A lesson's test file is ``tests/test_<slug>.py``; its checks ask for
``exercise("first_task1")`` to load code, and ``thread_worker(app)`` or
``process_worker("first_task1")`` to run a real worker.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from labkit import workers
from labkit.broker import broker_process, is_reachable, with_db
from labkit.loader import Exercise, LessonError, load_exercise
from labkit.manifest import TARGETS, Lesson, lesson_of_test_file, load_course
from labkit.settings import Settings

SETTINGS = Settings.from_env()  # this grading process's environment, read once


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labkit", "Celery Labs")
    group.addoption(
        "--target",
        choices=TARGETS,
        default=SETTINGS.target,
        help="grade the student's lessons/ (default) or the reference solutions/",
    )
    group.addoption(
        "--broker",
        default=SETTINGS.redis_url,
        help="a real Redis URL (default: REDIS_URL, else the embedded broker)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "task(n): the TODO number of the lesson this check grades")
    config.addinivalue_line("markers", "points(n): what the check is worth (default 1)")


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--target")


@pytest.fixture(scope="session")
def broker_url(request: pytest.FixtureRequest) -> str:
    """The broker of this test session; lesson code finds it in REDIS_URL."""
    given = request.config.getoption("--broker")
    with ExitStack() as stack:
        if given:
            url = with_db(given, SETTINGS.redis_db)
            if not is_reachable(url):
                pytest.exit(f"No Redis answers at {given}. Start it, or unset REDIS_URL to use the embedded broker.", 3)
        else:
            url = stack.enter_context(broker_process())
        previous = os.environ.get("REDIS_URL")
        os.environ["REDIS_URL"] = url
        yield url
        if previous is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = previous


@pytest.fixture
def redis_client(broker_url: str):
    """A client on the test's broker database, emptied before the check."""
    client = redis.Redis.from_url(broker_url, socket_timeout=10)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def course_root(request: pytest.FixtureRequest) -> Path:
    """The course being graded: pytest's rootdir (a student's checkout, or a gradebook workspace)."""
    return Path(request.config.rootpath)


@pytest.fixture
def lesson(request: pytest.FixtureRequest, course_root: Path) -> Lesson:
    """The lesson of this test file (``tests/test_01_first_task*.py`` -> 01_first_task)."""
    return lesson_of_test_file(Path(str(request.node.fspath)).stem, load_course(course_root / "course.toml"))


@pytest.fixture
def exercise(lesson: Lesson, target: str, course_root: Path, redis_client):
    """``exercise("first_task1")`` imports the module from the tree being graded."""

    def load(name: str) -> Exercise:
        try:
            return load_exercise(lesson, name, target, course_root)
        except LessonError as exc:
            pytest.fail(f"Lesson {lesson.number}: {exc}", pytrace=False)

    return load


@pytest.fixture
def thread_worker():
    """``with``-less: ``thread_worker(app)`` starts a worker thread, stopped after the check."""
    with ExitStack() as stack:

        def start(app, **options):
            return stack.enter_context(workers.thread_worker(app, **{"loglevel": SETTINGS.worker_loglevel, **options}))

        yield start


@pytest.fixture
def process_worker(lesson: Lesson, target: str, course_root: Path, broker_url: str):
    """``process_worker("first_task1", pool="prefork")`` runs the real ``celery worker`` command."""
    with ExitStack() as stack:

        def start(module: str, **options):
            cwd = lesson.folder(target, course_root)
            return stack.enter_context(workers.process_worker(module, cwd, **options))

        yield start


@pytest.fixture
def beat_processes(lesson: Lesson, target: str, course_root: Path, broker_url: str, tmp_path: Path):
    """``with beat_processes("scheduling1", count=2, env={...}) as beats:`` runs real ``celery beat``
    commands in the lesson's folder, their schedule files in the check's temporary folder."""

    def start(module: str, **options):
        return workers.beat_processes(module, lesson.folder(target, course_root), tmp_path, **options)

    return start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Worker problems are the student's to read: show the message, not our traceback."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance((workers.WorkerError, LessonError)):
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
