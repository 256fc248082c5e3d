"""docs/workers.md's Python snippets name nothing they do not import or define, but for
the few names the prose leaves to the reader's own app (checked with ruff's undefined-name
rule, F821, on each snippet as its own module)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.procs import ROOT

DOC = ROOT / "docs" / "workers.md"

# the reader's: the Celery app and its task, the user, an RQ queue, an arq pool, ids
THE_READERS = {"app", "generate", "user", "queue", "redis", "interview_id", "resume_id"}


def test_every_snippet_imports_what_it_uses() -> None:
    snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(snippets) >= 4
    undefined: dict[int, set[str]] = {}
    for index, snippet in enumerate(snippets):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select",
             "F821", "--output-format", "json", "--stdin-filename", f"snippet{index}.py", "-"],
            input=snippet, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode in (0, 1), done.stderr
        names = {re.sub(r"Undefined name `(.*)`", r"\1", d["message"])
                 for d in json.loads(done.stdout)} - THE_READERS
        if names:
            undefined[index] = names
    assert undefined == {}, undefined
