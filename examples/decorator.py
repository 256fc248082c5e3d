"""方式1：使用装饰器 (the decorator) — the original design's example, run as written.

`@task_notifier` registers the task and reports it running when the function is called,
completed with its return value, failed with its exception, cancelled when cancelled.
Run it: `python -m examples.decorator`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server import TaskProgressContext, task_notification_service, task_notifier  # noqa: F401

# ---- the placeholders the design leaves: a position to ask about and an LLM client ----
POSITION = "backend engineer"


class FakeLLM:
    async def generate(self, position: str) -> list[str]:
        await asyncio.sleep(0.05)  # a model call takes a while
        return [f"Tell me about a {position} project you are proud of.",
                "How do you debug a slow SQL query?",
                "What does a WebSocket close code 1001 mean?"]


llm = FakeLLM()


# 方式1：使用装饰器
@task_notifier(
    task_id="interview_123",
    user_id=1,
    task_type="interview_generation",
    metadata={"interview_id": 123}
)
async def generate_interview_questions(position: str = POSITION):
    # 任务逻辑
    questions = await llm.generate(position)
    return questions


async def main() -> Any:
    """Run the job; taskpush must be running in this process (create_app + start)."""
    return await generate_interview_questions()


if __name__ == "__main__":
    from examples._serve import run

    run(main)
