"""One module per scenario; each ``run`` returns a typed result per server (a dataclass).

idle (memory and CPU per idle socket), latency (fixed single-event rate), rate (the ramp to
the highest single-event rate with p99 under the limit), batch (batched ingest), storm
(every client reconnecting at once), fanout (one update to many sockets of its user and to
admin subscribers), workload (task-queue workers reporting through taskpush-client).
stream.py holds what latency, rate and batch share.
"""

SCENARIOS = ("idle", "latency", "rate", "batch", "storm", "fanout", "workload")
