"""Helpers for the policyd tests: an engine with a fake directory, a real PolicyServer on
its own event-loop thread (loopback, port 0), a blocking policy client, Postfix requests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from policyd.adapter import PolicyAdapter
from policyd.server import PolicyServer
from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core.attack import AttackTable, Block
from traqmilter.core.engine import Engine
from traqmilter.core.settings import Config, DictionaryAttackSettings, DomainPolicy
from traqmilter.queue_gauge import FixedQueueGauge

T = TypeVar("T")
TIMEOUT = 10.0
NOW = 1_000_000.0
OMIT = "\0omit"
KNOWN = frozenset({"alice@example.com", "bob@example.com", "josé@example.com"})


@dataclass
class Deployment:
    """An engine and its adapter, with the effects the adapter performed."""

    engine: Engine
    queue: FixedQueueGauge
    adapter: PolicyAdapter
    blocks: list[Block] = field(default_factory=list)


def make_deployment(*, threshold: int = 3) -> Deployment:
    config = Config(
        domains={
            "example.com": DomainPolicy(),
            "example.net": DomainPolicy(reject_text="No mailbox {recipient} here"),
        },
        dictionary_attack=DictionaryAttackSettings(threshold=threshold),
    )
    queue = FixedQueueGauge()
    attacks = AttackTable(threshold=threshold, window_seconds=600, block_seconds=3600)
    engine = Engine(config, InMemoryDirectory(KNOWN), attacks, queue, lambda: NOW)
    blocks: list[Block] = []
    return Deployment(engine, queue, PolicyAdapter(engine, blocks.append), blocks)


class ServerThread:
    """A PolicyServer running on an event loop in a background thread."""

    def __init__(self, handler: Callable[..., str], **options: Any) -> None:
        options.setdefault("listen", "inet:127.0.0.1:0")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = PolicyServer(handler, **options)
        self.run(self.server.start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def call(self, function: Callable[[], T]) -> T:
        """Run function on the server's loop (its state is not thread-safe) and return."""

        async def on_loop() -> T:
            return function()

        result: T = self.run(on_loop())
        return result

    @property
    def port(self) -> int:
        return self.server.port

    def connection_count(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


class PolicyClient:
    """A blocking policy-protocol client, like one Postfix smtpd process."""

    def __init__(self, port: int = 0, *, unix_path: str = "") -> None:
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(unix_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._received = b""

    def send(self, data: bytes, chunk: int = 0) -> None:
        if not chunk:
            self.sock.sendall(data)
            return
        for offset in range(0, len(data), chunk):
            self.sock.sendall(data[offset : offset + chunk])

    def send_until_refused(self, data: bytes, chunk: int = 65536) -> None:
        """Send hostile bytes; the server may close (reset) before all of them are sent."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send(data, chunk)

    def reply(self) -> bytes | None:
        """The next reply (`action=...\\n\\n`), or None if the connection ends first."""
        while b"\n\n" not in self._received:
            chunk = self._recv()
            if not chunk:
                return None
            self._received += chunk
        reply, _, self._received = self._received.partition(b"\n\n")
        return reply + b"\n\n"

    def ask(self, request: bytes, chunk: int = 0) -> bytes | None:
        self.send(request, chunk)
        return self.reply()

    def read_to_eof(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        data = self._received
        self._received = b""
        while chunk := self._recv():
            data += chunk
        return data

    def is_open(self) -> bool:
        """True when the server has neither closed this connection nor sent anything."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(TIMEOUT)
        return False

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.sock.close()


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition on server state that no event signals (e.g. reading paused)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def policy_request(**attributes: str) -> bytes:
    """A request as Postfix 3.7 sends it at RCPT time, with the given attributes changed
    (a value of OMIT leaves the attribute out)."""
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "203.0.113.5",
        "client_name": "mail.sender.example",
        "client_port": "54321",
        "reverse_client_name": "mail.sender.example",
        "server_address": "192.0.2.25",
        "server_port": "25",
        "helo_name": "mail.sender.example",
        "sender": "someone@sender.example",
        "recipient": "alice@example.com",
        "recipient_count": "0",
        "queue_id": "",
        "instance": "1c3f.66a1b2c3.9f1e.0",
        "size": "12345",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "TLSv1.3",
        "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256",
        "policy_context": "",
        "compatibility_level": "3.6",
        "mail_version": "3.7.11",
    }
    base.update(attributes)
    lines = "".join(f"{name}={value}\n" for name, value in base.items() if value != OMIT)
    return (lines + "\n").encode("utf-8")
