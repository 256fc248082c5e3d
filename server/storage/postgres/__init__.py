"""The PostgreSQL engine, cluster mode: any number of processes share one database
(`store.PgStore`)."""
