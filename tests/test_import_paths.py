"""The producer APIs keep the import paths user code has: `from server import ...`,
`server.notify` (the original design's module) and `server.producer_client`, each handing
out the very objects of `server.service`, so a patch or a check made through one path
holds through the other."""

from __future__ import annotations

import server
from server import notify, producer_client
from server.core import errors
from server.service import notify as service_notify
from server.service import producer_client as service_client


def test_the_package_hands_out_the_in_process_api() -> None:
    for name in server.__all__:
        home = errors if name == "StorageUnavailable" else service_notify
        assert getattr(server, name) is getattr(home, name), name


def test_server_notify_is_the_service_api() -> None:
    assert notify.__all__
    for name in notify.__all__:
        assert getattr(notify, name) is getattr(service_notify, name), name


def test_server_producer_client_is_the_service_client() -> None:
    assert producer_client.__all__
    for name in producer_client.__all__:
        assert getattr(producer_client, name) is getattr(service_client, name), name
