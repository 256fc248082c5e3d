"""All SQL, and nothing of aiohttp: the interface every engine implements (`api`), the
group-commit writer they share (`writer`), the factory that picks one for `--db`
(`engines`), and the engines themselves (`sqlite/`, `postgres/`). Imports only `core`."""
