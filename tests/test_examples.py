"""The original design's three backend examples (examples/), run against a real app.

Each test connects user 1's WebSocket, runs the example's `main()` in this process (the
`client` fixture's app binds `task_notification_service`) and checks what the socket sees
and what the database recorded. Also: a user's cancel over REST interrupts an in-process
job (its coroutine gets CancelledError) and the task ends cancelled, not failed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from examples import decorator, manual, progress_context
from server import TaskProgressContext, task_notification_service, task_notifier
from tests.conftest import Client, auth, handshake, recv, recv_until, ws_connect
from tests.procs import ROOT, child_env

TERMINAL = {"completed", "failed", "cancelled"}
TASK_ID = "interview_123"


def _is_final(message: dict[str, Any]) -> bool:
    return message.get("type") == "task_status" and message.get("status") in TERMINAL


async def _updates_until_final(ws: Any) -> list[dict[str, Any]]:
    seen = await recv_until(ws, _is_final)
    assert all(m["type"] == "task_status" and m["task_id"] == TASK_ID for m in seen), seen
    seqs = [m["seq"] for m in seen]
    assert seqs == sorted(set(seqs)), seqs  # strictly increasing
    return seen


async def _status(client: Client, task_id: str = TASK_ID) -> dict[str, Any]:
    resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(1))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


async def _history(client: Client, task_id: str = TASK_ID) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/task/task/{task_id}/history", headers=auth(1))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]["events"]


async def _no_more_updates(ws: Any) -> None:
    """Nothing is queued for this socket: a ping is answered by the very next message."""
    await ws.send_json({"type": "ping"})
    assert (await recv(ws))["type"] == "pong"


# ---- 方式1: the decorator -------------------------------------------------------------

async def test_decorator_example(client: Client) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    result = await decorator.main()
    assert result and all(isinstance(q, str) for q in result)
    seen = await _updates_until_final(ws)
    assert [m["status"] for m in seen] == ["pending", "running", "completed"]
    final = seen[-1]
    assert final["result"] == result
    assert final["progress"] == 100
    assert final["user_id"] == 1 and final["task_type"] == "interview_generation"
    assert final["metadata"] == {"interview_id": 123}
    assert await _status(client) == {k: v for k, v in final.items() if k != "type"}
    await _no_more_updates(ws)
    await ws.close()


async def test_decorator_example_failure(client: Client, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    class BrokenLLM:
        async def generate(self, position: str) -> list[str]:
            raise ValueError(f"model refused: {position}")

    monkeypatch.setattr(decorator, "llm", BrokenLLM())
    ws = await ws_connect(client, 1)
    await handshake(ws)
    with pytest.raises(ValueError, match="model refused"):
        await decorator.main()
    seen = await _updates_until_final(ws)
    assert [m["status"] for m in seen] == ["pending", "running", "failed"]
    assert seen[-1]["error"] == "model refused: backend engineer"
    assert seen[-1]["error_type"] == "ValueError"
    await ws.close()


# ---- 方式2: manual notifications ------------------------------------------------------

async def test_manual_example(client: Client) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    result = await manual.main()
    assert result["questions"]
    seen = await _updates_until_final(ws)
    assert [m["status"] for m in seen] == ["pending", "running", "progress", "completed"]
    assert seen[2]["progress"] == 50 and seen[2]["message"] == "正在生成问题..."
    assert seen[-1]["result"] == result and seen[-1]["progress"] == 100
    assert [e["status"] for e in await _history(client)] == [
        "pending", "running", "progress", "completed"]
    await _no_more_updates(ws)
    await ws.close()


async def test_manual_example_failure(client: Client, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    async def broken() -> None:
        raise RuntimeError("LLM quota exceeded")

    monkeypatch.setattr(manual, "do_something", broken)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    with pytest.raises(RuntimeError, match="quota"):
        await manual.main()
    seen = await _updates_until_final(ws)
    assert [m["status"] for m in seen] == ["pending", "running", "progress", "failed"]
    failed = seen[-1]
    assert failed["error"] == "LLM quota exceeded"
    assert failed["progress"] == 50  # where it got to
    assert failed["result"] is None
    assert (await _status(client))["status"] == "failed"
    await _no_more_updates(ws)
    await ws.close()


# ---- 方式3: the progress context ------------------------------------------------------

async def test_progress_context_example(client: Client) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    assert await progress_context.main() is None
    seen = await _updates_until_final(ws)
    statuses = [m["status"] for m in seen]
    assert statuses[:2] == ["pending", "running"] and statuses[-1] == "completed"
    progress = seen[2:-1]
    # a socket may get consecutive progress updates coalesced, never the last one lost
    assert progress and all(m["status"] == "progress" for m in progress)
    assert progress[-1]["progress"] == 20 and progress[-1]["message"] == "步骤2: 调用LLM"
    assert progress[-1]["step"] == "Step 2/10"
    assert seen[-1]["progress"] == 100
    # the database has every step
    history = await _history(client)
    assert [(e["status"], e["progress"], e["message"]) for e in history] == [
        ("pending", 0, None),
        ("running", 0, "started"),
        ("progress", 10, "步骤1: 准备数据"),
        ("progress", 20, "步骤2: 调用LLM"),
        ("completed", 100, "completed"),
    ]
    await _no_more_updates(ws)
    await ws.close()


async def test_progress_context_needs_a_registered_task(client: Client) -> None:
    """Run without main()'s register_task, the example refuses instead of inventing a task."""
    with pytest.raises(Exception, match="not registered"):
        await progress_context.generate_interview_questions()
    resp = await client.get(f"/api/task/task/{TASK_ID}/status", headers=auth(1))
    assert resp.status == 404


# ---- a user's cancel interrupts an in-process job -------------------------------------

def _decorated_job(task_id: str, entered: asyncio.Event, outcome: dict[str, Any]) -> Any:
    @task_notifier(task_id=task_id, user_id=1, task_type="report_export")
    async def job() -> str:
        entered.set()
        try:
            await asyncio.Event().wait()  # works until interrupted
        except asyncio.CancelledError:
            outcome["cancelled"] = True
            raise
        return "never"

    return job


def _context_job(task_id: str, entered: asyncio.Event, outcome: dict[str, Any]) -> Any:
    async def job() -> None:
        task_notification_service.register_task(task_id=task_id, user_id=1,
                                                task_type="report_export")
        async with TaskProgressContext(task_id, total_steps=10) as progress:
            await progress.increment("step 1")
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                outcome["cancelled"] = True
                raise

    return job


@pytest.mark.parametrize("make_job", [_decorated_job, _context_job],
                         ids=["decorator", "progress-context"])
async def test_cancel_over_rest_interrupts_inprocess_task(client: Client, make_job: Any
                                                          ) -> None:
    task_id = "export_7"
    ws = await ws_connect(client, 1)
    await handshake(ws)
    entered = asyncio.Event()
    outcome: dict[str, Any] = {}
    runner = asyncio.create_task(make_job(task_id, entered, outcome)())
    await asyncio.wait_for(entered.wait(), 5)
    resp = await client.post(f"/api/task/task/{task_id}/cancel", headers=auth(1))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["status"] == "cancelled"

    done, _ = await asyncio.wait({runner}, timeout=5)
    assert runner in done and runner.cancelled()
    assert outcome == {"cancelled": True}  # the job's coroutine saw CancelledError

    seen = await recv_until(ws, _is_final)
    assert seen[-1]["task_id"] == task_id and seen[-1]["status"] == "cancelled"
    assert seen[-1]["cancel_requested"] is True
    await _no_more_updates(ws)  # the job's own end report was refused, not pushed
    task = await _status(client, task_id)
    assert task["status"] == "cancelled" and task["error_type"] is None
    history = await _history(client, task_id)
    assert history[-1]["status"] == "cancelled"
    assert "failed" not in [e["status"] for e in history]
    await ws.close()


# ---- each example also runs on its own ------------------------------------------------

@pytest.mark.slow  # runs each example as a process
@pytest.mark.parametrize("module", ["decorator", "manual", "progress_context"])
def test_example_runs_as_a_program(module: str) -> None:
    """`python -m examples.X` starts a real app, runs the example and exits cleanly."""
    done = subprocess.run([sys.executable, "-m", f"examples.{module}"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "[ws] connected" in done.stdout
    assert f"[ws] {TASK_ID}" in done.stdout
    assert "'status': 'completed'" in done.stdout
    assert "main() returned" in done.stdout
