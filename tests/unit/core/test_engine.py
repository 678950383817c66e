"""The RCPT-time precedence table, case by case (label, facts, want rule / reply / action)."""

from __future__ import annotations

import pytest

from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core.attack import AttackTable
from traqmilter.core.engine import (
    ADDRESS_MEMO_SIZE,
    CLIENT_MEMO_SIZE,
    RCPT_RULES,
    DirectoryUnavailable,
    Engine,
    RcptFacts,
    _Rcpt,
)
from traqmilter.core.settings import Action, Config, DictionaryAttackSettings, DomainPolicy
from traqmilter.queue_gauge import FixedQueueGauge

KNOWN = {"alice@example.com", "bob+tag@example.com", "admin@example.org", "carol@example.org"}


def make_engine(
    *, queue: int = 0, threshold: int = 3, broken: bool = False, disconnect: bool = False
) -> tuple[Engine, InMemoryDirectory]:
    cfg = Config(
        domains={
            "example.com": DomainPolicy(),
            "example.org": DomainPolicy(action=Action.FORWARD),
            "example.net": DomainPolicy(action=Action.BOUNCE, bounce_to="any"),
        },
        exceptions={"sales-*@example.com": DomainPolicy(action=Action.FORWARD, forward_to="alice")},
        dictionary_attack=DictionaryAttackSettings(threshold=threshold, disconnect=disconnect),
    )
    directory = InMemoryDirectory(KNOWN, unavailable=broken)
    attacks = AttackTable(threshold=threshold, window_seconds=600, block_seconds=3600)
    return Engine(
        cfg, directory, attacks, FixedQueueGauge(queue), clock=lambda: 1_000_000.0
    ), directory


CLIENT = "203.0.113.5"
CASES = [
    # label, recipient, sender, client, engine kwargs, want rule, want reply prefix, want action
    ("known", "alice@example.com", "s@x.example", CLIENT, {}, "known", None, None),
    ("known case-folded", "ALICE@Example.COM", "s@x.example", CLIENT, {}, "known", None, None),
    (
        "known via extension",
        "alice+news@example.com",
        "s@x.example",
        CLIENT,
        {},
        "known",
        None,
        None,
    ),
    ("known extension key", "bob+tag@example.com", "s@x.example", CLIENT, {}, "known", None, None),
    (
        "unknown reject",
        "zed@example.com",
        "s@x.example",
        CLIENT,
        {},
        "unknown_reject",
        "550 5.1.1 User unknown",
        None,
    ),
    (
        "unknown forward",
        "zed@example.org",
        "s@x.example",
        CLIENT,
        {},
        "unknown_forward",
        None,
        Action.FORWARD,
    ),
    (
        "unknown bounce",
        "zed@example.net",
        "s@x.example",
        CLIENT,
        {},
        "unknown_bounce",
        None,
        Action.BOUNCE,
    ),
    (
        "exception pattern",
        "sales-eu@example.com",
        "s@x.example",
        CLIENT,
        {},
        "unknown_forward",
        None,
        Action.FORWARD,
    ),
    # bounce: a DSN to a sender of a local domain that does not exist would be refused here
    # (unknown_null_sender), so the recipient is refused now, as `reject` would.
    (
        "bounce to an unknown local sender",
        "zed@example.net",
        "ghost@example.com",
        CLIENT,
        {},
        "unknown_bounce_sender_unknown",
        "550 5.1.1 User unknown",
        None,
    ),
    (
        "bounce to an unknown sender of a forward domain",
        "zed@example.net",
        "Ghost+x@EXAMPLE.org",
        CLIENT,
        {},
        "unknown_bounce_sender_unknown",
        "550 5.1.1 User unknown",
        None,
    ),
    (
        "bounce to a known local sender",
        "zed@example.net",
        "alice+x@example.com",
        CLIENT,
        {},
        "unknown_bounce",
        None,
        Action.BOUNCE,
    ),
    (
        "bounce to the local postmaster",
        "zed@example.net",
        "postmaster@example.com",
        CLIENT,
        {},
        "unknown_bounce",
        None,
        Action.BOUNCE,
    ),
    (
        "bounce to an unknown sender of the bounce domain itself",
        "zed@example.net",
        "ghost@example.net",
        CLIENT,
        {},
        "unknown_bounce_sender_unknown",
        "550 5.1.1 User unknown",
        None,
    ),
    (
        "forward does not judge the sender",
        "zed@example.org",
        "ghost@example.com",
        CLIENT,
        {},
        "unknown_forward",
        None,
        Action.FORWARD,
    ),
    ("not local", "zed@elsewhere.example", "s@x.example", CLIENT, {}, "not_local", None, None),
    ("postmaster", "PostMaster@example.com", "s@x.example", CLIENT, {}, "postmaster", None, None),
    ("bare postmaster", "postmaster", "", CLIENT, {}, "postmaster", None, None),
    ("bare other", "root", "", CLIENT, {}, "bare_local_part", None, None),
    ("bad syntax", "a b@example.com", "s@x.example", CLIENT, {}, "bad_address", "501 5.1.3", None),
    (
        "null sender unknown",
        "zed@example.org",
        "",
        CLIENT,
        {},
        "unknown_null_sender",
        "550 5.1.1",
        None,
    ),
    ("null sender known", "alice@example.com", "<>", CLIENT, {}, "known", None, None),
    (
        "queue full defers",
        "alice@example.com",
        "s@x.example",
        CLIENT,
        {"queue": 60001},
        "queue_full",
        "452 4.3.1",
        None,
    ),
    (
        "queue full spares postmaster",
        "postmaster@example.com",
        "s@x.example",
        CLIENT,
        {"queue": 60001},
        "postmaster",
        None,
        None,
    ),
    (
        "high water: accept-time action falls back to reject",
        "zed@example.org",
        "s@x.example",
        CLIENT,
        {"queue": 40001},
        "unknown_high_water",
        "550 5.1.1",
        None,
    ),
    (
        "high water: known still passes",
        "alice@example.com",
        "s@x.example",
        CLIENT,
        {"queue": 40001},
        "known",
        None,
        None,
    ),
    (
        "directory down",
        "alice@example.com",
        "s@x.example",
        CLIENT,
        {"broken": True},
        "lookup_failed",
        "451 4.3.0",
        None,
    ),
    (
        "directory down never checked for postmaster",
        "postmaster@example.com",
        "s@x.example",
        CLIENT,
        {"broken": True},
        "postmaster",
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("label", "recipient", "sender", "client", "kwargs", "rule", "reply", "action"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_rcpt_decision(
    label: str,
    recipient: str,
    sender: str,
    client: str,
    kwargs: dict[str, object],
    rule: str,
    reply: str | None,
    action: Action | None,
) -> None:
    engine, _ = make_engine(**kwargs)  # type: ignore[arg-type]
    decision = engine.rcpt(RcptFacts(recipient, sender, client))
    assert decision.rule == rule
    if reply is None:
        assert decision.reply is None
    else:
        assert decision.reply is not None and decision.reply.format().startswith(reply)
    assert decision.action == action


def test_every_rule_name_is_unique_and_last_rule_always_applies() -> None:
    names = [r.name for r in RCPT_RULES]
    assert len(names) == len(set(names))
    engine, _ = make_engine()
    for recipient in ("alice@example.com", "zed@example.com", "x@elsewhere.example", "<>"):
        facts = _Rcpt(engine, RcptFacts(recipient, "s@x.example", CLIENT), 0.0, False)
        assert RCPT_RULES[-1].applies(facts)


@pytest.mark.parametrize("threshold", [1, 3, 5])
@pytest.mark.parametrize(
    ("clients", "blocked_as"),
    [
        ([CLIENT], CLIENT),
        # IPv6: counted per /64, whichever address of it each guess comes from
        ([f"2001:db8:1:2::{i:x}" for i in range(1, 9)], "2001:db8:1:2::/64"),
    ],
    ids=["ipv4", "ipv6 /64"],
)
def test_threshold_unknown_recipients_get_their_answer_and_the_next_is_blocked(
    threshold: int, clients: list[str], blocked_as: str
) -> None:
    """SPEC 5, "past the threshold": threshold: N gives N unknown recipients their honest
    550; the N+1-th starts the block, and everything after it is blocked too."""
    engine, _ = make_engine(threshold=threshold)
    for i in range(threshold):
        client = clients[i % len(clients)]
        decision = engine.rcpt(RcptFacts(f"guess{i}@example.com", "s@x.example", client))
        assert decision.rule == "unknown_reject", i + 1
        assert decision.reply is not None and decision.reply.format().startswith("550 5.1.1")
    past = engine.rcpt(RcptFacts("guess-past@example.com", "s@x.example", clients[-1]))
    assert past.rule == "client_blocked" and past.new_block is not None
    assert (past.new_block.client, past.new_block.attempts) == (blocked_as, threshold + 1)
    assert past.reply is not None and past.reply.format().startswith("450 4.7.1")
    after = engine.rcpt(RcptFacts("alice@example.com", "s@x.example", clients[0]))
    assert after.rule == "client_blocked" and after.new_block is None


def test_a_request_without_recipient_has_no_opinion_and_counts_nothing() -> None:
    engine, directory = make_engine(threshold=1)
    for _ in range(3):
        decision = engine.rcpt(RcptFacts("", "s@x.example", CLIENT))
        assert (decision.rule, decision.reply, decision.new_block) == ("no_recipient", None, None)
    assert not directory.lookups and engine.attacks.blocks(0) == []
    # Not even a blocked client's: no recipient, nothing to refuse.
    engine.rcpt(RcptFacts("z1@example.com", "s@x.example", CLIENT))
    assert engine.rcpt(RcptFacts("z2@example.com", "s@x.example", CLIENT)).rule == "client_blocked"
    assert engine.rcpt(RcptFacts("", "s@x.example", CLIENT)).rule == "no_recipient"


def test_harvester_is_blocked_for_known_and_unknown_alike() -> None:
    engine, directory = make_engine(threshold=3)
    facts = [RcptFacts(f"guess{i}@example.com", "s@x.example", CLIENT) for i in range(4)]
    first, second, third, fourth = (engine.rcpt(f) for f in facts)
    assert first.rule == second.rule == third.rule == "unknown_reject"
    assert fourth.rule == "client_blocked" and fourth.new_block is not None
    assert fourth.new_block.client == CLIENT and fourth.new_block.attempts == 4
    lookups = len(directory.lookups)
    known = engine.rcpt(RcptFacts("alice@example.com", "s@x.example", CLIENT))
    unknown = engine.rcpt(RcptFacts("zed@example.com", "s@x.example", CLIENT))
    assert known.reply == unknown.reply and known.reply is not None
    assert known.reply.format().startswith("450 4.7.1")
    assert known.new_block is None and unknown.new_block is None
    assert len(directory.lookups) == lookups  # a blocked client costs no lookup and learns nothing
    assert engine.rcpt(RcptFacts("postmaster@example.com", "s@x.example", CLIENT)).reply is None
    assert engine.rcpt(RcptFacts("alice@example.com", "s@x.example", "198.51.100.1")).reply is None


def test_counting_applies_whatever_the_action() -> None:
    engine, _ = make_engine(threshold=2)
    for i in range(2):
        decision = engine.rcpt(RcptFacts(f"x{i}@example.org", "s@x.example", CLIENT))
        assert decision.rule == "unknown_forward"
    assert engine.rcpt(RcptFacts("x2@example.org", "s@x.example", CLIENT)).rule == "client_blocked"


@pytest.mark.parametrize(
    ("label", "sender", "client", "sasl"),
    [
        ("null sender is not counted", "", CLIENT, ""),
        ("exempt network", "s@x.example", "127.0.0.1", ""),
        ("exempt ipv6 loopback", "s@x.example", "::1", ""),
        ("authenticated", "s@x.example", CLIENT, "alice"),
        ("no ip address", "s@x.example", "unknown", ""),
    ],
)
def test_not_counted(label: str, sender: str, client: str, sasl: str) -> None:
    engine, _ = make_engine(threshold=2)
    for i in range(5):
        decision = engine.rcpt(RcptFacts(f"z{i}@example.com", sender, client, sasl))
        assert decision.rule in ("unknown_reject", "unknown_null_sender")
        assert decision.new_block is None


def test_disconnect_answers_421() -> None:
    engine, _ = make_engine(threshold=1, disconnect=True)
    assert engine.rcpt(RcptFacts("y@example.com", "s@x.example", CLIENT)).rule == "unknown_reject"
    decision = engine.rcpt(RcptFacts("z@example.com", "s@x.example", CLIENT))
    assert decision.reply is not None and decision.reply.code == 421 and decision.reply.ends_session


def test_explain_does_not_count() -> None:
    engine, _ = make_engine(threshold=1)
    for _ in range(3):
        assert (
            engine.rcpt(RcptFacts("z@example.com", "s@x", CLIENT), record=False).rule
            == "unknown_reject"
        )
    assert engine.attacks.blocks(0) == []


def test_custom_reject_text() -> None:
    engine, _ = make_engine()
    engine.config.domains["example.com"] = DomainPolicy(
        reject_text="No such user here: {recipient}"
    )
    decision = engine.rcpt(RcptFacts("zed@example.com", "s@x", CLIENT))
    assert decision.reply is not None
    assert decision.reply.format() == "550 5.1.1 No such user here: zed@example.com"


def test_remembered_addresses_and_client_keys_stay_bounded_and_decide_alike() -> None:
    """The engine's memos (recipient -> Address, client -> key) are bounded and never
    change a decision: the same facts decide the same before and after they are cached."""
    engine, _ = make_engine(threshold=1000)
    first = engine.rcpt(RcptFacts("ALICE@example.com", "s@x.example", CLIENT), record=False)
    again = engine.rcpt(RcptFacts("ALICE@example.com", "s@x.example", CLIENT), record=False)
    assert first == again and first.rule == "known"
    bad = RcptFacts("not an address@", "s@x.example", CLIENT)
    assert engine.rcpt(bad).rule == engine.rcpt(bad).rule == "bad_address"
    exempt = RcptFacts("nobody@example.com", "s@x.example", "127.0.0.1")
    for _ in range(2):
        assert engine.rcpt(exempt).new_block is None
    assert engine.client_keys["127.0.0.1"] is None  # exempt: remembered as "not counted"
    for i in range(ADDRESS_MEMO_SIZE + CLIENT_MEMO_SIZE):
        engine.rcpt(
            RcptFacts(f"u{i}@example.com", "s@x.example", f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}")
        )
    assert 0 < len(engine.recipients) <= ADDRESS_MEMO_SIZE
    assert 0 < len(engine.client_keys) <= CLIENT_MEMO_SIZE


def test_outbox_domain_relays_bounces_for_unknown_recipients_without_counting() -> None:
    engine, _ = make_engine(threshold=1)
    engine.config.domains["split.example"] = DomainPolicy(
        action=Action.OUTBOX, outbox_relay="[mx2.split.example]:25"
    )
    for i in range(3):
        decision = engine.rcpt(RcptFacts(f"user{i}@split.example", "", CLIENT))
        assert decision.rule == "unknown_outbox" and decision.reply is None
        assert decision.action is Action.OUTBOX and decision.new_block is None
    assert engine.attacks.blocks(0) == []


def test_bounce_to_an_unknown_sender_of_an_outbox_domain_is_accepted() -> None:
    # An address unknown here may live on the other server of a split domain, and a DSN
    # to it is relayed there (unknown_null_sender spares outbox domains).
    engine, _ = make_engine()
    engine.config.domains["split.example"] = DomainPolicy(
        action=Action.OUTBOX, outbox_relay="[mx2.split.example]:25"
    )
    decision = engine.rcpt(RcptFacts("zed@example.net", "far@split.example", CLIENT))
    assert decision.rule == "unknown_bounce" and decision.action is Action.BOUNCE


def test_bounce_sender_check_counts_the_recipient_not_the_sender() -> None:
    engine, _ = make_engine(threshold=1)
    first = engine.rcpt(RcptFacts("zed@example.net", "ghost@example.com", CLIENT))
    # The recipient was counted (threshold 1: the next unknown blocks); the sender was not.
    assert first.rule == "unknown_bounce_sender_unknown" and first.new_block is None
    assert engine.rcpt(RcptFacts("zoe@example.net", "s@x.example", CLIENT)).rule == (
        "client_blocked"
    )


class SenderUnreadable(InMemoryDirectory):
    """Answers for recipients, cannot answer for the sender ghost@example.com."""

    def contains(self, key: str) -> bool:
        if key == "ghost@example.com":
            raise DirectoryUnavailable("database is locked")
        return super().contains(key)


def test_bounce_sender_that_cannot_be_looked_up_tempfails() -> None:
    engine, _ = make_engine()
    engine.directory = SenderUnreadable(KNOWN)
    decision = engine.rcpt(RcptFacts("zed@example.net", "ghost@example.com", CLIENT))
    assert decision.rule == "lookup_failed" and str(decision.reply).startswith("451 4.3.0")
