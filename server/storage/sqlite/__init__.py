"""The SQLite engine: one process owns one file (`store.SqliteStore`)."""
