"""Fixtures for the policyd tests (helpers live in policyd_support)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from policyd_support import Deployment, PolicyClient, ServerThread, make_deployment


@pytest.fixture
def deployment() -> Deployment:
    return make_deployment()


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """start_server(handler, **PolicyServer options) -> a running ServerThread, stopped
    at the end of the test."""
    started: list[ServerThread] = []

    def start(handler: Callable[..., str], **options: Any) -> ServerThread:
        server = ServerThread(handler, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def serve(
    deployment: Deployment, start_server: Callable[..., ServerThread]
) -> Callable[..., ServerThread]:
    """serve(**PolicyServer options) -> a running ServerThread answering with the
    deployment's adapter, stopped at the end of the test."""
    return lambda **options: start_server(deployment.adapter, **options)


@pytest.fixture
def connect() -> Iterator[Callable[..., PolicyClient]]:
    """connect(port) or connect(unix_path=...) -> a PolicyClient closed after the test."""
    clients: list[PolicyClient] = []

    def open_client(port: int = 0, *, unix_path: str = "") -> PolicyClient:
        client = PolicyClient(port, unix_path=unix_path)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()
