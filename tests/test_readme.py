"""The README's curl examples, run as written (top to bottom) against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.procs import ROOT, child_env


def readme_shell() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Tokens"):text.index("### WebSocket")]
    return "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))


def test_readme_curl_examples_work(servers: Any, tmp_path: Path) -> None:
    server = servers("--api-key", "secret-producer-key", "--log-level", "warning")
    server.start()
    script = readme_shell().replace("BASE=http://127.0.0.1:8000", f"BASE={server.url}")
    assert script.count("curl ") >= 15
    prelude = (
        "set -euo pipefail\n"
        f'python() {{ "{sys.executable}" "$@"; }}\n'
        # record every answer's status on its own line
        "curl() { command curl -w '\\nHTTP_STATUS %{http_code}\\n' \"$@\"; }\n"
    )
    done = subprocess.run(["bash", "-c", prelude + script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=child_env({"TASKPUSH_DB": str(server.db)}),
                          check=False)
    assert done.returncode == 0, done.stderr
    statuses = [int(s) for s in re.findall(r"HTTP_STATUS (\d+)", done.stdout)]
    assert len(statuses) == script.count("curl ")
    assert all(s in (200, 201, 304) for s in statuses), (statuses, done.stdout)
    assert 304 in statuses  # the If-None-Match example
    # the cancel's answer, and the long poll it released (not an answer at once, before it)
    assert done.stdout.count('"status":"cancelled"') == 2, done.stdout
    token = subprocess.run([sys.executable, "run.py", "token", "--user", "1"], cwd=ROOT,
                           capture_output=True, text=True, check=True,
                           env=child_env({"TASKPUSH_DB": str(server.db)})).stdout.strip()

    def status_of(task_id: str) -> int | str:
        request = urllib.request.Request(  # noqa: S310 (http on loopback)
            f"{server.url}/api/task/task/{task_id}/status",
            headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
                return json.loads(resp.read())["data"]["status"]
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status_of("interview_123") == 404  # deleted by the last example
    assert status_of("resume_42") == "cancelled"
    assert server.stop() == 0


def test_readme_flag_table_lists_every_setting_with_its_variable_and_default() -> None:
    """The table operators read is the one the server parses."""
    import dataclasses

    from server.config import Config, _env_name, _flag_name

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `--"):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            rows[cells[0]] = (cells[1], cells[2])
    expected = {}
    for f in dataclasses.fields(Config):
        shown = "none" if f.default in (None, ()) or f.name in ("jwt_secret", "api_key") \
            else str(f.default)
        expected[_flag_name(f)] = (_env_name(f), shown)
    assert rows == expected
