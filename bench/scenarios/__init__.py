"""One module per scenario; each ``run`` returns a typed result per server (a dataclass).

idle (memory and CPU per idle socket), latency (fixed single-event rate), rate (the ramp to
the highest single-event rate with p99 under the limit), batch (batched ingest), storm
(every client reconnecting at once). stream.py holds what latency, rate and batch share.
"""

SCENARIOS = ("idle", "latency", "rate", "batch", "storm")
