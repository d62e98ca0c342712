"""Machine-readable grading results: JSON for classroom tools, JUnit XML for CI systems."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from labkit.grade import LessonResult

OUTPUT_LIMIT = 2000  # characters of a failing check's output kept in the exports
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")  # e.g. ANSI colour codes


def _xml(text: str) -> str:
    return NOT_XML.sub("", text)


def as_dict(results: list[LessonResult]) -> dict:
    lessons = []
    for result in results:
        earned, possible = result.points
        lessons.append(
            {
                "lesson": result.lesson.slug,
                "title": result.lesson.title,
                "passed": result.passed,
                "total": len(result.checks),
                "points": earned,
                "max_points": possible,
                "problem": result.problem,
                "checks": [
                    {
                        "lesson": check.lesson,
                        "name": check.name,
                        "todo": check.todo,
                        "status": check.status,
                        "points": check.points if check.passed else 0,
                        "max_points": check.points,
                        "message": check.message,
                        "output": check.output[-OUTPUT_LIMIT:],
                    }
                    for check in result.checks
                ],
            }
        )
    earned = sum(lesson["points"] for lesson in lessons)
    possible = sum(lesson["max_points"] for lesson in lessons)
    return {"points": earned, "max_points": possible, "lessons": lessons}


def write_json(results: list[LessonResult], path: Path) -> None:
    path.write_text(json.dumps(as_dict(results), indent=2), encoding="utf-8")


def write_junit(results: list[LessonResult], path: Path) -> None:
    suites = ET.Element("testsuites", name="celery-labs")
    for result in results:
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=result.lesson.slug,
            tests=str(len(result.checks)),
            failures=str(sum(c.status == "failed" for c in result.checks)),
            errors=str(sum(c.status in ("error", "not run") for c in result.checks) + bool(result.problem and not result.checks)),
            skipped=str(sum(c.status == "skipped" for c in result.checks)),
        )
        if result.problem and not result.checks:
            case = ET.SubElement(suite, "testcase", classname=result.lesson.slug, name="collect")
            ET.SubElement(case, "error", message=result.problem[:500])
        for check in result.checks:
            case = ET.SubElement(suite, "testcase", classname=result.lesson.slug, name=check.name, time=f"{check.duration:.3f}")
            if check.status == "failed":
                ET.SubElement(case, "failure", message=_xml(check.message)).text = _xml(check.output[-OUTPUT_LIMIT:])
            elif check.status in ("error", "not run"):
                ET.SubElement(case, "error", message=_xml(check.message or result.problem or check.status)).text = _xml(check.output[-OUTPUT_LIMIT:])
            elif check.status == "skipped":
                ET.SubElement(case, "skipped", message=check.message)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
