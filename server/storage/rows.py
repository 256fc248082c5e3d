"""Rows of the tables as both engines read and write them: the column list, the status
lists of the partial indexes, the codec between a `tasks` row and a `model.Task`, and the
merge of a replay page's task rows with its tombstones.

The codec runs once per row read or written, so each dialect's conversions are fixed at
construction as (column index, function) pairs: a column that needs nothing costs
nothing (no hook per field)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from msgspec.structs import astuple

from ..core import jsonutil
from ..core.model import ACTIVE, STATUSES, TASK_COLUMNS, TASK_TYPES, TERMINAL, Task
from .api import PAGE_ROWS


def _in_list(statuses: frozenset[str]) -> str:
    """`('a', 'b')` in `model.STATUSES` order: the text of the schema's partial indexes,
    which a query must repeat to the letter for the planner to use them."""
    return "(" + ", ".join(f"'{s}'" for s in STATUSES if s in statuses) + ")"


ACTIVE_SQL = _in_list(ACTIVE)
TERMINAL_SQL = _in_list(TERMINAL)
# schema.sql and schema.postgres.sql: `WHERE status IN (...)` of tasks_active_by_user etc.
assert ACTIVE_SQL == "('pending', 'running', 'progress')"
assert TERMINAL_SQL == "('completed', 'failed', 'cancelled')"

# the tasks table's columns are model.Task's fields: rows are read and written in that order
COLUMNS = ", ".join(TASK_COLUMNS)
SEQ = TASK_COLUMNS.index("seq")
PROGRESS = TASK_COLUMNS.index("progress")
JSON_COLUMNS = tuple(i for i, name in enumerate(TASK_COLUMNS) if TASK_TYPES[name] is Any)
# free text (optional strings; ids and types are printable)
FREE_COLUMNS = tuple(i for i, name in enumerate(TASK_COLUMNS) if TASK_TYPES[name] == str | None)
HISTORY_COLUMNS = ("seq", "status", "progress", "message", "step", "error", "error_type",
                   "timestamp")
_HISTORY_TEXT = tuple(HISTORY_COLUMNS.index(n) for n in ("message", "step", "error",
                                                         "error_type"))

Convert = Callable[[Any], Any]


def dumps(value: Any) -> str | None:
    return None if value is None else jsonutil.dumps(value)


def loads(text: str | None) -> Any:
    return None if text is None else jsonutil.loads(text)


def number(value: float) -> float | int:
    """A REAL column's value as the field holds it (3.0 is the integer 3)."""
    return int(value) if float(value).is_integer() else value


def _reader(read: tuple[tuple[int, Convert], ...]) -> Callable[[Sequence[Any]], Task]:
    def task(row: Sequence[Any]) -> Task:
        """A row (the columns in order) as a Task."""
        values = list(row)
        for i, convert in read:
            values[i] = convert(values[i])
        return Task(*values)

    return task


def _writer(write: tuple[tuple[int, Convert], ...]) -> Callable[[Task], list[Any]]:
    def row(task: Task) -> list[Any]:
        """The task's column values, as the driver takes them."""
        values = list(astuple(task))
        for i, convert in write:
            values[i] = convert(values[i])
        return values

    return row


class RowCodec:
    """`tasks` row <-> `Task` for one dialect. `bools`: the driver gives 0/1 for a
    boolean column (SQLite); `text_in`/`text_out`: what free text needs on its way in and
    out (PostgreSQL cannot hold U+0000); `float_progress`: the driver wants a float."""

    __slots__ = ("_text_out", "row", "task")

    def __init__(self, *, bools: bool = False, text_in: Convert | None = None,
                 text_out: Convert | None = None, float_progress: bool = False) -> None:
        from_column: dict[Any, Convert] = {Any: loads, float: number}
        if bools:
            from_column[bool] = bool
        read = [(i, from_column[TASK_TYPES[name]]) for i, name in enumerate(TASK_COLUMNS)
                if TASK_TYPES[name] in from_column]
        write: list[tuple[int, Convert]] = [(i, dumps) for i in JSON_COLUMNS]
        if text_out is not None:
            read += [(i, text_out) for i in FREE_COLUMNS]
        if text_in is not None:
            write += [(i, text_in) for i in FREE_COLUMNS]
        if float_progress:
            write.append((PROGRESS, float))
        self._text_out = text_out
        # plain functions over the fixed pairs (no attribute lookups per row)
        self.task: Callable[[Sequence[Any]], Task] = _reader(tuple(read))
        self.row: Callable[[Task], list[Any]] = _writer(tuple(write))

    def tasks(self, rows: Iterable[Sequence[Any]]) -> list[Task]:
        task = self.task
        return [task(row) for row in rows]

    def history(self, rows: Sequence[Sequence[Any]], limit: int
                ) -> tuple[list[dict[str, Any]], int | None]:
        """`HISTORY_SQL`'s rows (`limit + 1` asked for) as a page of events, and the seq
        to continue after (None: no more)."""
        events = []
        for row in rows[:limit]:
            values = list(row)
            if self._text_out is not None:
                for i in _HISTORY_TEXT:
                    values[i] = self._text_out(values[i])
            events.append(dict(zip(HISTORY_COLUMNS, values, strict=True)))
        return events, (events[-1]["seq"] if len(rows) > limit else None)

    def merge_tombstones(self, rows: list[Any], more: bool, upto: int,
                         deleted: Sequence[Sequence[Any]]
                         ) -> tuple[list[Task | tuple[str, int]], int | None]:
        """A replay page: task rows with seq in (after, `upto`] (`more`: rows follow
        them) and the tombstones up to `page_top` (at most PAGE_ROWS), in seq order; and
        the cursor of the next page (None at the end)."""
        top = page_top(rows, more, upto)
        if len(deleted) == PAGE_ROWS:  # many deletions: the page ends at the last one read
            top = deleted[-1][1]
            rows = [row for row in rows if row[SEQ] <= top]
            more = True
        changed: list[Task | tuple[str, int]] = self.tasks(rows)
        if deleted:
            changed.extend((row[0], row[1]) for row in deleted)
            changed.sort(key=lambda item: item.seq if isinstance(item, Task) else item[1])
        return changed, (top if more else None)


def page_top(rows: Sequence[Sequence[Any]], more: bool, upto: int) -> int:
    """The highest seq a replay page covers: its last task row's when more rows follow
    (the tombstones are read up to it), else all the way to `upto`."""
    return rows[-1][SEQ] if more else upto
