"""Micro-benchmark of the producer path's body validation.

    python -m bench.decode [--seconds 1.0]

Times, in one run, each way of turning a request body into model operations:

- `handwritten`: the path before the contract module (orjson via validate.json_object, then
  the field-by-field checks: register_body / event_body / the batch loop), which is still
  the fallback that words every refusal;
- `msgspec`: validate.decode_* (one msgspec pass against contract.py's Structs, then the
  rules a Struct cannot say), what the server runs now;
- `pydantic`: pydantic v2 models with the same constraints, `model_validate_json`, then
  the same model operations built (and the same depth/size check of result and metadata),
  if pydantic is installed.

Bodies: one typical event, one registration, and a 500-event batch. Prints microseconds per
body and the ratio to `handwritten`; a sanity check makes sure every way builds the same
operations. The ways are interleaved round by round and the best round counts, so a busy
machine slows them alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from server.core import contract, validate
from server.core.model import Change, Register

LIMIT = 65536

EVENT = {"status": "progress", "progress": 42.5, "message": "processing page 17 of 40",
         "step": "extract"}
REGISTER = {"task_id": "report_20240611_0001", "user_id": 12345, "task_type": "report",
            "metadata": {"source": "upload", "pages": 40}}
BATCH = {"events": [{"task_id": f"job_{i % 50}", **EVENT, "progress": i % 101}
                    for i in range(500)]}
BODIES = {"event": orjson.dumps(EVENT), "register": orjson.dumps(REGISTER),
          "batch500": orjson.dumps(BATCH)}


def _handwritten_batch(body: bytes) -> list[Any]:
    return validate.batch_items(validate.json_object(body), LIMIT)


WAYS: dict[str, dict[str, Callable[[bytes], Any]]] = {
    "handwritten": {
        "event": lambda b: validate.event_body("t1", validate.json_object(b), LIMIT),
        "register": lambda b: validate.register_body(validate.json_object(b), LIMIT),
        "batch500": _handwritten_batch,
    },
    "msgspec": {
        "event": lambda b: validate.decode_event("t1", b, LIMIT),
        "register": lambda b: validate.decode_register(b, LIMIT),
        "batch500": lambda b: validate.decode_batch(b, LIMIT),
    },
}


def _pydantic_ways() -> dict[str, Callable[[bytes], Any]] | None:
    try:
        from typing import Annotated, Literal

        from pydantic import BaseModel, ConfigDict, Field
    except ImportError:
        return None
    limits = contract.LIMITS
    status = Literal["pending", "running", "progress", "completed", "failed", "cancelled"]

    def text(name: str) -> Any:
        return Annotated[str | None, Field(default=None, max_length=limits.text[name])]

    class Event(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        status: status
        progress: Annotated[float | None, Field(default=None, ge=0, le=100)] = None
        message: text("message") = None  # type: ignore[valid-type]
        step: text("step") = None  # type: ignore[valid-type]
        error: text("error") = None  # type: ignore[valid-type]
        error_type: text("error_type") = None  # type: ignore[valid-type]
        result: Any = None

    class BatchEvent(Event):
        task_id: Annotated[str, Field(min_length=1, max_length=limits.task_id)]
        idempotency_key: str | None = None

    class Batch(BaseModel):
        model_config = ConfigDict(extra="forbid")
        events: Annotated[list[BatchEvent], Field(max_length=limits.batch_events)]

    class RegisterModel(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern="^[0-9]{1,19}$")]
        task_type: Annotated[str, Field(min_length=1, max_length=limits.task_type)]
        task_id: Annotated[str | None, Field(default=None, max_length=limits.task_id)] = None
        metadata: Any = None

    def change(task: str, m: Any, key: str | None = None) -> Change:
        progress = m.progress
        if progress is not None and progress.is_integer():
            progress = int(progress)
        if "result" not in m.model_fields_set:
            return Change(task, m.status, progress, m.message, m.step, error=m.error,
                          error_type=m.error_type, idem_key=key)
        result = validate.bounded_json(m.result, "result", LIMIT)
        return Change(task, m.status, progress, m.message, m.step, result, m.error,
                      m.error_type, idem_key=key)

    def event(body: bytes) -> Change:
        return change("t1", Event.model_validate_json(body))

    def register(body: bytes) -> Register:
        m = RegisterModel.model_validate_json(body)
        metadata = validate.bounded_json(m.metadata, "metadata", LIMIT)
        return Register(m.task_id, int(m.user_id), m.task_type, metadata, origin="http")

    def batch(body: bytes) -> list[Change]:
        return [change(e.task_id, e, e.idempotency_key)
                for e in Batch.model_validate_json(body).events]

    return {"event": event, "register": register, "batch500": batch}


def _calibrate(fn: Callable[[bytes], Any], body: bytes, seconds: float) -> int:
    """Calls of `fn` that take about `seconds`."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn(body)
        took = time.perf_counter() - start
        if took > 0.02:
            return max(1, int(n * seconds / took))
        n *= 4


def per_call(fns: list[Callable[[bytes], Any]], body: bytes, seconds: float,
             rounds: int = 7) -> list[float]:
    """Seconds per call of each of `fns`: interleaved rounds, the best round of each."""
    counts = [_calibrate(fn, body, seconds / rounds) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (fn, n) in enumerate(zip(fns, counts, strict=True)):
            start = time.perf_counter()
            for _ in range(n):
                fn(body)
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    ways = dict(WAYS)
    pydantic = _pydantic_ways()
    if pydantic is not None:
        ways["pydantic"] = pydantic
    for kind, body in BODIES.items():  # every way builds the same operations
        expected = ways["handwritten"][kind](body)
        for name, fns in ways.items():
            if fns[kind](body) != expected:
                raise SystemExit(f"{name} builds other operations from the {kind} body")
    print(f"python {sys.version.split()[0]}; us per body, best of 7 interleaved rounds "
          f"(xN = handwritten / this way: >1 is faster)")
    print(f"{'body':10} {'bytes':>7} " + " ".join(f"{w:>20}" for w in ways))
    for kind, body in BODIES.items():
        times = per_call([fns[kind] for fns in ways.values()], body, args.seconds)
        cells = [f"{t * 1e6:10.2f} (x{times[0] / t:4.2f})" for t in times]
        print(f"{kind:10} {len(body):7} " + " ".join(f"{c:>20}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
