"""The milter's process plumbing: listen addresses, TCP_NODELAY, signals, start-up checks."""

from __future__ import annotations

import ast
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from milter_support import make_config, make_deployment

from traqmilter.core.address import parse_address
from traqmilter.milter import server
from traqmilter.milter.server import (
    LIBMILTER_SIGNALS,
    RELOAD_SIGNAL,
    build_service,
    libmilter_address,
    set_listener_nodelay,
)
from traqmilter.state import SqliteBlockStore


@pytest.mark.parametrize(
    ("listen", "want"),
    [
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
        ("inet:[::1]:8891", "inet6:8891@::1"),
        ("inet:localhost:25", "inet:25@localhost"),
        ("unix:/run/traqmilter/milter.sock", "unix:/run/traqmilter/milter.sock"),
    ],
)
def test_libmilter_address(listen: str, want: str) -> None:
    assert libmilter_address(listen) == want


def test_nodelay_is_set_on_the_listener_and_inherited() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert set_listener_nodelay(port)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _peer = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_nodelay_needs_a_listener_on_that_port() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening
        assert not set_listener_nodelay(bound.getsockname()[1])


def test_block_signals_blocks_libmilters_and_the_reload_signal() -> None:
    code = (
        "import signal\n"
        "from traqmilter.milter.server import block_signals\n"
        "block_signals()\n"
        "print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    blocked = set(ast.literal_eval(output))
    assert {int(s) for s in (*LIBMILTER_SIGNALS, RELOAD_SIGNAL)} <= blocked
    assert RELOAD_SIGNAL == signal.SIGUSR1


class _Runtime:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        deployment = make_deployment(tmp_path, make_config(**overrides))
        self.engine = deployment.engine
        self.config = deployment.config
        self.store = deployment.store
        self.blocks = SqliteBlockStore.in_state_dir(str(tmp_path))

    @property
    def directory(self) -> _Runtime:
        return self

    def persist_block(self, _block: object) -> None:
        raise AssertionError("no block in these tests")


def test_build_service_counts_mailboxes_create_made(tmp_path: Path) -> None:
    runtime = _Runtime(tmp_path)
    assert runtime.store.create_from_template(parse_address("new@shop.example"), "default")
    service = build_service(runtime)  # type: ignore[arg-type]
    assert service.limits.created_total == 1


def test_blocks_follow_the_state_file(tmp_path: Path) -> None:
    runtime = _Runtime(tmp_path)
    service = build_service(runtime)  # type: ignore[arg-type]
    stop = threading.Event()
    synced = threading.Event()

    class Blocks:
        sync_seconds = 0.01

        def follow(self, table: object, now: float, guard: object) -> bool:
            assert guard is service.decide_lock  # the table is touched beside no engine call
            assert table is runtime.attacks
            stop.set()
            synced.set()
            return True

    runtime.blocks = Blocks()  # type: ignore[attr-defined]
    runtime.attacks = runtime.engine.attacks  # type: ignore[attr-defined]
    thread = threading.Thread(target=server._sync_blocks, args=(runtime, service, stop))
    thread.start()
    thread.join(10)
    assert synced.is_set() and not thread.is_alive()
