"""The demo of notebooks/03_fastapi.ipynb: a Celery app and a FastAPI app (not graded, not the exercise).

Usage (in this folder, with REDIS_URL set, e.g. by ``python -m labkit broker``)::

    celery -A front_door_demo worker --loglevel=INFO --pool=solo
    uvicorn front_door_demo:api --port 8000
    >>> import httpx
    >>> httpx.post("http://127.0.0.1:8000/shouts", json={"words": ["hello", "world"]}).status_code
    202
"""

import os
import time
import uuid
from contextlib import asynccontextmanager

import redis
from celery import Celery
from celery.result import AsyncResult
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field

# Read at import time: set REDIS_URL before importing this module.
REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
SUBMITTED = "front_door_demo:submitted"  # a Redis set: the ids this API handed out
NOTES = "front_door_demo:notes"  # a Redis list the BackgroundTasks example writes to

# --- the Celery side: the worker imports this ------------------------------------------

celery_app = Celery("front_door_demo", broker=REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(task_track_started=True)  # lesson 02: a running job reads STARTED


class ShoutRequest(BaseModel):
    words: list[str] = Field(min_length=1, max_length=20)
    pause: float = Field(default=0.0, ge=0, le=2)  # seconds of pretend work per word


class Shouted(BaseModel):
    text: str
    letters: int


@celery_app.task(bind=True, pydantic=True)
def shout(self, job: ShoutRequest) -> Shouted:
    loud = []
    for done, word in enumerate(job.words, start=1):
        time.sleep(job.pause)
        loud.append(word.upper())
        self.update_state(state="PROGRESS", meta={"current": done, "total": len(job.words)})
    return Shouted(text=" ".join(loud) + "!", letters=sum(len(word) for word in loud))


# --- the web side: uvicorn (or TestClient) runs this --------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.redis = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    yield  # the server runs here
    app.state.redis.close()


api = FastAPI(title="Shouts", lifespan=lifespan)


@api.post("/shouts", status_code=202)
def submit_shout(body: ShoutRequest, request: Request, response: Response) -> dict:
    job_id = str(uuid.uuid4())
    request.app.state.redis.sadd(SUBMITTED, job_id)
    shout.apply_async(args=[body], task_id=job_id)
    response.headers["Location"] = f"/shouts/{job_id}"
    return {"id": job_id}


@api.get("/shouts/{job_id}")
def shout_status(job_id: str, request: Request) -> dict:
    if not request.app.state.redis.sismember(SUBMITTED, job_id):
        raise HTTPException(status_code=404, detail=f"no shout with id {job_id}")
    result = AsyncResult(job_id, app=celery_app)
    answer = {"id": job_id, "state": result.state}
    if result.state == "PROGRESS":
        answer["progress"] = result.info
    elif result.state == "SUCCESS":
        answer["result"] = result.result
    return answer


# --- FastAPI's BackgroundTasks: the web process itself does the work, after answering ----


def write_note(client: redis.Redis, note: str, pause: float) -> None:
    time.sleep(pause)  # slow work, done inside the web server
    client.rpush(NOTES, note)


@api.post("/notes", status_code=202)
def add_note(note: str, background: BackgroundTasks, request: Request, pause: float = 1.0) -> dict:
    background.add_task(write_note, request.app.state.redis, note, pause)
    return {"accepted": note}
