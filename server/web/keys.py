"""Typed application state: every key the app stores, in one place."""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..core.auth import TokenVerifier
from ..push.hub import Hub
from ..push.polls import PollSlots
from ..push.snapshot import ByteBudget
from ..push.watch import TokenDeadlines, Watched
from ..service.tasks import TaskService
from ..storage.api import Store
from .metrics import Metrics

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
POLLS = web.AppKey("polls", PollSlots)
TASKS = web.AppKey("tasks", TaskService)
VERIFIER = web.AppKey("verifier", TokenVerifier)
METRICS = web.AppKey("metrics", Metrics)
SNAPSHOT_BUDGET = web.AppKey("snapshot_budget", ByteBudget)
SOCKETS: web.AppKey[set[Watched]] = web.AppKey("sockets", set)  # every socket and stream
DEADLINES = web.AppKey("deadlines", TokenDeadlines)
DEMO_RUNNERS: web.AppKey[set[object]] = web.AppKey("demo_runners", set)
