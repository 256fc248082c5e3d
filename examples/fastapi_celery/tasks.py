"""The Celery side: one line for taskpush (`install(app)`), and a task that reports progress.

Run a worker:  celery -A examples.fastapi_celery.tasks worker -l INFO
"""

from __future__ import annotations

import os
import time

from celery import Celery
from taskpush_client import progress
from taskpush_client.celery import install

BROKER = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("interviews", broker=BROKER, backend=BROKER)
app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True,
                worker_prefetch_multiplier=1)
install(app)  # reads TASKPUSH_URL and TASKPUSH_API_KEY


@app.task
def generate_questions(interview_id: int, count: int = 5) -> dict[str, object]:
    """The seed's interview generator, now in a worker: no taskpush code but progress()."""
    questions = []
    for i in range(1, count + 1):
        progress(100 * (i - 1) / count, f"Generating question {i}", f"Step {i}/{count}")
        time.sleep(float(os.environ.get("EXAMPLE_STEP_SECONDS", "0.5")))  # the LLM call
        questions.append(f"Question {i} for interview {interview_id}")
    return {"interview_id": interview_id, "questions": questions}
