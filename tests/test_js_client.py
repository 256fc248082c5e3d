"""The JS client's polling fallback, run by Node against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent / "js" / "polling_fallback.js"
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def test_polling_fallback_starts_from_the_current_state_and_follows_changes(servers: Any
                                                                            ) -> None:
    key = "polling-producer-key"
    server = servers("--demo-task-seconds", "1", "--api-key", key, "--log-level", "warning")
    server.start()
    done = subprocess.run(["node", str(SCRIPT), server.url, key], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "polling" in seen["states"]
    assert seen["active"][0] == [seen["running"]]  # the snapshot: active tasks only
    assert seen["quick"] in seen["completed"]  # a change after the snapshot arrives
    assert seen["failed"] == [] and seen["replayed"] == 0  # history is not replayed as new
    assert f"{seen['old']}:failed" in seen["known"]  # but its state is known
    assert server.stop() == 0
