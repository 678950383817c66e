"""End-of-message planning, case by case: label, message, want rule / reply / effects."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core import replies
from traqmilter.core.address import parse_address
from traqmilter.core.attack import AttackTable
from traqmilter.core.dsn import NoDsnReason, build_dsn
from traqmilter.core.engine import Engine, RcptFacts
from traqmilter.core.limits import ActionLimits
from traqmilter.core.plan import (
    ACTION_STEPS,
    HOP_HEADER,
    MESSAGE_RULES,
    ORIGINAL_TO_HEADER,
    AcceptedRecipient,
    Fate,
    HeaderSummary,
    MessageFacts,
    commit_plan,
    create_refusal_reason,
    esmtp_param,
    plan_message,
    rcpt_refusal,
    refresh_decision,
    wants_body,
    xtext,
)
from traqmilter.core.settings import (
    Action,
    BounceSettings,
    Config,
    CreateSettings,
    DomainPolicy,
    LoopSettings,
    QueueSettings,
)
from traqmilter.milter.collect import HeaderCollector  # builds the facts as the milter does
from traqmilter.queue_gauge import FixedQueueGauge

NOW = 1_750_000_000.0
SENDER = "<sender@remote.example>"
CLIENT = "203.0.113.9"
KNOWN = {"alice@example.com", "admin@fwd.example", "bob@shop.example", "admin@fwd2.example"}


def make_config(**overrides: object) -> Config:
    base = Config(
        domains={
            "example.com": DomainPolicy(),
            "fwd.example": DomainPolicy(action=Action.FORWARD, forward_to="admin"),
            "fwd2.example": DomainPolicy(action=Action.FORWARD, forward_to="admin@fwd2.example"),
            "bounce.example": DomainPolicy(action=Action.BOUNCE, bounce_to="any"),
            "old.example": DomainPolicy(action=Action.READDRESS, readdress_to="example.com"),
            "shop.example": DomainPolicy(action=Action.CREATE),
            "split.example": DomainPolicy(
                action=Action.OUTBOX, outbox_relay="[mx2.example.net]:25"
            ),
        },
        bounce=BounceSettings(reporting_mta="mx.example.com"),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def make_engine(config: Config | None = None, directory: InMemoryDirectory | None = None) -> Engine:
    cfg = config or make_config()
    attacks = AttackTable(threshold=100, window_seconds=600, block_seconds=3600)
    return Engine(
        cfg, directory or InMemoryDirectory(KNOWN), attacks, FixedQueueGauge(), clock=lambda: NOW
    )


def accepted(engine: Engine, address: str, *params: str, sender: str = SENDER) -> AcceptedRecipient:
    decision = engine.rcpt(RcptFacts(address, sender, CLIENT), record=False)
    assert decision.reply is None, decision
    return AcceptedRecipient(address, params, decision)


def message(
    engine: Engine,
    recipients: list[str | tuple[str, ...]],
    *,
    sender: str = SENDER,
    headers: HeaderSummary | None = None,
    mail_params: tuple[str, ...] = (),
    queue_size: int = 0,
    body: bytes | None = None,
) -> MessageFacts:
    rcpts = []
    for item in recipients:
        address, *params = (item,) if isinstance(item, str) else item
        rcpts.append(accepted(engine, address, *params, sender=sender))
    return MessageFacts(
        sender=sender,
        recipients=tuple(rcpts),
        mail_params=mail_params,
        headers=headers or collect([("Subject", "hello"), ("Message-ID", "<m1@remote.example>")]),
        body=body,
        client_address=CLIENT,
        client_name="mail.remote.example",
        queue_id="4ABCDEF",
        mta_hostname="mx.example.com",
        arrival=NOW - 2,
        queue_size=queue_size,
    )


def collect(fields: list[tuple[str, str]]) -> HeaderSummary:
    collector = HeaderCollector()
    for name, value in fields:
        collector.add(name, value.encode())
    return collector.summary()


def plan(facts: MessageFacts, config: Config | None = None, limits: ActionLimits | None = None):  # type: ignore[no-untyped-def]
    cfg = config or make_config()
    return plan_message(facts, cfg, limits or ActionLimits(cfg), NOW)


# --------------------------------------------------------------------------- the table

HOPS_5 = tuple((HOP_HEADER, f"mx{i}.example (forward)") for i in range(5))
RECEIVED_31 = tuple(("Received", f"from h{i} by h{i + 1}") for i in range(31))


@dataclass(frozen=True)
class Case:
    label: str
    recipients: tuple[str, ...]
    rule: str
    reply: str | None = None  # prefix of the reply's text
    delete: tuple[str, ...] = ()
    add: tuple[str, ...] = ()
    discard: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    queue: int = 0


X, Y = "<x@fwd.example>", "<y@fwd.example>"
ADMIN = "<admin@fwd.example>"
ALICE, ZED, FAR = "<alice@example.com>", "<zed@bounce.example>", "<far@split.example>"
CASES = [
    Case("known only: untouched", (ALICE,), "no_action"),
    Case("forward two unknowns: one copy", (X, Y), "actions", delete=(X, Y), add=(ADMIN,)),
    Case(
        "forward to a full address",
        ("<x@fwd2.example>",),
        "actions",
        delete=("<x@fwd2.example>",),
        add=("<admin@fwd2.example>",),
    ),
    Case("forward while the target is a recipient too", (ADMIN, X), "actions", delete=(X,)),
    Case(
        "readdress keeps case and extension",
        ("<Zed+News@Old.Example>",),
        "actions",
        delete=("<Zed+News@Old.Example>",),
        add=("<Zed+News@example.com>",),
    ),
    Case("bounce only: discarded after the DSN", (ZED,), "actions", delete=(ZED,), discard=True),
    Case("create keeps the recipient", ("<new@shop.example>",), "actions"),
    Case("outbox keeps the recipient", (FAR,), "actions"),
    Case(
        "mixed: each its own fate",
        (ALICE, ZED, X, "<y@old.example>", FAR),
        "actions",
        delete=(ZED, X, "<y@old.example>"),
        add=("<y@example.com>", ADMIN),
    ),
    Case("hop limit reached: loop", (X,), "loop", "554 5.4.6", headers=HOPS_5),
    Case("too many Received: loop", (FAR,), "loop", "554 5.4.6", headers=RECEIVED_31),
    Case(
        "many Received but nothing re-routed",
        (ZED,),
        "actions",
        delete=(ZED,),
        discard=True,
        headers=RECEIVED_31,
    ),
    Case("many hops, known recipient: not ours", (ALICE,), "no_action", headers=HOPS_5),
    Case(
        "high water, every recipient affected: reject",
        (X,),
        "high_water",
        "550 5.1.1 <x@fwd.example>",
        queue=40_001,
    ),
    Case("high water, mixed message: defer", (ALICE, X), "high_water", "452 4.3.1", queue=40_001),
    Case("loop before queue pressure", (X,), "loop", "554 5.4.6", headers=HOPS_5, queue=40_001),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_plan(case: Case) -> None:
    engine = make_engine()
    headers = collect(list(case.headers)) if case.headers else None
    facts = message(engine, list(case.recipients), headers=headers, queue_size=case.queue)
    result = plan(facts)
    assert result.rule == case.rule
    if case.reply is None:
        assert result.reply is None
    else:
        assert result.reply is not None and result.reply.format().startswith(case.reply)
    assert result.delete == case.delete
    assert tuple(n.address for n in result.add) == case.add
    assert result.discard is case.discard


def test_rule_tables_are_complete() -> None:
    names = [r.name for r in MESSAGE_RULES]
    assert len(names) == len(set(names))
    # A recipient whose catch-all went since RCPT time has no action left: checked first.
    assert names[:2] == ["forward_target_missing", "no_action"] and names[-1] == "actions"
    assert names.index("loop") < names.index("high_water") < names.index("actions")
    accept_time = set(Action) - {Action.REJECT}
    assert set(ACTION_STEPS) == accept_time


# --------------------------------------------------------------------------- fates and headers


def test_mixed_message_fates_and_headers() -> None:
    engine = make_engine()
    facts = message(
        engine,
        ["<alice@example.com>", "<zed@bounce.example>", "<x@fwd.example>", "<far@split.example>"],
    )
    result = plan(facts)
    fates = {f.recipient: (f.fate, f.new_recipient) for f in result.fates}
    assert fates == {
        "<alice@example.com>": (Fate.KEPT, ""),
        "<zed@bounce.example>": (Fate.BOUNCED, ""),
        "<x@fwd.example>": (Fate.FORWARDED, "<admin@fwd.example>"),
        "<far@split.example>": (Fate.RELAYED, ""),
    }
    names = [name for name, _value in result.headers]
    # Known and relayed recipients see the copy too: the originals stay unnamed (a Bcc).
    assert names == [HOP_HEADER]
    assert dict(result.headers)[HOP_HEADER] == "mx.example.com (forward, outbox)"
    assert result.dsn is not None
    assert [r.final_recipient for r in result.dsn.recipients] == ["<zed@bounce.example>"]


def test_forwarded_copy_names_its_original_recipients() -> None:
    engine = make_engine()
    result = plan(message(engine, ["<x@fwd.example>", "<Y@fwd.example>"]))
    headers = dict(result.headers)
    assert headers[ORIGINAL_TO_HEADER] == "<x@fwd.example>, <Y@fwd.example>"
    assert headers[HOP_HEADER] == "mx.example.com (forward)"


def test_long_original_list_is_folded_and_bounded() -> None:
    engine = make_engine()
    recipients: list[str | tuple[str, ...]] = [f"<user{i:03d}@fwd.example>" for i in range(60)]
    result = plan(message(engine, recipients))
    value = dict(result.headers)[ORIGINAL_TO_HEADER]
    lines = value.split("\n\t")
    assert all(len(line) <= 78 for line in lines)
    assert value.count("@fwd.example") == 50 and value.endswith("(10 more)")
    assert "\r" not in value and all(line for line in lines)


def test_readdress_and_single_forward_carry_notify_and_orcpt() -> None:
    engine = make_engine()
    result = plan(
        message(
            engine,
            [
                ("<y@old.example>", "NOTIFY=SUCCESS,FAILURE"),
                ("<x@fwd.example>", "NOTIFY=NEVER", "ORCPT=rfc822;x+2Bold@fwd.example"),
            ],
        )
    )
    params = {n.address: n.params for n in result.add}
    assert params["<y@example.com>"] == ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;y@old.example")
    assert params["<admin@fwd.example>"] == ("NOTIFY=NEVER", "ORCPT=rfc822;x+2Bold@fwd.example")


def test_two_originals_for_one_target_carry_no_parameters() -> None:
    engine = make_engine()
    result = plan(message(engine, [("<x@fwd.example>", "NOTIFY=NEVER"), "<y@fwd.example>"]))
    assert [(n.address, n.params) for n in result.add] == [("<admin@fwd.example>", ())]


def test_create_plans_one_mailbox_per_base_address() -> None:
    engine = make_engine()
    result = plan(
        message(engine, ["<new+a@shop.example>", "<NEW+b@shop.example>", "<other@shop.example>"])
    )
    assert [(b.address.key, b.template) for b in result.creates] == [
        ("new@shop.example", "default"),
        ("other@shop.example", "default"),
    ]
    assert not result.delete and not result.add and not result.headers


# --------------------------------------------------------------------------- bounce and DSN


def test_dsn_request_holds_the_facts() -> None:
    engine = make_engine()
    facts = message(
        engine,
        [("<zed@bounce.example>", "NOTIFY=FAILURE", "ORCPT=rfc822;zed@bounce.example")],
        mail_params=("RET=HDRS", "ENVID=abc+2B1"),
    )
    result = plan(facts)
    request = result.dsn
    assert request is not None
    assert request.envelope_sender == SENDER
    assert request.reporting_mta == "mx.example.com"
    assert request.postmaster == "MAILER-DAEMON@mx.example.com"
    assert request.ret == "HDRS" and request.envid == "abc+2B1"
    assert request.queue_id == "4ABCDEF"
    assert request.received_from_mta == "mail.remote.example ([203.0.113.9])"
    assert request.arrival_date == datetime.fromtimestamp(NOW - 2, UTC)
    (failed,) = request.recipients
    assert failed.notify == frozenset({"FAILURE"})
    assert failed.orcpt == "rfc822;zed@bounce.example"
    assert failed.diagnostic == (
        "550 5.1.1 <zed@bounce.example>: Recipient address rejected: User unknown"
    )
    assert b"Subject: hello\r\n" in request.original_headers
    dsn = build_dsn(request, "The mail system at {{ reporting_mta }}\n")
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert dsn.envelope_recipient == "sender@remote.example"


@pytest.mark.parametrize(
    ("label", "params", "sender", "want_reason"),
    [
        ("NOTIFY=NEVER", ("NOTIFY=NEVER",), SENDER, NoDsnReason.NOTIFY),
        ("NOTIFY=SUCCESS only", ("NOTIFY=SUCCESS",), SENDER, NoDsnReason.NOTIFY),
        (
            "MAILER-DAEMON sender",
            (),
            "<MAILER-DAEMON@remote.example>",
            NoDsnReason.MAILER_DAEMON_SENDER,
        ),
    ],
)
def test_no_dsn_but_the_recipient_still_goes(
    label: str, params: tuple[str, ...], sender: str, want_reason: NoDsnReason
) -> None:
    engine = make_engine()
    result = plan(message(engine, [("<zed@bounce.example>", *params)], sender=sender))
    assert result.reply is None and result.dsn is None
    assert result.no_dsn is want_reason
    assert result.delete == ("<zed@bounce.example>",) and result.discard
    assert result.fates[0].fate is Fate.DROPPED_NO_DSN


def test_no_dsn_for_a_report() -> None:
    engine = make_engine()
    headers = collect([("Content-Type", "multipart/report; report-type=delivery-status")])
    result = plan(message(engine, ["<zed@bounce.example>"], headers=headers))
    assert result.dsn is None and result.no_dsn is NoDsnReason.ORIGINAL_IS_REPORT


def test_one_dsn_for_all_bounced_recipients_of_a_message() -> None:
    engine = make_engine()
    result = plan(
        message(
            engine,
            ["<a@bounce.example>", ("<b@bounce.example>", "NOTIFY=NEVER"), "<c@bounce.example>"],
        )
    )
    assert result.dsn is not None
    fates = [f.fate for f in result.fates]
    assert fates == [Fate.BOUNCED, Fate.DROPPED_NO_DSN, Fate.BOUNCED]
    dsn = build_dsn(result.dsn, "{{ recipients|join(', ') }}\n")
    assert dsn.recipients == ("a@bounce.example", "c@bounce.example")


def test_ret_full_body_reaches_the_request() -> None:
    engine = make_engine()
    recipients: list[str | tuple[str, ...]] = ["<zed@bounce.example>"]
    facts = message(engine, recipients, mail_params=("RET=FULL",), body=b"the body\r\n")
    assert wants_body(facts.mail_params, facts.recipients)
    assert not wants_body(("RET=HDRS",), facts.recipients)
    result = plan(facts)
    assert result.dsn is not None and result.dsn.original_body == b"the body\r\n"


def test_dsn_rate_all_bounced_rejects_mixed_defers() -> None:
    config = make_config(bounce=BounceSettings(rate_per_sender=1, reporting_mta="mx.example.com"))
    engine = make_engine(config)
    limits = ActionLimits(config)
    first = message(engine, ["<a@bounce.example>"])
    first_plan = plan_message(first, config, limits, NOW)
    assert first_plan.dsn is not None
    commit_plan(first_plan, first, limits, NOW)
    alone = plan_message(message(engine, ["<b@bounce.example>"]), config, limits, NOW + 1)
    assert alone.rule == "dsn_rate" and alone.reply is not None
    assert alone.reply.format().startswith("550 5.1.1 <b@bounce.example>")
    mixed = plan_message(
        message(engine, ["<alice@example.com>", "<b@bounce.example>"]), config, limits, NOW + 1
    )
    assert mixed.rule == "dsn_rate" and mixed.reply is not None
    assert mixed.reply.format().startswith("451 4.7.1")
    silent = plan_message(
        message(engine, [("<b@bounce.example>", "NOTIFY=NEVER")]), config, limits, NOW + 1
    )
    assert silent.rule == "actions"  # no DSN, so no rate
    later = plan_message(message(engine, ["<b@bounce.example>"]), config, limits, NOW + 3601)
    assert later.rule == "actions" and later.dsn is not None


def test_refused_plan_commits_nothing() -> None:
    config = make_config()
    engine = make_engine(config)
    limits = ActionLimits(config)
    facts = message(engine, ["<a@bounce.example>"], headers=collect(list(HOPS_5)))
    result = plan_message(facts, config, limits, NOW)
    assert result.rule == "actions"  # bounce is not a re-route: no loop check
    commit_plan(result, facts, limits, NOW)
    assert limits.dsn_by_sender.count("sender@remote.example", NOW) == 1
    refused = plan_message(
        message(engine, ["<x@fwd.example>"], headers=collect(list(HOPS_5))), config, limits, NOW
    )
    commit_plan(refused, facts, limits, NOW)
    assert limits.dsn_by_sender.count("sender@remote.example", NOW) == 1


# --------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("local", "want"),
    [
        ("newuser", None),
        ("new.user-1", None),
        ("postmaster", "reserved name"),
        ("abuse", "reserved name"),
        ("root", "reserved name"),
        ("mailer-daemon", "reserved name"),
        ("www", "reserved name"),
        ("a" * 33, "local part too long"),
        ("a..b", "local part could name a path"),
        (".hidden", "local part could name a path"),
        ("a/b", "local part could name a path"),
        ("-dash", "local part does not match create.local_part_pattern"),
        ("trailing.", "local part does not match create.local_part_pattern"),
        ("x%y", "local part does not match create.local_part_pattern"),
        ("{{7*7}}", "local part does not match create.local_part_pattern"),
    ],
)
def test_create_refusal_reason(local: str, want: str | None) -> None:
    address = parse_address("x@shop.example")
    address = address._replace(local=local)
    assert create_refusal_reason(address, CreateSettings()) == want


def test_reserved_names_are_not_negotiable() -> None:
    settings = CreateSettings(reserved=(), local_part_pattern=".*")
    address = parse_address("Postmaster@shop.example", fold_case=False)
    assert create_refusal_reason(address, settings) == "reserved name"


def test_create_total_and_rate() -> None:
    config = make_config(create=CreateSettings(rate_per_hour=2, max_total=3))
    engine = make_engine(config)
    limits = ActionLimits(config, created_total=1)
    two = message(engine, ["<a@shop.example>", "<b@shop.example>"])
    assert plan_message(two, config, limits, NOW).rule == "actions"
    limits.record_create(NOW)
    limits.record_create(NOW)
    assert limits.created_total == 3 and limits.total_reached()
    result = plan_message(message(engine, ["<c@shop.example>"]), config, limits, NOW)
    assert result.rule == "create_refused" and result.reply is not None
    assert result.reply.format().startswith("550 5.1.1 <c@shop.example>")
    limits.max_total = 100
    rate = plan_message(message(engine, ["<c@shop.example>"]), config, limits, NOW + 60)
    assert rate.rule == "create_refused" and rate.reply is not None
    assert rate.reply.format().startswith("451 4.7.1")  # the rate passes: defer, never reject
    assert plan_message(message(engine, ["<c@shop.example>"]), config, limits, NOW + 3601).rule == (
        "actions"
    )


# --------------------------------------------------------------------------- RCPT time


def rcpt(engine: Engine, address: str, *params: str, limits: ActionLimits, sender: str = SENDER):  # type: ignore[no-untyped-def]
    decision = engine.rcpt(RcptFacts(address, sender, CLIENT), record=False)
    return rcpt_refusal(
        decision,
        params,
        sender=sender,
        client_address=CLIENT,
        config=engine.config,
        limits=limits,
        now=NOW,
    )


def test_rcpt_refusal() -> None:
    config = make_config(
        bounce=BounceSettings(rate_per_sender=1, rate_per_client=2),
        create=CreateSettings(rate_per_hour=1, max_total=10),
    )
    engine = make_engine(config)
    limits = ActionLimits(config)
    assert rcpt(engine, "<zed@bounce.example>", limits=limits) is None
    assert rcpt(engine, "<alice@example.com>", limits=limits) is None
    assert rcpt(engine, "<x@fwd.example>", limits=limits) is None
    limits.record_dsn(SENDER, CLIENT, NOW)
    refused = rcpt(engine, "<zed@bounce.example>", limits=limits)
    assert refused is not None and refused.format() == "550 5.1.1 User unknown"
    assert refused.rcpt_text("zed@bounce.example") == (
        "<zed@bounce.example>: Recipient address rejected: User unknown"
    )
    assert rcpt(engine, "<zed@bounce.example>", "NOTIFY=NEVER", limits=limits) is None
    other_sender = rcpt(engine, "<zed@bounce.example>", limits=limits, sender="<o@else.example>")
    assert other_sender is None  # the client has one DSN left
    limits.record_dsn("<o@else.example>", CLIENT, NOW)
    assert (
        rcpt(engine, "<zed@bounce.example>", limits=limits, sender="<p@else.example>") is not None
    )

    postmaster = rcpt(engine, "<abuse@shop.example>", limits=limits)
    assert postmaster is not None and postmaster.code == 550
    assert rcpt(engine, "<new@shop.example>", limits=limits) is None
    limits.record_create(NOW)
    deferred = rcpt(engine, "<new@shop.example>", limits=limits)
    assert deferred is not None and deferred.format().startswith("450 4.7.1")


def test_refresh_decision_prefers_a_known_recipient() -> None:
    directory = InMemoryDirectory(KNOWN)
    engine = make_engine(directory=directory)
    then = engine.rcpt(RcptFacts("<new@shop.example>", SENDER, CLIENT), record=False)
    assert then.action is Action.CREATE
    assert (
        refresh_decision(then, engine.rcpt(RcptFacts("<new@shop.example>", SENDER, CLIENT))) is then
    )
    directory.keys.add("new@shop.example")
    now = engine.rcpt(RcptFacts("<new@shop.example>", SENDER, CLIENT), record=False)
    assert refresh_decision(then, now) is now and now.rule == "known"
    directory.unavailable = True
    failed = engine.rcpt(RcptFacts("<new@shop.example>", SENDER, CLIENT), record=False)
    assert refresh_decision(then, failed) is then


# --------------------------------------------------------------------------- helpers


def test_esmtp_param_and_xtext() -> None:
    assert esmtp_param(("notify=FAILURE", "ORCPT=rfc822;a@b"), "NOTIFY") == "FAILURE"
    assert esmtp_param((), "RET") is None
    assert xtext("a+b=c@d.example") == "a+2Bb+3Dc@d.example"
    assert xtext("é") == "+C3+A9"


def test_queue_and_loop_settings_are_honoured() -> None:
    config = make_config(loops=LoopSettings(max_hops=1), queue=QueueSettings(high_water=5))
    engine = make_engine(config)
    one_hop = collect([(HOP_HEADER, "mx (forward)")])
    assert plan(message(engine, ["<x@fwd.example>"], headers=one_hop), config).rule == "loop"
    assert plan(message(engine, ["<x@fwd.example>"], queue_size=6), config).rule == "high_water"
    assert replies.S554_LOOP.permanent
