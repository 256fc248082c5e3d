"""方式3：使用上下文管理器 (the progress context) — the original design's example, run as
written. TaskProgressContext reports (done/total)*100 per `increment()`, and completes the
task when the block ends (fails or cancels it on an exception). The task must exist first,
so `main()` registers it before calling the job. Run it: `python -m examples.progress_context`.
"""

from __future__ import annotations

from typing import Any

from server import TaskProgressContext, task_notification_service, task_notifier  # noqa: F401

# ---- the placeholder the design leaves: the position asked about ----
POSITION = "backend engineer"


# 方式3：使用上下文管理器
async def generate_interview_questions(position: str = POSITION):
    task_id = "interview_123"

    async with TaskProgressContext(task_id, total_steps=10) as progress:
        await progress.increment("步骤1: 准备数据")
        await progress.increment("步骤2: 调用LLM")
        # ...


async def main() -> Any:
    """Register the task (the context only reports on it), then run the job."""
    task_notification_service.register_task(
        task_id="interview_123",
        user_id=1,
        task_type="interview_generation",
        metadata={"interview_id": 123},
    )
    return await generate_interview_questions()


if __name__ == "__main__":
    from examples._serve import run

    run(main)
