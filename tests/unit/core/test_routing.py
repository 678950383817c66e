"""Outbox routing: Postfix transport lookups answered by the engine's ROUTING_RULES."""

from __future__ import annotations

import pytest

from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core.attack import AttackTable
from traqmilter.core.engine import (
    ROUTING_RULE_NAMES,
    Engine,
    RcptFacts,
    routing_engine,
    transport_for,
)
from traqmilter.core.settings import Action, Config, DomainPolicy
from traqmilter.queue_gauge import FixedQueueGauge

NOW = 1_750_000_000.0


def make_engine(directory: InMemoryDirectory | None = None) -> Engine:
    config = Config(
        domains={
            "example.com": DomainPolicy(),
            "fwd.example": DomainPolicy(action=Action.FORWARD, forward_to="admin"),
            "split.example": DomainPolicy(
                action=Action.OUTBOX, outbox_relay="[mx2.example.net]:25"
            ),
        }
    )
    attacks = AttackTable(threshold=100, window_seconds=600, block_seconds=3600)
    directory = directory or InMemoryDirectory({"alice@example.com"})
    return Engine(config, directory, attacks, FixedQueueGauge(), clock=lambda: NOW)


@pytest.mark.parametrize(
    ("address", "want"),
    [
        ("far@split.example", "smtp:[mx2.example.net]:25"),
        ("Far+ext@SPLIT.example", "smtp:[mx2.example.net]:25"),
        ("alice@example.com", None),
        ("x@fwd.example", None),
        ("postmaster@split.example", None),
        ("split.example", None),
        ("far@elsewhere.example", None),
        ("bad address@split.example", None),
    ],
)
def test_transport_for(address: str, want: str | None) -> None:
    engine = routing_engine(make_engine())
    assert transport_for(engine.rcpt(RcptFacts(address), record=False)) == want


def test_routing_ignores_queue_pressure_sender_and_blocks() -> None:
    base = make_engine()
    base.queue.size = 10**9  # type: ignore[misc]
    engine = routing_engine(base)
    assert transport_for(engine.rcpt(RcptFacts("far@split.example"), record=False)) == (
        "smtp:[mx2.example.net]:25"
    )
    assert [r.name for r in engine.rules[:-1]] == list(ROUTING_RULE_NAMES)


def test_routing_lookup_failure_is_not_a_route() -> None:
    engine = routing_engine(make_engine(directory=InMemoryDirectory(unavailable=True)))
    decision = engine.rcpt(RcptFacts("far@split.example"), record=False)
    assert decision.rule == "lookup_failed" and transport_for(decision) is None
