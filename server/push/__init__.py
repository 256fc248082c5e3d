"""Delivery without I/O of its own: who gets which committed change (`hub`), the socket
protocol (`messages`, `frames`, the per-connection `outbox` and the `session`), the
connect-time snapshot by pages (`snapshot`), every socket's clocks (`watch`) and the long
polls held per user (`polls`). Imports `core` and the storage interface; never aiohttp,
a driver or the configuration (settings come in as values)."""
