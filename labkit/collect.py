"""A pytest plugin for ``grade``: one JSON line per check, written as each one ends.

Lines are appended as the run goes, so a run that is killed (a timeout, a
crash) still leaves the checks it finished; ``grade`` reports the rest as
not run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

OUTPUT_LIMIT = 4000  # characters of captured output kept per check


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--labkit-results", default=None, help="append one JSON line per check to this file")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--labkit-results")
    if path:
        config.pluginmanager.register(ResultWriter(Path(path)), "labkit-results")


def short_message(excinfo: pytest.ExceptionInfo | None, longrepr: object) -> str:
    """The student-facing part of a failure: our sentence, without pytest's assert explanation."""
    if excinfo is None:
        return str(longrepr or "").strip().splitlines()[-1] if longrepr else ""
    value = excinfo.value
    if excinfo.typename in ("Failed", "Skipped"):
        return str(getattr(value, "msg", value)).strip()
    if isinstance(value, AssertionError):
        text = str(value).split("\nassert ", 1)[0].strip()
        return text or "an assertion failed"
    return f"{excinfo.typename}: {value}".strip()


class ResultWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: dict[str, str] = {}
        self.running: dict[str, dict] = {}

    def _write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            task = item.get_closest_marker("task")
            points = item.get_closest_marker("points")
            self._write(
                {
                    "kind": "collected",
                    "nodeid": item.nodeid,
                    "file": Path(str(item.fspath)).name,
                    "name": item.name,
                    "todo": task.args[0] if task else None,
                    "points": points.args[0] if points else 1,
                }
            )

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write({"kind": "collect-error", "file": Path(report.nodeid).name, "message": str(report.longrepr)[-OUTPUT_LIMIT:]})

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        if report.failed and item.nodeid not in self.messages:
            self.messages[item.nodeid] = short_message(call.excinfo, report.longrepr)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Fold setup, call and teardown into one line, written after teardown."""
        check = self.running.setdefault(report.nodeid, {"status": "passed", "duration": 0.0, "output": "", "detail": ""})
        check["duration"] += report.duration
        if check["status"] == "passed" and (report.failed or report.skipped):
            check["status"] = "skipped" if report.skipped else ("failed" if report.when == "call" else "error")
            check["output"] = (report.capstdout + report.capstderr)[-OUTPUT_LIMIT:]
            check["detail"] = str(report.longrepr)[-OUTPUT_LIMIT:]
        if report.when == "teardown":
            del self.running[report.nodeid]
            message = self.messages.get(report.nodeid, "") if check["status"] != "skipped" else check["detail"]
            self._write({"kind": "result", "nodeid": report.nodeid, "message": message, **check})
