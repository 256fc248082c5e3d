"""方式2：手动推送 (manual notifications) — the original design's example, run as written.

register_task, then notify_started / notify_progress / notify_completed, and notify_failed
when the work raises. Run it: `python -m examples.manual`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server import TaskProgressContext, task_notification_service, task_notifier  # noqa: F401

# ---- the placeholders the design leaves: the position asked about and the real work ----
POSITION = "backend engineer"


async def do_something() -> dict[str, Any]:
    await asyncio.sleep(0.05)  # the real work
    return {"position": POSITION,
            "questions": ["Describe a system you designed.", "How do you test async code?"]}


# 方式2：手动推送
async def generate_interview_questions(position: str = POSITION):
    task_id = "interview_123"

    # 注册任务
    task_notification_service.register_task(
        task_id=task_id,
        user_id=1,
        task_type="interview_generation"
    )

    try:
        # 通知开始
        await task_notification_service.notify_started(task_id)

        # 通知进度
        await task_notification_service.notify_progress(
            task_id,
            progress=50,
            message="正在生成问题..."
        )

        # 执行任务
        result = await do_something()

        # 通知完成
        await task_notification_service.notify_completed(
            task_id,
            result=result
        )

        return result

    except Exception as e:
        # 通知失败
        await task_notification_service.notify_failed(
            task_id,
            error=str(e)
        )
        raise


async def main() -> Any:
    """Run the job; taskpush must be running in this process (create_app + start)."""
    return await generate_interview_questions()


if __name__ == "__main__":
    from examples._serve import run

    run(main)
