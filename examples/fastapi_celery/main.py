"""The web app: a FastAPI endpoint that sends a Celery task for the logged-in user, and the
page that shows its progress with taskpush's `static/taskpush.js`.

Run it:  uvicorn examples.fastapi_celery.main:app --port 8001   (see README.md here)

Users log in with a JWT signed with the secret taskpush verifies (`TASKPUSH_JWT_SECRET`);
the same token opens the page's WebSocket to taskpush. `/login` is a demo stand-in for the
app's real login.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from taskpush_client.celery import for_user

from .tasks import generate_questions

SECRET = os.environ.get("TASKPUSH_JWT_SECRET", "")
TASKPUSH_PUBLIC_URL = os.environ.get("TASKPUSH_PUBLIC_URL", "http://127.0.0.1:8000")
PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

app = FastAPI(title="interviews (taskpush + Celery example)")


def current_user(authorization: Annotated[str, Header()] = "") -> int:
    """The logged-in user, from `Authorization: Bearer <JWT>` (sub = user id)."""
    token = authorization.removeprefix("Bearer ").strip()
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        return int(claims["sub"])
    except (jwt.PyJWTError, KeyError, ValueError):
        raise HTTPException(401, "log in first") from None


class Login(BaseModel):
    user_id: int


class NewInterview(BaseModel):
    interview_id: int
    count: int = 5


@app.post("/login")
def login(body: Login) -> dict[str, Any]:
    """Demo login: a one-hour token for any user id."""
    if not SECRET:
        raise HTTPException(500, "set TASKPUSH_JWT_SECRET")
    claims = {"sub": str(body.user_id), "exp": int(time.time()) + 3600}
    return {"token": jwt.encode(claims, SECRET, algorithm="HS256"), "user_id": body.user_id}


@app.post("/interviews")
def start_interview(body: NewInterview, user: Annotated[int, Depends(current_user)]
                    ) -> dict[str, Any]:
    """Send the task for this user; the page follows it by its id over taskpush."""
    sent = generate_questions.apply_async((body.interview_id, body.count),
                                          headers=for_user(user))
    return {"task_id": sent.id}


@app.get("/", response_class=HTMLResponse)
def page() -> str:
    return PAGE.replace("{{TASKPUSH}}", TASKPUSH_PUBLIC_URL)
