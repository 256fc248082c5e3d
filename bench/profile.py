"""Sample the target server with py-spy (if installed) while the stream scenarios run.

``--profile PATH`` writes py-spy's collapsed stacks to PATH and a summary (self and
inclusive share of samples per function) into the JSON. Sampling slows the server a little:
don't use such a run for the headline figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys

from bench.launcher import Server, log


async def start(srv: Server, path: str) -> asyncio.subprocess.Process | None:
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if not exe:
        log("  --profile: py-spy not found (pip install py-spy); not profiling")
        return None
    return await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(srv.proc.pid), "--format", "raw", "--rate", "250",  # type: ignore[union-attr]
        "--nonblocking", "--threads", "-o", path, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)


async def stop(proc: asyncio.subprocess.Process | None, path: str) -> dict | None:
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return summarize(path)


def summarize(path: str, top: int = 30) -> dict | None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    by_file: dict[str, int] = {}
    for line in lines:
        stack, _, n_s = line.rpartition(" ")
        if not stack or not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        frames = [fr.rsplit(":", 1)[0] for fr in stack.split(";")]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
        where = source_file(stack.split(";")[-1])
        by_file[where] = by_file.get(where, 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n

    def pick(d: dict[str, int]) -> list[dict]:
        return [{"function": k, "share": round(v / max(total, 1), 4)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "file": path, "self": pick(self_c), "inclusive": pick(incl),
            "self_by_file": pick(by_file)}


def source_file(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``file.py`` (a package's files keep its folder:
    ``aiohttp/web_protocol.py``); a frame with no file is kept whole."""
    inside = frame[frame.rfind("(") + 1:].rsplit(":", 1)[0] if "(" in frame else frame
    parts = inside.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:][:2])
    return "/".join(parts[-2:]) if len(parts) > 1 else inside
