"""bounce_to: verified -- the Authentication-Results verdict (core.verify), the RCPT-time
rules (engine) and the end-of-message rule (core.plan), case by case."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.config import ConfigError, parse_config, settings_problems
from traqmilter.core.attack import AttackTable
from traqmilter.core.engine import Engine, RcptDecision, RcptFacts
from traqmilter.core.limits import ActionLimits
from traqmilter.core.plan import (
    AcceptedRecipient,
    Fate,
    MessageFacts,
    plan_message,
    transaction_split,
)
from traqmilter.core.replies import S451_UNVERIFIED, S452_SEPARATE_TRANSACTION
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import (
    Action,
    BounceSettings,
    Config,
    DictionaryAttackSettings,
    DomainPolicy,
)
from traqmilter.core.verify import (
    MAX_AUTH_RESULTS,
    aligned,
    header_verdict,
    resolver_address,
    sender_domain,
)
from traqmilter.milter.collect import HeaderCollector
from traqmilter.queue_gauge import FixedQueueGauge

OURS = "mx.example.com"
SENDER = "<alice@sender.example>"
CLIENT = "203.0.113.9"
NOW = 1_750_000_000.0

# --------------------------------------------------------------------------- A-R verdict

VERDICTS = [
    # label, header values, want verified, want `how` (substring)
    ("spf pass", [f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example"], True, "spf=pass"),
    ("spf pass, bare domain", [f"{OURS}; spf=pass smtp.mailfrom=sender.example"], True, "spf"),
    ("authserv-id case", ["MX.Example.COM; spf=pass smtp.mailfrom=a@Sender.Example"], True, ""),
    (
        "folded header",
        [f"{OURS};\r\n\tspf=pass (sender SPF authorized)\r\n\tsmtp.mailfrom=alice@sender.example"],
        True,
        "spf=pass",
    ),
    ("spf pass, other domain", [f"{OURS}; spf=pass smtp.mailfrom=x@other.example"], False, "no"),
    ("spf softfail", [f"{OURS}; spf=softfail smtp.mailfrom=alice@sender.example"], False, "no"),
    ("dkim aligned", [f"{OURS}; dkim=pass header.d=sender.example"], True, "dkim=pass"),
    ("dkim parent domain", [f"{OURS}; dkim=pass header.d=example"], False, ""),
    ("dkim fail", [f"{OURS}; dkim=fail header.d=sender.example"], False, ""),
    ("dkim other domain", [f"{OURS}; dkim=pass header.d=bulk.example"], False, ""),
    (
        "spf fail, dkim aligned",
        [f"{OURS}; spf=fail smtp.mailfrom=a@sender.example; dkim=pass header.d=sender.example"],
        True,
        "dkim=pass",
    ),
    (
        "other authserv-id ignored",
        ["evil.example; spf=pass smtp.mailfrom=alice@sender.example"],
        False,
        f"no Authentication-Results of {OURS}",
    ),
    (
        "ours among others",
        [
            "evil.example; spf=fail smtp.mailfrom=alice@sender.example",
            f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example",
        ],
        True,
        "spf=pass",
    ),
    (
        "two of ours: one is forged",
        [
            f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example",
            f"{OURS}; spf=fail smtp.mailfrom=alice@sender.example",
        ],
        False,
        "forged",
    ),
    ("unparsable", [f"{OURS}; ;;;spf=="], False, ""),
    ("empty", [""], False, ""),
    ("none at all", [], False, ""),
    ("too long", [f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example" + " " * 5000], False, ""),
]


@pytest.mark.parametrize(
    ("label", "values", "verified", "how"), VERDICTS, ids=[c[0] for c in VERDICTS]
)
def test_header_verdict(label: str, values: list[str], verified: bool, how: str) -> None:
    verdict = header_verdict(values, OURS, SENDER)
    assert verdict.verified is verified, verdict
    assert how in verdict.how


def test_no_authserv_id_trusts_no_header() -> None:
    values = [f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example"]
    assert header_verdict(values, "", SENDER).verified is False


def test_helpers() -> None:
    assert sender_domain("<Alice@Sender.Example.>") == "sender.example"
    assert sender_domain("<>") == "" and sender_domain("postmaster") == ""
    assert aligned("sender.example", "sender.example")
    assert aligned("sender.example", "mail.sender.example")
    assert not aligned("example", "sender.example")  # never a bare top-level domain
    assert not aligned("ender.example", "sender.example")
    assert resolver_address("127.0.0.1") == ("127.0.0.1", 53)
    assert resolver_address("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert resolver_address("[::1]:5353") == ("::1", 5353)
    assert resolver_address("::1") == ("::1", 53)
    for bad in ("dns.example", "127.0.0.1:x", "127.0.0.1:0", "[::1]x", "1.2.3.4:70000"):
        assert resolver_address(bad) is None, bad


def test_collector_keeps_auth_results_in_order_and_bounded() -> None:
    collector = HeaderCollector()
    collector.add("Authentication-Results", f"{OURS}; spf=pass".encode())
    collector.add("Subject", b"hi")
    for i in range(MAX_AUTH_RESULTS + 5):
        collector.add("authentication-results", f"x{i}.example; none".encode())
    kept = collector.summary().auth_results
    assert len(kept) == MAX_AUTH_RESULTS
    assert kept[0] == f"{OURS}; spf=pass" and kept[1] == "x0.example; none"


# --------------------------------------------------------------------------- RCPT time


KNOWN = ("bob@example.com", "postmaster@example.com")


@dataclass
class FakeSpf:
    result: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def check(self, client_address: str, sender: str, helo: str) -> str:
        self.calls.append((client_address, sender, helo))
        return self.result


def make_config(unverified: str = "reject", **bounce: object) -> Config:
    return Config(
        domains={
            "example.com": DomainPolicy(),
            "v.example": DomainPolicy(action=Action.BOUNCE, unverified=unverified),
            "any.example": DomainPolicy(action=Action.BOUNCE, bounce_to="any"),
        },
        dictionary_attack=DictionaryAttackSettings(exempt=("192.0.2.0/24",)),
        bounce=BounceSettings(reporting_mta=OURS, authserv_id=OURS, **bounce),  # type: ignore[arg-type]
    )


def make_engine(config: Config | None = None) -> Engine:
    attacks = AttackTable(threshold=100, window_seconds=600, block_seconds=3600)
    return Engine(
        config or make_config(),
        InMemoryDirectory(KNOWN),
        attacks,
        FixedQueueGauge(),
        clock=lambda: NOW,
    )


RCPT_CASES = [
    # label, client, sasl, spf result (None: no checker), want rule, want reply prefix
    ("untrusted, no SPF check", CLIENT, "", None, RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM, None),
    ("SASL-authenticated", CLIENT, "alice", "fail", "unknown_bounce_trusted_client", None),
    ("exempt network", "192.0.2.7", "", "fail", "unknown_bounce_trusted_client", None),
    ("no client address (local)", "", "", "fail", "unknown_bounce_trusted_client", None),
    ("SPF pass", CLIENT, "", "pass", "unknown_bounce_spf_pass", None),
    ("SPF fail", CLIENT, "", "fail", "unknown_bounce_unverified", "550 5.1.1"),
    ("SPF softfail", CLIENT, "", "softfail", "unknown_bounce_unverified", "550 5.1.1"),
    ("SPF none", CLIENT, "", "none", "unknown_bounce_unverified", "550 5.1.1"),
    ("SPF temperror", CLIENT, "", "temperror", "unknown_bounce_unverified", "550 5.1.1"),
]


@pytest.mark.parametrize(
    ("label", "client", "sasl", "spf", "rule", "reply"),
    RCPT_CASES,
    ids=[c[0] for c in RCPT_CASES],
)
def test_rcpt_rule(
    label: str, client: str, sasl: str, spf: str | None, rule: str, reply: str | None
) -> None:
    checker = FakeSpf(spf) if spf is not None else None
    facts = RcptFacts("zed@v.example", SENDER, client, sasl, "helo.sender.example")
    decision = make_engine().rcpt(facts, spf=checker)
    assert decision.rule == rule
    if reply is None:
        assert decision.reply is None and decision.action is Action.BOUNCE
    else:
        assert decision.reply is not None and decision.reply.format().startswith(reply)
        assert decision.action is None
    if checker is not None and rule.endswith(("spf_pass", "unverified")):
        assert checker.calls == [(client, SENDER, "helo.sender.example")]
    elif checker is not None:
        assert checker.calls == []  # a trusted client needs no DNS


def test_bounce_to_any_and_known_recipients_never_ask_spf() -> None:
    checker = FakeSpf("fail")
    engine = make_engine()
    any_ = engine.rcpt(RcptFacts("zed@any.example", SENDER, CLIENT), spf=checker)
    known = engine.rcpt(RcptFacts("bob@example.com", SENDER, CLIENT), spf=checker)
    assert (any_.rule, any_.action) == ("unknown_bounce", Action.BOUNCE)
    assert known.rule == "known" and checker.calls == []


# --------------------------------------------------------------------------- end of message


def message(
    engine: Engine, recipients: list[str], auth_results: list[str], client: str = CLIENT
) -> MessageFacts:
    collector = HeaderCollector()
    collector.add("Subject", b"hello")
    for value in auth_results:
        collector.add("Authentication-Results", value.encode())
    rcpts = []
    for address in recipients:
        decision = engine.rcpt(RcptFacts(address, SENDER, client), record=False)
        assert decision.reply is None
        rcpts.append(AcceptedRecipient(address, (), decision))
    return MessageFacts(
        sender=SENDER,
        recipients=tuple(rcpts),
        headers=collector.summary(),
        client_address=client,
        mta_hostname=OURS,
        arrival=NOW,
    )


def plan(facts: MessageFacts, config: Config):  # type: ignore[no-untyped-def]
    return plan_message(facts, config, ActionLimits(config), NOW)


PASS = f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example"
FORGED = "relay.other.example; spf=pass smtp.mailfrom=alice@sender.example"


def test_header_verifies_the_sender_at_eom() -> None:
    config = make_config()
    result = plan(message(make_engine(config), ["<zed@v.example>"], [PASS]), config)
    assert result.reply is None and result.dsn is not None and result.discard
    assert [(f.fate, f.rule) for f in result.fates] == [(Fate.BOUNCED, "authres_spf_pass")]


def test_unverified_alone_is_rejected_like_reject() -> None:
    config = make_config()
    result = plan(message(make_engine(config), ["<zed@v.example>"], [FORGED]), config)
    assert result.rule == "unverified" and result.dsn is None
    assert result.reply is not None
    assert result.reply.format().startswith("550 5.1.1 <zed@v.example>: Recipient address")


def test_unverified_transaction_of_its_own_kind_is_rejected_whole() -> None:
    config = make_config()
    facts = message(make_engine(config), ["<zed@v.example>", "<amy@v.example>"], [FORGED])
    result = plan(facts, config)
    assert result.rule == "unverified" and result.dsn is None and result.delete == ()
    assert result.reply is not None and result.reply.format().startswith("550 5.1.1")


def test_a_mix_the_milter_did_not_split_is_deferred_never_dropped() -> None:
    # transaction_split keeps this mix out of one transaction; a mix that reaches end of
    # message anyway (another front end) is deferred whole, never accepted half-refused.
    config = make_config()
    facts = message(make_engine(config), ["<bob@example.com>", "<zed@v.example>"], [])
    result = plan(facts, config)
    assert (result.rule, result.reply) == ("unverified", S451_UNVERIFIED)
    assert result.delete == () and result.dsn is None


# --------------------------------------------------------------------------- one kind per
# transaction (core.plan.transaction_split): whose fate end of message decides, and whose not

LATER = "zed@v.example"  # verified only at end of message, unverified: reject
SPLIT_CASES = [
    # label, recipients accepted so far (address, client), new recipient, want 452
    ("first recipient", [], (LATER, CLIENT), False),
    ("first recipient, known", [], ("bob@example.com", CLIENT), False),
    ("known after known", [("bob@example.com", CLIENT)], ("postmaster@example.com", CLIENT), False),
    ("later after later", [(LATER, CLIENT)], ("amy@v.example", CLIENT), False),
    ("later after known", [("bob@example.com", CLIENT)], (LATER, CLIENT), True),
    ("known after later", [(LATER, CLIENT)], ("bob@example.com", CLIENT), True),
    ("bounce_to any after later", [(LATER, CLIENT)], ("zed@any.example", CLIENT), True),
    ("discard after later", [(LATER, CLIENT)], ("zed@d.example", CLIENT), True),
    ("discard after known", [("bob@example.com", CLIENT)], ("zed@d.example", CLIENT), False),
    ("later after two known", [("bob@example.com", CLIENT)] * 2, (LATER, CLIENT), True),
    # a trusted client verifies the sender at RCPT time: nothing waits for end of message
    ("trusted bounce after known", [("bob@example.com", "192.0.2.7")], (LATER, "192.0.2.7"), False),
    ("refused anyway", [("bob@example.com", CLIENT)], ("nobody@example.com", CLIENT), False),
]


@pytest.mark.parametrize(
    ("label", "accepted", "new", "split"), SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES]
)
def test_transaction_split(
    label: str, accepted: list[tuple[str, str]], new: tuple[str, str], split: bool
) -> None:
    config = make_config()
    config.domains["d.example"] = DomainPolicy(action=Action.BOUNCE, unverified="discard")
    engine = make_engine(config)

    def decide(address: str, client: str) -> RcptDecision:
        return engine.rcpt(RcptFacts(address, SENDER, client), record=False)

    decision = decide(*new)
    so_far = [AcceptedRecipient(f"<{a[0]}>", (), decide(*a)) for a in accepted]
    result = transaction_split(so_far, decision)
    if not split:
        assert result is None
        return
    assert result is not None
    assert (result.rule, result.reply) == ("separate_transaction", S452_SEPARATE_TRANSACTION)
    assert (result.recipient, result.policy, result.action) == (
        decision.recipient,
        decision.policy,
        None,
    )
    assert result.reply.format().startswith("452 4.5.3 Too many recipients")


def test_unverified_discard_drops_without_dsn() -> None:
    config = make_config(unverified="discard")
    facts = message(make_engine(config), ["<bob@example.com>", "<zed@v.example>"], [FORGED])
    result = plan(facts, config)
    assert result.reply is None and result.dsn is None and not result.discard
    assert result.delete == ("<zed@v.example>",)
    fates = {f.recipient: (f.fate, f.rule) for f in result.fates}
    assert fates["<zed@v.example>"] == (Fate.DROPPED_UNVERIFIED, "unverified_discard")
    assert fates["<bob@example.com>"][0] is Fate.KEPT


def test_trusted_client_needs_no_header() -> None:
    config = make_config()
    facts = message(make_engine(config), ["<zed@v.example>"], [], client="192.0.2.7")
    result = plan(facts, config)
    assert result.reply is None and result.dsn is not None
    assert [f.rule for f in result.fates] == ["unknown_bounce_trusted_client"]


def test_config_refuses_bad_values() -> None:
    text = b"domains:\n  v.example: {action: bounce, bounce_to: some, unverified: drop}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    message = str(info.value)
    assert "domains.v.example.bounce_to" in message and "domains.v.example.unverified" in message
    config = Config(bounce=BounceSettings(spf_resolver="dns.example"))
    assert [key for key, _problem in settings_problems(config)] == ["bounce.spf_resolver"]
    assert not settings_problems(make_config())
