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
    # Why: one client (one connection pool) for the whole web process, made when the
    # server starts and closed when it stops. It connects on first use, so the server
    # still starts while Redis is down, and its timeouts keep a dead Redis from hanging us.
    app.state.redis = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    yield
    app.state.redis.close()


app = FastAPI(title="Report jobs", lifespan=lifespan)


# Why: the annotation is the validation: FastAPI answers 422 before this runs. The
# record is written first: it fails in milliseconds if Redis is down (Celery would
# retry for seconds), and the id exists before any worker can finish the job.
@app.post("/jobs", status_code=202)
def submit_job(body: ReportRequest, request: Request, response: Response) -> dict:
    """Queue a report and answer at once: 202 Accepted, and where to ask for news."""
    job_id = str(uuid.uuid4())
    request.app.state.redis.set(job_key(job_id), "submitted", ex=KEEP_IDS_FOR)
    make_report.apply_async(args=[body], task_id=job_id)
    response.headers["Location"] = f"/jobs/{job_id}"
    return {"id": job_id}


@app.get("/jobs/{job_id}")
def job_status(job_id: str, request: Request) -> dict:
    """Where the job is now: its state, plus its progress, result or error."""
    # Why: Celery reads PENDING for an id it never saw, so only our record can tell
    # "never submitted" (404) from "waiting for a worker" (200, PENDING).
    if not request.app.state.redis.exists(job_key(job_id)):
        raise HTTPException(status_code=404, detail=f"no job with id {job_id}")
    result = AsyncResult(job_id, app=celery_app)
    state, info = result.state, result.info
    answer = {"id": job_id, "state": state}
    if state == "PROGRESS":
        answer["progress"] = info
    elif state == "SUCCESS":
        answer["result"] = info
    elif state == "FAILURE":
        answer["error"] = f"{type(info).__name__}: {info}"
    return answer


# Why: "Redis is down" is not a bug in this request (500) but a service that is
# unavailable for now (503). One handler covers both endpoints and every Redis call.
@app.exception_handler(redis.ConnectionError)
@app.exception_handler(redis.TimeoutError)
@app.exception_handler(OperationalError)
async def queue_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 when Redis (the record, the broker or the backend) cannot be reached."""
    body = {"detail": "task queue unavailable, try again later"}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
