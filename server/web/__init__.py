"""aiohttp lives here and only here: the typed app keys (`keys`), the HTTP handlers (user
`rest`, `producer`, `demo`), the WebSocket and Server-Sent Events drivers of a session
(`ws`, `sse`), the OpenAPI document (`openapi`), the access log (`accesslog`), the metrics
(`metrics`) and the timed jobs (`jobs`). Imports `config`, `core`, the storage interface,
`push` and `service`; never an engine (`app.py` picks one and hands it in)."""
