"""Run SMTP conversations through TraqMilter in-process with pymilter's TestCtx.

A Deployment is a real engine over a real SQLite directory (in tmp_path), a recording DSN
submitter and a MilterService; Conversation drives one connection the way libmilter does
(negotiate, connect, MAIL, each RCPT with its ESMTP parameters, DATA, headers, body, EOM)
and records what the milter asked of the MTA.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import Milter
from Milter.testctx import TestCtx

from traqmilter.core.attack import AttackTable
from traqmilter.core.dsn import DsnMessage
from traqmilter.core.engine import Engine
from traqmilter.core.settings import Action, BounceSettings, Config, CreateSettings, DomainPolicy
from traqmilter.directory.sqlite import SqliteDirectory
from traqmilter.metrics import Metrics
from traqmilter.milter.adapter import TraqMilter
from traqmilter.milter.service import MilterService
from traqmilter.milter.submit import SubmitError
from traqmilter.queue_gauge import FixedQueueGauge

NOW = 1_750_000_000.0
MTA_HOSTNAME = "mx.example.com"
MAILBOXES = ("alice@example.com", "admin@fwd.example", "bob@shop.example")
ALL_PROTOCOL_STEPS = 0x1FFFFF  # what TestCtx offers: every step, every no-reply flag
BODY_CHUNK = 65536  # what libmilter hands over at most per body callback


@dataclass
class RecordingSubmitter:
    submitted: list[DsnMessage] = field(default_factory=list)
    failure: str | None = None

    def submit(self, dsn: DsnMessage) -> None:
        if self.failure is not None:
            raise SubmitError(self.failure)
        self.submitted.append(dsn)


@dataclass
class Deployment:
    """What a milter process holds: the runtime's engine and config, and the service."""

    engine: Engine
    store: SqliteDirectory
    submitter: RecordingSubmitter
    service: MilterService

    @property
    def config(self) -> Config:
        return self.engine.config


def make_config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "domains": {
            "example.com": DomainPolicy(),
            "fwd.example": DomainPolicy(action=Action.FORWARD, forward_to="admin"),
            "bounce.example": DomainPolicy(action=Action.BOUNCE, bounce_to="any"),
            "old.example": DomainPolicy(action=Action.READDRESS, readdress_to="example.com"),
            "shop.example": DomainPolicy(action=Action.CREATE, template="bob"),
            "split.example": DomainPolicy(
                action=Action.OUTBOX, outbox_relay="[mx2.example.net]:25"
            ),
        },
        "bounce": BounceSettings(reporting_mta=MTA_HOSTNAME),
        "create": CreateSettings(),
    }
    settings.update(overrides)
    return Config(**settings)


class EngineRuntime:
    """The runtime a MilterService reads its engine and config from, around one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def config(self) -> Config:
        return self.engine.config


def make_deployment(
    tmp_path: Path, config: Config | None = None, **service_options: Any
) -> Deployment:
    """service_options: more MilterService arguments (digests, hooks, ...)."""
    store = SqliteDirectory(str(tmp_path / "directory.sqlite"))
    for address in MAILBOXES:
        store.bulk_add([address])
    cfg = config or make_config()
    attacks = AttackTable(threshold=100, window_seconds=600, block_seconds=3600)
    engine = Engine(cfg, store, attacks, FixedQueueGauge(), clock=lambda: NOW)
    submitter = RecordingSubmitter()
    service = MilterService(
        EngineRuntime(engine),
        mailboxes=lambda: store,
        submitter=submitter,
        clock=lambda: NOW,
        **service_options,
    )
    return Deployment(engine, store, submitter, service)


class RecordingCtx(TestCtx):  # type: ignore[misc]
    """TestCtx that understands NOREPLY (Postfix offers it; TestCtx takes it for a refusal)
    and keeps the headers the milter added, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.added_headers: list[tuple[str, str]] = []

    def _negotiate(self) -> int:
        # TestCtx hands the milter its class-level default_opts list, which negotiation
        # changes in place: every connection must be offered everything afresh.
        TestCtx.default_opts = [Milter.CURR_ACTS, ALL_PROTOCOL_STEPS, 0, 0]
        result: int = super()._negotiate()
        return result

    def _connect(self, host: str, helo: str, ip: str) -> int:
        self._negotiate()
        self._stage = Milter.M_CONNECT
        result: int = Milter.connect_callback(self, host, socket.AF_INET, ip)
        self._stage = None
        return Milter.CONTINUE if result == Milter.NOREPLY else result

    def addheader(self, field: str, value: str, idx: int) -> None:
        super().addheader(field, value, idx)
        self.added_headers.append((field, value))


@dataclass
class Outcome:
    mail: int
    rcpts: dict[str, int]
    eom: int | None
    reply: tuple[str, ...] | None
    added: list[tuple[str, str | None]]
    deleted: list[str]
    headers: list[tuple[str, str]]
    data: int | None = None  # the DATA answer; anything but CONTINUE ends the message there

    @property
    def accepted_unchanged(self) -> bool:
        """The MTA goes on with the message as received: ACCEPT at DATA, or CONTINUE at
        end of message without a change."""
        unchanged = not (self.added or self.deleted or self.headers)
        return unchanged and (self.data == Milter.ACCEPT or self.eom == Milter.CONTINUE)


class Conversation:
    """One connection to a fresh TraqMilter, as libmilter would drive it."""

    def __init__(
        self,
        service: MilterService,
        *,
        client: str = "192.0.2.10",
        name: str = "client.test",
        metrics: Metrics | None = None,
    ) -> None:
        Milter.factory = lambda: TraqMilter(service, metrics=metrics)
        self.ctx = RecordingCtx()
        self.ctx._setsymval("j", MTA_HOSTNAME)
        self.ctx._setsymval("i", "4QUEUEID")
        self.ctx._setsymval("_", f"{name} [{client}]")
        self.connect_result = self.ctx._connect(host=name, helo="client.test", ip=client)

    @property
    def milter(self) -> TraqMilter:
        instance: TraqMilter = self.ctx.getpriv()
        return instance

    def send(
        self,
        sender: str,
        recipients: list[str | tuple[str, ...]],
        *,
        mail_params: tuple[str, ...] = (),
        headers: list[tuple[str, str | bytes]] | None = None,
        body: bytes = b"Hello.\r\n",
    ) -> Outcome:
        ctx = self.ctx
        ctx._reply = None
        ctx._addrcpt, ctx._delrcpt, ctx.added_headers = [], [], []
        ctx._body = None
        mail = ctx._envfrom(f"<{sender}>" if sender else "<>", *mail_params)
        rcpts: dict[str, int] = {}
        for item in recipients:
            address, *params = (item,) if isinstance(item, str) else item
            rcpts[address] = self._at(
                Milter.M_ENVRCPT,
                self.milter.envrcpt_bytes,
                f"<{address}>".encode(),
                *(p.encode() for p in params),
            )
        if not any(code == Milter.CONTINUE for code in rcpts.values()):
            return Outcome(mail, rcpts, None, ctx._reply, [], [], [])
        data = ctx._data()
        if data != Milter.CONTINUE:  # as libmilter: the message ends here for the milter
            return Outcome(mail, rcpts, None, ctx._reply, [], [], [], data)
        fields = headers if headers is not None else [("Subject", "test"), ("From", sender)]
        for name, value in fields:
            raw = value if isinstance(value, bytes) else value.encode()
            self._at(Milter.M_EOH, self.milter.header_bytes, name, raw)
        ctx._eoh()
        for offset in range(0, len(body), BODY_CHUNK):
            self._at(Milter.M_EOH, self.milter.body, body[offset : offset + BODY_CHUNK])
        ctx._msg = Message()
        eom = ctx._eom()
        return Outcome(
            mail,
            rcpts,
            eom,
            ctx._reply,
            list(ctx._addrcpt),
            list(ctx._delrcpt),
            list(ctx.added_headers),
            data,
        )

    def _at(self, stage: int, callback: Any, *args: Any) -> int:
        """Call a callback as libmilter would: with the macros of its stage available."""
        self.ctx._stage = stage
        try:
            result: int = callback(*args)
        finally:
            self.ctx._stage = None
        return result

    def close(self) -> None:
        self.ctx._close()
