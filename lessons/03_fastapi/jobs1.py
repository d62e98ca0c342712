"""Lesson 03: the work behind the front door (the Celery half; the web half is api1.py).

Usage (in this folder, with REDIS_URL set, e.g. by ``python -m labkit broker``)::

    celery -A jobs1 worker --loglevel=INFO
    python
    >>> from jobs1 import make_report
    >>> make_report.delay({"title": "Fruit", "items": ["apple", "pear"]}).get(timeout=10)
    {'title': 'Fruit', 'count': 2, 'lines': ['1. apple', '2. pear']}
"""

import os
import time

from celery import Celery
from pydantic import BaseModel, Field

# Where Redis listens. The grader and `python -m labkit broker` tell you this URL.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

app = Celery("jobs1", broker=REDIS_URL, backend=REDIS_URL)
# As in lesson 02: record STARTED, so a job being worked on does not look like a queued one.
app.conf.update(task_track_started=True)


class ReportRequest(BaseModel):
    """What a client may ask for: checked by FastAPI at the door, and again by the worker."""

    title: str = Field(min_length=1, max_length=80)
    items: list[str] = Field(min_length=1, max_length=100)
    pause: float = Field(default=0.0, ge=0, le=2)  # seconds of pretend work per item


class Report(BaseModel):
    """What the task gives back."""

    title: str
    count: int
    lines: list[str]


# TODO 1: make make_report a Celery task that gets itself as `self` (for update_state)
#         and turns the dict in the message into a ReportRequest (and the Report it
#         returns back into a dict): two options of @app.task.
def make_report(self, spec: ReportRequest) -> Report:
    """Work through the items one by one, telling clients how far it got."""
    lines = []
    for done, item in enumerate(spec.items, start=1):
        time.sleep(spec.pause)  # stands in for real work: a query, a PDF page, an API call
        lines.append(f"{done}. {item}")
        self.update_state(state="PROGRESS", meta={"current": done, "total": len(spec.items)})
    return Report(title=spec.title, count=len(lines), lines=lines)
