"""End-of-message planning: the accept-time actions of SPEC 4, decided for one message.

The milter gathers facts (envelope, ESMTP parameters, the RCPT-time decision of every
accepted recipient, a bounded copy of the header section, hop counts, the queue size) and
calls plan_message(). It returns a MessagePlan: the final reply, or the effects that carry
the actions out -- recipients to delete and add, headers to add, mailboxes to create, the
one DSN to hand to the MTA, and whether the message is then discarded. The milter performs
them in a fixed order and decides nothing itself. Effects are per recipient: known,
bounced, forwarded, re-addressed, created and relayed recipients of one message each get
their own fate.

rcpt_refusal() and transaction_split() are the RCPT-time half: an action that cannot be
carried out for one recipient (its DSN would exceed a rate, its mailbox may not be created)
falls back to rejecting that recipient while it can still be rejected alone, and a
recipient whose fate only end of message decides never shares a transaction with one
whose fate is already settled (it, or they, are deferred to a separate transaction with
452 4.5.3). At end of message a single
recipient can no longer be refused, so a refusal found only then (a race with another
message, a queue that filled meanwhile) rejects the message when every recipient is
affected, and tempfails it otherwise: never accept-and-drop. The rates it reads are
core.limits.ActionLimits; the replies are core.replies'.

The order of checks at end of message is MESSAGE_RULES below (first match wins), the
per-action steps are ACTION_STEPS; docs/actions.md quotes both.

SECURITY: every address that goes back to the MTA or into a header comes from a recipient
the engine parsed (no control characters, bounded length) or from the configuration; header
values are built from those only and checked once more (_header_value), so nothing from
the network can add a header line. The header section and body it reads were bounded by
the milter's collectors (MAX_KEPT_HEADER_OCTETS; max_returned_message_octets + 1).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from traqmilter.core import replies
from traqmilter.core.address import Address, bare_address, normalise_domain
from traqmilter.core.dsn import (
    DEFAULT_MAX_RETURNED_MESSAGE_OCTETS,
    DsnRequest,
    FailedRecipient,
    NoDsnReason,
    no_dsn_reason,
    wants_failure_report,
)
from traqmilter.core.engine import RcptDecision
from traqmilter.core.limits import ActionLimits
from traqmilter.core.replies import Reply
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import (
    ALWAYS_RESERVED_LOCAL_PARTS,
    Action,
    Config,
    CreateSettings,
)
from traqmilter.core.verify import VERIFIED_BY, Verdict, header_verdict

HOP_HEADER = "X-Traqmilter-Hop"
"""One per re-routing pass (forward, readdress, outbox); their count is the hop count."""
ORIGINAL_TO_HEADER = "X-Traqmilter-Original-To"
"""On a forwarded copy: the unknown recipients it stands for."""

MAX_KEPT_HEADER_OCTETS = 102_400  # as Postfix's header_size_limit and dsn.py's cut
MAX_ORIGINALS_SHOWN = 50  # a forwarded copy names at most this many original recipients
MAX_HEADER_LINE_CHARS = 78

_REROUTING_ORDER = (Action.FORWARD, Action.READDRESS, Action.OUTBOX)
_REROUTING = frozenset(_REROUTING_ORDER)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True)
class AcceptedRecipient:
    """One RCPT TO the MTA accepted, with the engine's decision for it.

    address: the address exactly as the MTA handed it over, e.g. "<Zed@Example.org>".
    params: its ESMTP parameters as handed over, e.g. ("NOTIFY=FAILURE", "ORCPT=rfc822;z@x").
    """

    address: str
    params: tuple[str, ...]
    decision: RcptDecision

    @property
    def action(self) -> Action | None:
        return self.decision.action

    @property
    def notify(self) -> frozenset[str]:
        value = esmtp_param(self.params, "NOTIFY")
        if not value:
            return frozenset()
        return frozenset(v.strip().upper() for v in value.split(",") if v.strip())

    @property
    def orcpt(self) -> str | None:
        return esmtp_param(self.params, "ORCPT")

    @property
    def bare(self) -> str:
        """The address without its angle brackets, as given (case kept)."""
        return bare_address(self.address)


@dataclass(frozen=True, slots=True)
class HeaderSummary:
    """What end-of-message planning needs from the header section.

    section: the header section as received, CRLF line ends, cut on a field boundary at
        MAX_KEPT_HEADER_OCTETS (truncated says so); for the DSN's returned headers.
    received: Received: fields; hops: HOP_HEADER fields (all of them counted, kept or not).
    auth_results: the first MAX_AUTH_RESULTS Authentication-Results values, in order
        (bounce_to: verified; core.verify judges them).
    """

    section: bytes = b""
    received: int = 0
    hops: int = 0
    truncated: bool = False
    auth_results: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """One message at end of data, as the milter saw it.

    sender: MAIL FROM as handed over ("<>" or "" for the null sender).
    body: the body when a DSN may return it (RET=FULL), else None.
    mta_hostname: the MTA's own name (milter macro j), for the hop trace and the DSN.
    arrival: when MAIL FROM arrived, seconds since the epoch.
    queue_size: the MTA's queue size as last sampled.
    """

    sender: str
    recipients: tuple[AcceptedRecipient, ...]
    mail_params: tuple[str, ...] = ()
    headers: HeaderSummary = field(default_factory=HeaderSummary)
    body: bytes | None = None
    client_address: str = ""
    client_name: str = ""
    sasl_username: str = ""
    queue_id: str = ""
    mta_hostname: str = ""
    arrival: float = 0.0
    queue_size: int = 0

    @property
    def null_sender(self) -> bool:
        return self.sender.strip() in ("", "<>")


# --------------------------------------------------------------------------- the plan


class Fate(enum.StrEnum):
    """What happened to one recipient (the event log's words)."""

    KEPT = "kept"  # delivered as addressed: a known recipient, or not ours to judge
    BOUNCED = "bounced"  # removed; listed in the message's DSN
    DROPPED_NO_DSN = "bounced without DSN"  # removed; the sender asked for no report
    DROPPED_UNVERIFIED = "dropped: sender not verified"  # removed, no DSN (unverified: discard)
    FORWARDED = "forwarded"
    READDRESSED = "readdressed"
    CREATED = "mailbox created"  # delivered as addressed after its mailbox was made
    RELAYED = "relayed"  # outbox: delivered as addressed through the outbound route


@dataclass(frozen=True, slots=True)
class RecipientFate:
    recipient: str  # as handed over
    rule: RuleName  # the RCPT-time rule that judged it
    fate: Fate
    new_recipient: str = ""  # forward target or re-addressed recipient


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str  # "<local@domain>"
    params: tuple[str, ...] = ()  # only NOTIFY= and ORCPT=


@dataclass(frozen=True, slots=True)
class MailboxToCreate:
    address: Address  # the base address (no extension); its key names the mailbox
    template: str  # DomainPolicy.template


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """The decision for one message.

    reply: None to accept (with the effects below); else refuse the whole message with it
        (4xx tempfail, 5xx reject) and perform no effect.
    discard: after every effect succeeded (the DSN handed over), discard the message: no
        recipient is left.
    dsn: the DSN to build and hand over (with dsn_template, "" for the shipped one);
        None when no report is due. no_dsn: why bounced recipients get no report.
    """

    rule: RuleName
    reply: Reply | None = None
    delete: tuple[str, ...] = ()
    add: tuple[NewRecipient, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    creates: tuple[MailboxToCreate, ...] = ()
    dsn: DsnRequest | None = None
    dsn_template: str = ""
    no_dsn: NoDsnReason | None = None
    discard: bool = False
    fates: tuple[RecipientFate, ...] = ()


# --------------------------------------------------------------------------- create


@functools.lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def create_refusal_reason(address: Address, settings: CreateSettings) -> str | None:
    """Why `create` must not make a mailbox for address (its base local part), or None.

    The pattern is the administrator's; the checks around it are not negotiable: no
    reserved role name, no path tricks, nothing longer than max_length.
    """
    local = address.local
    if not local or len(local) > settings.max_length:
        return "local part too long"
    if ".." in local or local.startswith(".") or "/" in local or "\\" in local:
        return "local part could name a path"
    folded = local.lower()
    if folded in ALWAYS_RESERVED_LOCAL_PARTS or folded in {r.lower() for r in settings.reserved}:
        return "reserved name"
    try:
        pattern = _compiled(settings.local_part_pattern)
    except re.error:
        return "create.local_part_pattern is not a valid regular expression"
    if not pattern.fullmatch(local):
        return "local part does not match create.local_part_pattern"
    return None


# --------------------------------------------------------------------------- RCPT time


def rcpt_refusal(
    decision: RcptDecision,
    params: Sequence[str],
    *,
    sender: str,
    client_address: str,
    config: Config,
    limits: ActionLimits,
    now: float,
) -> Reply | None:
    """The reply that refuses this recipient now because its accept-time action could not
    be carried out at end of message, or None. Reads `limits`, never changes them. Like
    the engine's replies it is rendered with Reply.rcpt_text() by a front end that answers
    RCPT itself.

    bounce: a DSN over the sender's or the client's rate -> reject (550 5.1.1), so the
        client, not us, reports the failure (SPEC 4.2 "fall back to reject").
    create: a local part that may not be created, or the total reached -> reject;
        the hourly rate reached -> defer (450 4.7.1), the mailbox may be made later.
    """
    action = decision.action
    address, policy = decision.recipient, decision.policy
    if action is None or address is None or policy is None:
        return None
    if action is Action.BOUNCE:
        notify = AcceptedRecipient("", tuple(params), decision).notify
        if not wants_failure_report(notify):
            return None  # no DSN will be sent, so no rate applies
        if not limits.dsn_allowed(sender, client_address, now):
            return replies.user_unknown(address.full_key, policy.reject_text)
    elif action is Action.CREATE:
        if create_refusal_reason(address, config.create) is not None or limits.total_reached():
            return replies.user_unknown(address.full_key, policy.reject_text)
        if not limits.create_allowed(now):
            return replies.S450_CREATE_RATE
    return None


def decided_at_end_of_message(decision: RcptDecision) -> bool:
    """Whether end of message may have to refuse the whole message for this recipient: a
    bounce whose sender only an Authentication-Results header can verify, in a domain
    that says unverified: reject. (With unverified: discard it is dropped alone, and
    every other accepted recipient's fate is settled at RCPT time.)"""
    later = decision.rule is RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM
    return later and not _discards_unverified(decision)


def transaction_split(
    accepted: Sequence[AcceptedRecipient], decision: RcptDecision
) -> RcptDecision | None:
    """Keep one SMTP transaction homogeneous: the decision that defers this recipient
    (452 4.5.3, rule separate_transaction) when it and the recipients accepted so far in
    the transaction differ in decided_at_end_of_message(); None when it may join them.

    Why: a message is refused or accepted whole at end of data. A bounce recipient whose
    sender turns out unverified there must be refused (550 5.1.1) -- impossible beside
    recipients that must be delivered, and a 451 for the message would repeat on every
    retry with the same recipients. A 4xx at RCPT defers one recipient only, and RFC 5321
    4.5.3.1.10 (452, "too many recipients") tells the client to send it again in a later
    transaction, where it is with its own kind. The first accepted recipient sets the
    kind, and this rule admitted every later one, so the first is the one compared (a
    RCPT costs the same however many came before). Ask only about a recipient nothing
    else refuses (the engine, rcpt_refusal): one rejected anyway is better rejected than
    deferred."""
    if decision.reply is not None or not accepted:
        return None
    if decided_at_end_of_message(accepted[0].decision) == decided_at_end_of_message(decision):
        return None
    return RcptDecision(
        RuleName.SEPARATE_TRANSACTION,
        replies.S452_SEPARATE_TRANSACTION,
        None,
        decision.recipient,
        decision.policy,
    )


_REFRESHED = frozenset({RuleName.KNOWN, RuleName.FORWARD_TARGET_MISSING})


def refresh_decision(accepted: RcptDecision, fresh: RcptDecision) -> RcptDecision:
    """The decision end-of-message planning uses for a recipient judged again at end of
    data: one that became known since RCPT time (its mailbox was just made by a concurrent
    message, or by the administrator) is delivered as addressed, and one whose catch-all
    target has gone since takes that verdict (MESSAGE_RULES tempfails the message); any
    other keeps its RCPT-time judgement, because it was accepted then (queue pressure and
    the action limits are judged again by MESSAGE_RULES)."""
    return fresh if fresh.rule in _REFRESHED else accepted


# --------------------------------------------------------------------------- end of message


class _Message:
    """Facts about one message and the facts derived from them, all computed once (plain
    attributes: each is cheap, and functools.cached_property takes a lock per first access
    on Python 3.11)."""

    def __init__(
        self, facts: MessageFacts, config: Config, limits: ActionLimits, now: float
    ) -> None:
        self.facts = facts
        self.config = config
        self.limits = limits
        self.now = now
        self.actionable = tuple(r for r in facts.recipients if r.action is not None)
        self.reroutes = any(r.action in _REROUTING for r in self.actionable)
        loops, headers = config.loops, facts.headers
        self.looping = headers.hops >= loops.max_hops or headers.received > loops.max_received
        self.queue_pressure = facts.queue_size > config.queue.high_water
        self.verdict = self._verdict()
        bounces = tuple(r for r in self.actionable if r.action is Action.BOUNCE)
        unverified = tuple(r for r in bounces if not self._sender_verified(r))
        self.unverified_dropped = tuple(r for r in unverified if _discards_unverified(r.decision))
        self.unverified_refused = tuple(
            r for r in unverified if not _discards_unverified(r.decision)
        )
        self.bounced = tuple(r for r in bounces if r not in unverified)
        self.dsn_request = _dsn_request(self) if self.bounced else None
        self.no_dsn = None if self.dsn_request is None else no_dsn_reason(self.dsn_request)
        self.dsn_over_rate = (
            self.dsn_request is not None
            and self.no_dsn is None
            and not limits.dsn_allowed(facts.sender, facts.client_address, now)
        )
        self.new_mailboxes = self._new_mailboxes()
        self.create_refusal = self._create_refusal() if self.new_mailboxes else None

    def _verdict(self) -> Verdict | None:
        """The Authentication-Results verdict, for a message with a bounce recipient whose
        sender is verified only now (core.verify); None when none needs it."""
        later = RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM
        if not any(r.decision.rule is later for r in self.actionable):
            return None
        auth = self.facts.headers.auth_results
        return header_verdict(auth, self.config.bounce.authserv_id, self.facts.sender)

    def _sender_verified(self, r: AcceptedRecipient) -> bool:
        if r.decision.rule is not RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM:
            return True  # verified at RCPT time, or bounce_to: any
        return self.verdict is not None and self.verdict.verified

    def _new_mailboxes(self) -> tuple[tuple[AcceptedRecipient, MailboxToCreate], ...]:
        seen: set[str] = set()
        result = []
        for r in self.actionable:
            if r.action is not Action.CREATE:
                continue
            address, policy = r.decision.recipient, r.decision.policy
            assert address is not None and policy is not None
            base = Address(address.local, address.domain)
            if base.key not in seen:
                seen.add(base.key)
                result.append((r, MailboxToCreate(base, policy.template)))
        return tuple(result)

    def _create_refusal(self) -> tuple[Reply, bool, tuple[AcceptedRecipient, ...]] | None:
        """(tempfail reply, permanent?, affected recipients) when a mailbox may not be made."""
        boxes = self.new_mailboxes
        settings = self.config.create
        refused = tuple(r for r, box in boxes if create_refusal_reason(box.address, settings))
        if refused:
            return replies.S451_LOCAL_ERROR, True, refused
        affected = tuple(r for r, _box in boxes)
        if self.limits.created_total + len(boxes) > self.limits.max_total:
            return replies.S451_LOCAL_ERROR, True, affected
        if self.limits.creates_in_window(self.now) + len(boxes) > self.limits.creates.limit:
            return replies.S451_CREATE_RATE, False, affected
        return None


MessageOutcome = Callable[[_Message], MessagePlan]


@dataclass(frozen=True, slots=True)
class MessageRule:
    name: RuleName
    applies: Callable[[_Message], bool]
    outcome: MessageOutcome


def _unchanged(m: _Message) -> MessagePlan:
    return MessagePlan(
        RuleName.NO_ACTION,
        fates=tuple(
            RecipientFate(r.address, r.decision.rule, Fate.KEPT) for r in m.facts.recipients
        ),
    )


def _refuse(rule: RuleName, reply: Reply) -> MessageOutcome:
    return lambda m: MessagePlan(rule, reply)


def _fall_back(
    rule: RuleName,
    affected: Callable[[_Message], tuple[AcceptedRecipient, ...]],
    temporary: Callable[[_Message], Reply],
    permanent_alone: Callable[[_Message], bool] = lambda m: True,
) -> MessageOutcome:
    """An action that cannot be carried out now: when it concerns every recipient (and the
    reason is lasting) reject the message as the recipient would have been rejected at RCPT
    time; otherwise tempfail it, so the other recipients are delayed, never lost."""

    def outcome(m: _Message) -> MessagePlan:
        hit = affected(m)
        if len(hit) == len(m.facts.recipients) and permanent_alone(m):
            return MessagePlan(rule, _user_unknown(hit[0]))
        return MessagePlan(rule, temporary(m))

    return outcome


def _discards_unverified(decision: RcptDecision) -> bool:
    return decision.policy is not None and decision.policy.unverified == "discard"


def _create_affected(m: _Message) -> tuple[AcceptedRecipient, ...]:
    refusal = m.create_refusal
    return () if refusal is None else refusal[2]


def _create_reply(m: _Message) -> Reply:
    assert m.create_refusal is not None
    return m.create_refusal[0]


def _create_permanent(m: _Message) -> bool:
    return m.create_refusal is not None and m.create_refusal[1]


# The precedence at end of message, first match wins. Read top to bottom, this is the
# policy: a catch-all target removed since RCPT time tempfails the message; a message
# without accept-time actions is left alone; re-routed mail past the hop
# limit is refused before anything happens to it; queue pressure turns every action into a
# refusal; a bounce to a sender not verified by then (bounce_to: verified, core.verify) is
# refused as `reject` would have refused it, unless its domain says unverified: discard
# (transaction_split kept such recipients in transactions of their own, so that refusal
# concerns the whole message; a 4xx remains for a mix it did not make);
# then a DSN or a mailbox that may not be made (limits reached since RCPT time)
# refuses; only then are the actions carried out, each recipient by ACTION_STEPS.
MESSAGE_RULES: tuple[MessageRule, ...] = (
    MessageRule(
        RuleName.FORWARD_TARGET_MISSING,  # removed since RCPT time: never re-route to nowhere
        lambda m: any(
            r.decision.rule is RuleName.FORWARD_TARGET_MISSING for r in m.facts.recipients
        ),
        _refuse(RuleName.FORWARD_TARGET_MISSING, replies.S451_LOCAL_ERROR),
    ),
    MessageRule(RuleName.NO_ACTION, lambda m: not m.actionable, _unchanged),
    MessageRule(
        RuleName.LOOP, lambda m: m.reroutes and m.looping, _refuse(RuleName.LOOP, replies.S554_LOOP)
    ),
    MessageRule(
        RuleName.HIGH_WATER,
        lambda m: m.queue_pressure,
        _fall_back(RuleName.HIGH_WATER, lambda m: m.actionable, lambda m: replies.S452_QUEUE_FULL),
    ),
    MessageRule(
        RuleName.UNVERIFIED,
        lambda m: bool(m.unverified_refused),
        _fall_back(
            RuleName.UNVERIFIED, lambda m: m.unverified_refused, lambda m: replies.S451_UNVERIFIED
        ),
    ),
    MessageRule(
        RuleName.DSN_RATE,
        lambda m: m.dsn_over_rate,
        _fall_back(RuleName.DSN_RATE, lambda m: m.bounced, lambda m: replies.S451_DSN_RATE),
    ),
    MessageRule(
        RuleName.CREATE_REFUSED,
        lambda m: m.create_refusal is not None,
        _fall_back(RuleName.CREATE_REFUSED, _create_affected, _create_reply, _create_permanent),
    ),
    MessageRule(RuleName.ACTIONS, lambda m: True, lambda m: _carry_out(m)),
)


def plan_message(
    facts: MessageFacts,
    config: Config,
    limits: ActionLimits,
    now: float,
    rules: Sequence[MessageRule] = MESSAGE_RULES,
) -> MessagePlan:
    """Decide what happens to one message at end of data. Reads `limits`, never changes
    them: the caller commits the plan (commit_plan) once it is sure to carry it out."""
    m = _Message(facts, config, limits, now)
    rule = next(rule for rule in rules if rule.applies(m))  # the last rule always applies
    return rule.outcome(m)


def commit_plan(plan: MessagePlan, facts: MessageFacts, limits: ActionLimits, now: float) -> None:
    """Count the DSN of a plan about to be carried out (a reservation: two messages cannot
    both take the last DSN of a window). Mailboxes are counted as they are created."""
    if plan.reply is None and plan.dsn is not None:
        limits.record_dsn(facts.sender, facts.client_address, now)


# --------------------------------------------------------------------------- the actions


class _Steps:
    """What the per-recipient steps accumulate for one message."""

    __slots__ = ("actions", "added", "delete", "fates", "forwards", "kept", "m")

    def __init__(self, m: _Message) -> None:
        self.m = m
        self.delete: list[str] = []
        self.kept: list[AcceptedRecipient] = []
        self.forwards: dict[str, list[AcceptedRecipient]] = {}
        self.added: list[NewRecipient] = []
        self.fates: list[RecipientFate] = []
        self.actions: set[Action] = set()


def _bounce(steps: _Steps, r: AcceptedRecipient) -> None:
    steps.delete.append(r.address)
    m = steps.m
    if r in m.unverified_dropped:
        fate_rule = RuleName.UNVERIFIED_DISCARD
        steps.fates.append(RecipientFate(r.address, fate_rule, Fate.DROPPED_UNVERIFIED))
        return
    no_report = m.no_dsn is not None or not wants_failure_report(r.notify)
    fate = Fate.DROPPED_NO_DSN if no_report else Fate.BOUNCED
    rule = r.decision.rule
    if rule is RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM and m.verdict is not None:
        rule = VERIFIED_BY[m.verdict.how]  # verified by the header
    steps.fates.append(RecipientFate(r.address, rule, fate))


def _forward(steps: _Steps, r: AcceptedRecipient) -> None:
    address, policy = r.decision.recipient, r.decision.policy
    assert address is not None and policy is not None
    target = policy.forward_address(address.domain)
    steps.delete.append(r.address)
    steps.forwards.setdefault(target, []).append(r)
    steps.fates.append(RecipientFate(r.address, r.decision.rule, Fate.FORWARDED, f"<{target}>"))


def _readdress(steps: _Steps, r: AcceptedRecipient) -> None:
    policy = r.decision.policy
    assert policy is not None
    local, _, _domain = r.bare.rpartition("@")
    new = f"<{local}@{normalise_domain(policy.readdress_to)}>"
    steps.delete.append(r.address)
    steps.added.append(NewRecipient(new, _carried_params(r)))
    steps.fates.append(RecipientFate(r.address, r.decision.rule, Fate.READDRESSED, new))


def _create(steps: _Steps, r: AcceptedRecipient) -> None:
    steps.kept.append(r)
    steps.fates.append(RecipientFate(r.address, r.decision.rule, Fate.CREATED))


def _outbox(steps: _Steps, r: AcceptedRecipient) -> None:
    steps.kept.append(r)  # unaltered: the transport lookup (transport_for) routes it
    steps.fates.append(RecipientFate(r.address, r.decision.rule, Fate.RELAYED))


ACTION_STEPS: Mapping[Action, Callable[[_Steps, AcceptedRecipient], None]] = {
    Action.BOUNCE: _bounce,
    Action.FORWARD: _forward,
    Action.READDRESS: _readdress,
    Action.CREATE: _create,
    Action.OUTBOX: _outbox,
}


def _carry_out(m: _Message) -> MessagePlan:
    steps = _Steps(m)
    for r in m.facts.recipients:
        action = r.action
        if action is None or action is Action.REJECT:  # REJECT never reaches end of data
            steps.kept.append(r)
            steps.fates.append(RecipientFate(r.address, r.decision.rule, Fate.KEPT))
            continue
        steps.actions.add(action)
        ACTION_STEPS[action](steps, r)

    present = {_fold(r.bare) for r in steps.kept} | {_fold(n.address[1:-1]) for n in steps.added}
    for target, originals in steps.forwards.items():
        if _fold(target) in present:
            continue  # the catch-all already gets this message: one copy
        present.add(_fold(target))
        params = _carried_params(originals[0]) if len(originals) == 1 else ()
        steps.added.append(NewRecipient(f"<{target}>", params))

    headers: list[tuple[str, str]] = []
    if steps.actions & _REROUTING:
        names = ", ".join(a.value for a in _REROUTING_ORDER if a in steps.actions)
        headers.append((HOP_HEADER, _header_value(f"{_reporting_mta(m)} ({names})")))
    if steps.forwards and _only_forward_targets(steps):
        shown = [r.bare for rs in steps.forwards.values() for r in rs]
        headers.append((ORIGINAL_TO_HEADER, _address_list(shown)))

    return MessagePlan(
        RuleName.ACTIONS,
        delete=tuple(steps.delete),
        add=tuple(steps.added),
        headers=tuple(headers),
        creates=tuple(box for _r, box in m.new_mailboxes),
        dsn=m.dsn_request if m.no_dsn is None else None,
        dsn_template=_dsn_template(m),
        no_dsn=m.no_dsn,
        discard=not steps.kept and not steps.added,
        fates=tuple(steps.fates),
    )


def _only_forward_targets(steps: _Steps) -> bool:
    """Whether the message reaches nobody but catch-all targets: only then may the copy
    name the original recipients. Every recipient of a message sees the same header
    section, and an unknown recipient may have been a Bcc that others must not learn."""
    targets = {_fold(t) for t in steps.forwards}
    others = [r.bare for r in steps.kept] + [n.address[1:-1] for n in steps.added]
    return all(_fold(a) in targets for a in others)


def _fold(address: str) -> str:
    return address.lower()


def _carried_params(r: AcceptedRecipient) -> tuple[str, ...]:
    """NOTIFY and ORCPT (the only RCPT parameters Postfix takes from a milter) for a
    recipient that replaces r: the original recipient stays named in DSNs (ORCPT as given,
    else made from the address)."""
    params = [p for p in r.params if p.partition("=")[0].upper() == "NOTIFY"]
    orcpt = r.orcpt
    if orcpt is None and r.bare.isascii():
        orcpt = "rfc822;" + xtext(r.bare)
    if orcpt is not None:
        params.append(f"ORCPT={orcpt}")
    return tuple(p for p in params if not _CONTROL.search(p) and " " not in p)


def _dsn_request(m: _Message) -> DsnRequest:
    facts = m.facts
    failed = []
    for r in m.bounced:
        reply = _user_unknown(r)
        failed.append(
            FailedRecipient(
                final_recipient=r.address,
                orcpt=r.orcpt,
                status=reply.enhanced_code,
                diagnostic=reply.format(),
                notify=r.notify,
            )
        )
    mta = _reporting_mta(m)
    client = None
    if facts.client_address:
        name = facts.client_name if facts.client_name and facts.client_name != "unknown" else ""
        client = f"{name} ([{facts.client_address}])".strip()
    ret = esmtp_param(facts.mail_params, "RET")
    return DsnRequest(
        envelope_sender=facts.sender,
        recipients=tuple(failed),
        original_headers=facts.headers.section,
        arrival_date=datetime.fromtimestamp(facts.arrival or m.now, UTC),
        now=datetime.fromtimestamp(m.now, UTC),
        reporting_mta=mta,
        postmaster=f"MAILER-DAEMON@{mta}",
        queue_id=facts.queue_id,
        original_body=facts.body,
        ret=ret,
        envid=esmtp_param(facts.mail_params, "ENVID"),
        received_from_mta=client,
        max_returned_message_octets=DEFAULT_MAX_RETURNED_MESSAGE_OCTETS,
    )


def _user_unknown(r: AcceptedRecipient) -> Reply:
    """550 5.1.1 naming the recipient as Postfix words a recipient rejection: for a whole
    message refused in its place, and for the DSN's Diagnostic-Code."""
    address, policy = r.decision.recipient, r.decision.policy
    assert address is not None and policy is not None
    reason = replies.user_unknown(address.full_key, policy.reject_text)
    return Reply(reason.code, reason.enhanced_code, reason.rcpt_text(r.bare))


def _dsn_template(m: _Message) -> str:
    for r in m.bounced:
        policy = r.decision.policy
        if policy is not None and policy.bounce_template:
            return policy.bounce_template
    return ""


def _reporting_mta(m: _Message) -> str:
    name = _header_value(m.config.bounce.reporting_mta or m.facts.mta_hostname)
    return name.split()[0] if name else "localhost"


@dataclass(frozen=True, slots=True)
class MessageNeeds:
    """What of a message the accept-time actions of a config can ever read."""

    headers: bool  # hop and Received counts (re-routing), the DSN's returned headers
    body: bool  # a DSN returning the full message (RET=FULL)


def message_needs(config: Config) -> MessageNeeds:
    policies = [config.undelivered, *config.domains.values(), *config.exceptions.values()]
    actions = {p.action for p in policies}
    return MessageNeeds(
        headers=bool(actions & (_REROUTING | {Action.BOUNCE})), body=Action.BOUNCE in actions
    )


def needs_end_of_message(recipients: Sequence[AcceptedRecipient]) -> bool:
    """Whether end of message can do anything for these recipients. Without an accept-time
    action, plan_message() answers MESSAGE_RULES' "no_action" (the message goes on
    unchanged) whatever the headers and body say, so the milter can accept the message at
    DATA and skip its headers, body and end of message."""
    return any(r.action is not None for r in recipients)


def wants_body(mail_params: Sequence[str], recipients: Sequence[AcceptedRecipient]) -> bool:
    """Whether the body must be kept for a DSN that returns the full message (RET=FULL)."""
    ret = (esmtp_param(mail_params, "RET") or "").upper()
    return ret == "FULL" and any(r.action is Action.BOUNCE for r in recipients)


# --------------------------------------------------------------------------- helpers


def esmtp_param(params: Sequence[str], name: str) -> str | None:
    """The value of ESMTP parameter `name` (case-insensitive) as given, or None."""
    wanted = name.upper()
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().upper() == wanted:
            return value
    return None


def xtext(text: str) -> str:
    """RFC 3461 section 4 xtext: "+", "=" and anything outside printable ASCII as +HH."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in text
    )


def _header_value(text: str) -> str:
    """Header text we generate: printable, one line, bounded."""
    return " ".join(_CONTROL.sub(" ", text).split())[:900]


def _address_list(addresses: Sequence[str]) -> str:
    """<a>, <b>, ... folded at MAX_HEADER_LINE_CHARS; at most MAX_ORIGINALS_SHOWN named."""
    shown = [f"<{_header_value(a)}>" for a in addresses[:MAX_ORIGINALS_SHOWN]]
    if len(addresses) > MAX_ORIGINALS_SHOWN:
        shown.append(f"({len(addresses) - MAX_ORIGINALS_SHOWN} more)")
    width = MAX_HEADER_LINE_CHARS - len(ORIGINAL_TO_HEADER) - 2
    lines: list[str] = []
    line = ""
    for i, item in enumerate(shown):
        piece = item + ("," if i < len(shown) - 1 else "")
        if line and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}".strip()
    lines.append(line)
    return "\n\t".join(lines)
