"""One process owns the database (SQLite: the file lock says so): every commit is this
node's, handed to the listeners as it is (no copy, no conversion: the hot path), and this
node runs every job."""

from __future__ import annotations

from ..core.model import Task
from .api import Listeners
from .writer import Committed


class LocalFeed:
    """The `Feed` of a database one process writes: nothing to catch up, nothing lost."""

    __slots__ = ("horizon", "last_seq", "listeners")

    def __init__(self, listeners: Listeners) -> None:
        self.listeners = listeners
        self.last_seq = 0  # advanced by the engine inside its commit
        self.horizon = 0

    def published(self, committed: Committed, seconds: float) -> None:
        """on_publish (local), then on_commit."""
        self.listeners.publish(committed.outcomes, True)
        self.listeners.committed(committed.outcomes, seconds)

    async def catch_up(self, seq: int) -> None:
        """Every change of this database is this process's: nothing to catch up."""


class SingleNode:
    """The `Nodes` of one process: it leads every job, and no other node can be gone."""

    async def lead(self, name: str) -> bool:
        return True

    async def gone_nodes_tasks(self) -> list[Task]:
        return []
