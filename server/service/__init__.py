"""The write path and the producer APIs over it: `TaskService` (`tasks`, every change goes
through it), the in-process producer API (`notify`) and its HTTP twin for other processes
(`producer_client`). Imports `core` and the storage interface; never aiohttp's server."""
