"""Lesson 03: a FastAPI front door that hands the work of jobs1.py to Celery.

Usage (three terminals in this folder, REDIS_URL set in each; the README explains)::

    celery -A jobs1 worker --loglevel=INFO
    uvicorn api1:app --port 8000
    python
    >>> import httpx
    >>> web = httpx.Client(base_url="http://127.0.0.1:8000")
    >>> answer = web.post("/jobs", json={"title": "Fruit", "items": ["apple", "pear"]})
    >>> answer.status_code, answer.headers["location"]
    (202, '/jobs/6f1c0c8e-…')
    >>> web.get(answer.headers["location"]).json()["state"]
    'SUCCESS'
"""

import os
import uuid
from contextlib import asynccontextmanager

import redis
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from jobs1 import ReportRequest, make_report
from jobs1 import app as celery_app

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
KEEP_IDS_FOR = celery_app.conf.result_expires  # as long as Celery keeps results: 1 day


def job_key(job_id: str) -> str:
    """The Redis key that says "this id was submitted here"."""
    return f"api1:job:{job_id}"


@asynccontextmanager
async def lifespan(app: FastAPI):
    # TODO 2: before the yield (server starting), put a Redis client for REDIS_URL, with
    #         short timeouts, on app.state; after it (server stopping), close that client.
    yield


app = FastAPI(title="Report jobs", lifespan=lifespan)


# TODO 3: have FastAPI validate the body as a ReportRequest; pick a new id, record it
#         (job_key, KEEP_IDS_FOR), send make_report with that task_id, and answer
#         {"id": ...} with a Location header, without waiting for the work.
@app.post("/jobs", status_code=202)
def submit_job(body: dict, request: Request, response: Response) -> dict:
    """Queue a report and answer at once: 202 Accepted, and where to ask for news."""
    raise NotImplementedError("TODO 3")


@app.get("/jobs/{job_id}")
def job_status(job_id: str, request: Request) -> dict:
    """Where the job is now: its state, plus its progress, result or error."""
    # TODO 4: 404 unless the id was recorded; else {"id", "state"} plus "progress"
    #         (PROGRESS), "result" (SUCCESS) or "error" (FAILURE), read with AsyncResult.
    raise NotImplementedError("TODO 4")


# TODO 5: register this as the app's handler of redis.ConnectionError, redis.TimeoutError
#         and kombu's OperationalError, and make it answer 503 with a JSON "detail".
async def queue_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 when Redis (the record, the broker or the backend) cannot be reached."""
    raise NotImplementedError("TODO 5")
