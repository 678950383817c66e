"""A catch-all target removed at run time: the engine defers the domain's unknown recipients
(451 4.3.0, rule forward_target_missing) instead of letting the milter rewrite them to an
address the MTA would bounce; the target's lookup is an ordinary directory lookup."""

from __future__ import annotations

import pytest

from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core.attack import AttackTable
from traqmilter.core.engine import Engine, RcptFacts
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import Action, Config, DomainPolicy, forward_targets
from traqmilter.queue_gauge import FixedQueueGauge

KNOWN = {"admin@fwd.example", "boss@example.com", "alice@example.com"}


CONFIG = Config(
    domains={
        "example.com": DomainPolicy(),
        "fwd.example": DomainPolicy(action=Action.FORWARD, forward_to="admin"),
        "full.example": DomainPolicy(action=Action.FORWARD, forward_to="boss@example.com"),
        "away.example": DomainPolicy(action=Action.FORWARD, forward_to="ops@remote.example"),
    },
    exceptions={
        "sales-*@example.com": DomainPolicy(action=Action.FORWARD, forward_to="alice"),
    },
)


def make_engine(directory: InMemoryDirectory) -> Engine:
    attacks = AttackTable(threshold=100, window_seconds=600, block_seconds=3600)
    return Engine(CONFIG, directory, attacks, FixedQueueGauge(), clock=lambda: 1_000_000.0)


@pytest.mark.parametrize(
    ("recipient", "target"),
    [
        ("x@fwd.example", "admin@fwd.example"),  # a local part of the same domain
        ("x@full.example", "boss@example.com"),  # a full local address
        ("sales-1@example.com", "alice@example.com"),  # an exception's target
    ],
)
def test_a_missing_local_target_defers_instead_of_forwarding(recipient: str, target: str) -> None:
    directory = InMemoryDirectory(KNOWN)
    engine = make_engine(directory)
    assert engine.rcpt(RcptFacts(recipient, "s@remote.example", "192.0.2.1")).action is (
        Action.FORWARD
    )
    directory.keys.discard(target)
    decision = engine.rcpt(RcptFacts(recipient, "s@remote.example", "192.0.2.1"))
    assert decision.rule is RuleName.FORWARD_TARGET_MISSING
    assert decision.action is None  # nothing for the milter to rewrite
    assert decision.reply is not None
    assert (decision.reply.code, decision.reply.enhanced_code) == (451, "4.3.0")
    assert target in directory.lookups  # asked through the directory (its cache applies)
    # The target comes back: forwarding resumes without a reload.
    directory.keys.add(target)
    assert engine.rcpt(RcptFacts(recipient, "s@remote.example", "")).action is Action.FORWARD


def test_a_remote_target_is_the_mtas_to_route() -> None:
    directory = InMemoryDirectory(KNOWN)
    decision = make_engine(directory).rcpt(RcptFacts("x@away.example", "s@remote.example", ""))
    assert decision.action is Action.FORWARD
    assert "ops@remote.example" not in directory.lookups


def test_a_target_lookup_that_fails_tempfails_as_any_lookup() -> None:
    directory = InMemoryDirectory(KNOWN)
    engine = make_engine(directory)
    directory.keys.discard("x@fwd.example")
    directory.unavailable = True
    decision = engine.rcpt(RcptFacts("x@fwd.example", "s@remote.example", ""))
    assert decision.rule == "lookup_failed"


def test_known_recipients_and_other_domains_never_ask_for_the_target() -> None:
    directory = InMemoryDirectory(KNOWN)
    engine = make_engine(directory)
    directory.keys.discard("admin@fwd.example")
    assert engine.rcpt(RcptFacts("alice@example.com", "s@remote.example", "")).rule == "known"
    assert engine.rcpt(RcptFacts("x@example.com", "s@remote.example", "")).rule == (
        "unknown_reject"
    )
    assert "admin@fwd.example" not in directory.lookups


def test_forward_targets_names_every_target_with_its_keys() -> None:
    assert forward_targets(CONFIG) == {
        "admin@fwd.example": ["domains.fwd.example.forward_to"],
        "boss@example.com": ["domains.full.example.forward_to"],
        "ops@remote.example": ["domains.away.example.forward_to"],
        "alice@example.com": ["exceptions.sales-*@example.com.forward_to"],
    }
