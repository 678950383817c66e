"""The decision engine: one place where every RCPT-time verdict and its reply is made.

policyd (Postfix), the milter's RCPT callback (Sendmail) and `traqmilter explain` all call
Engine.rcpt(). It takes facts and returns a RcptDecision holding the final reply (or none:
"no objection"), the accept-time action the milter will carry out, the rule that chose it,
and the effects an adapter must perform (a block to persist). It does no I/O itself: the
directory, queue gauge and attack table are injected.

The order of checks is the table RCPT_RULES below; docs/policy.md quotes it.

transport_for() and outbox_relay_for() over routing_engine() answer the MTA's routing
lookups for the outbox action (Postfix's transport socketmap, served by policyd; Sendmail's
mailHost socket map, served by the milter): the same rules, cut to the question of routing
(ROUTING_RULES).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from traqmilter.core import replies
from traqmilter.core.address import Address, AddressError, parse_address
from traqmilter.core.attack import AttackTable, Block, ip_key, recipient_token
from traqmilter.core.replies import Reply
from traqmilter.core.rule_names import UNKNOWN_ACTION, RuleName
from traqmilter.core.settings import Action, Config, DomainPolicy


class DirectoryUnavailable(Exception):
    """A lookup could not be answered (database locked, map unreadable): tempfail, never
    treat the recipient as unknown."""


class Directory(Protocol):
    def contains(self, key: str) -> bool:
        """Whether local@domain (already normalised) is a known recipient.
        Raises DirectoryUnavailable when it cannot tell."""
        ...


class SpfChecker(Protocol):
    """traqmilter's own SPF check for bounce_to: verified (core.verify; traqmilter.spf does
    the DNS): the RFC 7208 result, one of pass, fail, softfail, neutral, none, permerror,
    temperror."""

    def check(self, client_address: str, sender: str, helo: str) -> str: ...


class QueueGauge(Protocol):
    @property
    def size(self) -> int:
        """The MTA's queue size as last sampled (never counted on this call)."""
        ...


class RcptFacts(NamedTuple):
    """What the MTA told us about one RCPT TO (Postfix policy attribute names)."""

    recipient: str
    sender: str = ""
    client_address: str = ""
    sasl_username: str = ""
    helo_name: str = ""  # for an SPF check (bounce_to: verified)


class RcptDecision(NamedTuple):
    """(NamedTuples, this and RcptFacts: policyd makes one of each per request, and a
    frozen dataclass costs twice as much to build.)"""

    rule: RuleName  # which rule of RCPT_RULES decided (or what its outcome found)
    reply: Reply | None  # None: no objection (policy DUNNO, milter CONTINUE)
    action: Action | None = None  # accept-time action for the milter at end-of-message
    recipient: Address | None = None
    policy: DomainPolicy | None = None  # the handling that applies to this recipient
    new_block: Block | None = None  # effect: persist this block

    @property
    def accepted(self) -> bool:
        return self.reply is None


ADDRESS_MEMO_SIZE: Final = 4096
"""Recipient texts whose parsed Address (or None: unparsable) and policy Engine remembers;
emptied when full. Both are immutable, so remembered ones are safe to share."""
CLIENT_MEMO_SIZE: Final = 4096
"""Client addresses whose counting key Engine remembers (an SMTP session asks once per
RCPT); the memo is emptied when full, so its memory is bounded whatever clients connect."""


class _Rcpt:
    """Facts about one RCPT. The recipient's address and policy, which the first rules
    always need, are found at once; the expensive facts (directory lookup, attack table)
    only when a rule asks. `blocked` and `known` are computed at each read (the rules
    read each once); `client`, which two rules read, is kept."""

    __slots__ = (
        "_client",
        "_client_found",
        "address",
        "engine",
        "facts",
        "now",
        "policy",
        "record",
        "spf",
    )

    def __init__(
        self,
        engine: Engine,
        facts: RcptFacts,
        now: float,
        record: bool,
        spf: SpfChecker | None = None,
    ) -> None:
        self.engine = engine
        self.facts = facts
        self.now = now
        self.record = record  # False for explain: decide without counting
        self.spf = spf  # traqmilter's own SPF check, when the front end has one
        self.address, self.policy = engine.recipient(facts.recipient)
        self._client: int | None = None
        self._client_found = False

    @property
    def is_postmaster(self) -> bool:
        return self.address is not None and self.address.local.lower() == "postmaster"

    @property
    def client(self) -> int | None:
        """Counting key of the client, None when it is exempt or not an IP address."""
        if not self._client_found:
            self._client = self.engine.counting_key(self.facts)
            self._client_found = True
        return self._client

    @property
    def blocked(self) -> bool:
        key = self.client
        return key is not None and self.engine.attacks.blocked_until(key, self.now) is not None

    @property
    def known(self) -> bool:
        """Raises DirectoryUnavailable; rcpt() turns that into the lookup_failed rule."""
        address = self.address
        assert address is not None
        return self.engine.known(address)

    @property
    def queue_size(self) -> int:
        return self.engine.queue.size

    @property
    def null_sender(self) -> bool:
        return is_null_sender(self.facts.sender)


def is_null_sender(sender: str) -> bool:
    return sender.strip() in ("", "<>")


Outcome = Callable[["Engine", _Rcpt], RcptDecision]

# Read by compiled code without a class attribute lookup (Final module constants).
_CLIENT_BLOCKED: Final = RuleName.CLIENT_BLOCKED
_UNKNOWN_REJECT: Final = RuleName.UNKNOWN_REJECT
_UNKNOWN_HIGH_WATER: Final = RuleName.UNKNOWN_HIGH_WATER
_UNKNOWN_NULL_SENDER: Final = RuleName.UNKNOWN_NULL_SENDER
_FORWARD_TARGET_MISSING: Final = RuleName.FORWARD_TARGET_MISSING
_LOOKUP_FAILED: Final = RuleName.LOOKUP_FAILED


@dataclass(frozen=True, slots=True)
class Rule:
    name: RuleName
    applies: Callable[[_Rcpt], bool]
    outcome: Outcome


def _no_objection(rule: RuleName) -> Outcome:
    return lambda engine, r: RcptDecision(rule, None, None, r.address, r.policy)


def _refuse(rule: RuleName, reply: Reply) -> Outcome:
    return lambda engine, r: RcptDecision(rule, reply, None, r.address, r.policy)


def _passing(name: RuleName, applies: Callable[[_Rcpt], bool]) -> Rule:
    """A rule whose match means no objection."""
    return Rule(name, applies, _no_objection(name))


def _refusing(name: RuleName, applies: Callable[[_Rcpt], bool], reply: Reply) -> Rule:
    """A rule whose match is refused with `reply`."""
    return Rule(name, applies, _refuse(name, reply))


def _blocked(engine: Engine, r: _Rcpt) -> RcptDecision:
    return RcptDecision(_CLIENT_BLOCKED, engine.block_reply, None, r.address, r.policy)


def _unknown(engine: Engine, r: _Rcpt) -> RcptDecision:
    """An unknown recipient of a local domain: count it, then apply the domain's action."""
    assert r.policy is not None and r.address is not None
    new_block = None
    if r.client is not None and r.record and not r.null_sender:
        token = recipient_token(r.address.full_key)
        new_block = engine.attacks.record_unknown(r.client, r.now, token)
    if new_block is not None:
        return RcptDecision(
            _CLIENT_BLOCKED, engine.block_reply, None, r.address, r.policy, new_block
        )
    action = r.policy.action
    if action is Action.REJECT:
        return RcptDecision(_UNKNOWN_REJECT, engine.user_unknown(r), None, r.address, r.policy)
    if r.queue_size > engine.config.queue.high_water:
        return RcptDecision(_UNKNOWN_HIGH_WATER, engine.user_unknown(r), None, r.address, r.policy)
    if action is Action.FORWARD and not engine.deliverable(
        r.policy.forward_address(r.address.domain)
    ):
        # The catch-all was removed at run time: rewriting to it would make the MTA bounce
        # (backscatter). Defer until it exists again or the config changes.
        return RcptDecision(
            _FORWARD_TARGET_MISSING, replies.S451_LOCAL_ERROR, None, r.address, r.policy
        )
    if action is Action.BOUNCE:
        if engine.refuses_dsn_to(r.facts.sender):
            # The DSN could never be delivered, and handing it over would fail on every
            # retry: refuse now, as `reject` would, and the client reports the failure.
            return RcptDecision(
                RuleName.UNKNOWN_BOUNCE_SENDER_UNKNOWN,
                engine.user_unknown(r),
                None,
                r.address,
                r.policy,
            )
        if r.policy.bounce_to != "any":
            return _bounce_to_verified(engine, r)
    return RcptDecision(UNKNOWN_ACTION[action], None, action, r.address, r.policy)


def _bounce_to_verified(engine: Engine, r: _Rcpt) -> RcptDecision:
    """bounce_to: verified (core.verify): what is known about the sender at RCPT time. A
    trusted client or a passing SPF check verifies it; a failing SPF check refuses the
    recipient now, as `reject` would (no DSN to a sender nobody vouches for); without an
    SPF check the header at end of message decides (core.plan)."""
    facts = r.facts
    if facts.sasl_username or engine.client_key(facts.client_address) is None:
        rule = RuleName.UNKNOWN_BOUNCE_TRUSTED_CLIENT
    elif r.spf is None:
        rule = RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM
    elif r.spf.check(facts.client_address, facts.sender, facts.helo_name) == "pass":
        rule = RuleName.UNKNOWN_BOUNCE_SPF_PASS
    else:
        return RcptDecision(
            RuleName.UNKNOWN_BOUNCE_UNVERIFIED, engine.user_unknown(r), None, r.address, r.policy
        )
    return RcptDecision(rule, None, Action.BOUNCE, r.address, r.policy)


def _null_sender_unknown(engine: Engine, r: _Rcpt) -> RcptDecision:
    return RcptDecision(_UNKNOWN_NULL_SENDER, engine.user_unknown(r), None, r.address, r.policy)


# The precedence of checks at RCPT time, first match wins. Read top to bottom, this is the
# policy: postmaster is always reachable, queue pressure and attack blocks come before any
# directory lookup (a blocked harvester learns nothing), known recipients pass, and only
# then does the domain's action apply. Null-sender mail to unknown recipients is refused
# but not counted: it is backscatter from innocent servers.
RCPT_RULES: tuple[Rule, ...] = (
    # A request that names no recipient comes from a misconfigured client (Postfix always
    # sends one at RCPT): no opinion and nothing counted, since refusing would refuse a
    # recipient that was never named.
    _passing(RuleName.NO_RECIPIENT, lambda r: not r.facts.recipient),
    _refusing(RuleName.BAD_ADDRESS, lambda r: r.address is None, replies.S501_BAD_RECIPIENT),
    _passing(RuleName.NOT_LOCAL, lambda r: r.policy is None),
    _passing(RuleName.POSTMASTER, lambda r: r.is_postmaster),
    _passing(RuleName.BARE_LOCAL_PART, lambda r: not r.address.domain),  # type: ignore[union-attr]
    _refusing(
        RuleName.QUEUE_FULL,
        lambda r: r.queue_size > r.engine.defer_water,
        replies.S452_QUEUE_FULL,
    ),
    Rule(RuleName.CLIENT_BLOCKED, lambda r: r.blocked, _blocked),
    _passing(RuleName.KNOWN, lambda r: r.known),
    Rule(
        RuleName.UNKNOWN_NULL_SENDER,
        # In an outbox (split) domain "unknown here" may exist on the other server, so a
        # bounce for it is relayed on like any mail; it is still never counted (_unknown).
        lambda r: r.null_sender and r.policy.action is not Action.OUTBOX,  # type: ignore[union-attr]
        _null_sender_unknown,
    ),
    Rule(RuleName.UNKNOWN, lambda r: True, _unknown),
)


class Engine:
    """Decides. Holds no I/O: directory, queue gauge and attack table are injected.

    Not thread-safe (the attack table is shared): a threaded adapter serialises calls.
    """

    config: Config
    directory: Directory
    attacks: AttackTable
    queue: QueueGauge
    defer_water: int

    def __init__(
        self,
        config: Config,
        directory: Directory,
        attacks: AttackTable,
        queue: QueueGauge,
        clock: Callable[[], float],
        rules: Sequence[Rule] = RCPT_RULES,
    ) -> None:
        self.config = config
        self.directory = directory
        self.attacks = attacks
        self.queue = queue
        self.clock = clock
        self.rules = tuple(rules)
        self.default_policy = config.undelivered
        self.exempt_networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in config.dictionary_attack.exempt
        )
        self.exempt_authenticated = config.dictionary_attack.exempt_authenticated
        self.ipv6_prefix = config.dictionary_attack.ipv6_prefix
        self.client_keys: dict[str, int | None] = {}  # memo of client_key(), bounded
        self.delimiters = config.directory.recipient_delimiter
        self.fold_case = not config.directory.case_sensitive_local_parts
        # memo of recipient(), bounded
        self.recipients: dict[str, tuple[Address | None, DomainPolicy | None]] = {}
        self.defer_water = config.queue.defer_water
        self._rule_tests = tuple((rule.applies, rule.outcome) for rule in self.rules)
        self.block_reply = (
            replies.S421_CLIENT_BLOCKED
            if config.dictionary_attack.disconnect
            else replies.S450_CLIENT_BLOCKED
        )
        self._exceptions = tuple(
            (re.compile(fnmatch.translate(pattern.lower())), policy)
            for pattern, policy in config.exceptions.items()
        )

    def policy_for(self, address: Address) -> DomainPolicy | None:
        """Handling of an address: the first matching exception, else its domain's."""
        domain_policy = self.config.domains.get(address.domain)
        if domain_policy is None:
            return None
        if self._exceptions:
            for key in {address.full_key.lower(), address.key.lower()}:
                for pattern, policy in self._exceptions:
                    if pattern.fullmatch(key):
                        return policy
        return domain_policy

    def recipient(self, text: str) -> tuple[Address | None, DomainPolicy | None]:
        """The parsed recipient (None when it is not a valid address) and the handling that
        applies to it (None when it is not local), remembered."""
        memo = self.recipients
        found = memo.get(text)  # not memo[text]: a KeyError costs as much as a parse
        if found is not None:
            return found
        try:
            address: Address | None = parse_address(
                text, delimiters=self.delimiters, fold_case=self.fold_case, allow_bare=True
            )
        except AddressError:
            address = None
        policy: DomainPolicy | None
        if address is None:
            policy = None
        elif not address.domain:  # bare local part: only postmaster is meaningful
            policy = self.default_policy
        else:
            policy = self.policy_for(address)
        if len(memo) >= ADDRESS_MEMO_SIZE:
            memo.clear()
        found = memo[text] = (address, policy)
        return found

    def counting_key(self, facts: RcptFacts) -> int | None:
        """The key the attack table counts this client under (remembered); None when it is
        not counted: authenticated and exempt_authenticated, exempt, or not an IP address."""
        if self.exempt_authenticated and facts.sasl_username:
            return None
        text = facts.client_address
        memo = self.client_keys
        if text in memo:  # two probes, not memo[text]: a KeyError costs as much as a parse
            return memo[text]
        key = self.client_key(text)
        if len(memo) >= CLIENT_MEMO_SIZE:
            memo.clear()
        memo[text] = key
        return key

    def client_key(self, client_address: str) -> int | None:
        """Counting key of a client address; None when it is exempt or not an IP address."""
        try:
            ip = ipaddress.ip_address(client_address.strip())
        except ValueError:
            return None
        if any(ip in net for net in self.exempt_networks):
            return None
        return ip_key(ip, self.ipv6_prefix)

    def known(self, address: Address) -> bool:
        """Whether the directory knows a local address (or `user` of `user+ext`).
        Raises DirectoryUnavailable."""
        directory = self.directory
        if address.extension and directory.contains(address.full_key):
            return True
        return directory.contains(address.key)

    def deliverable(self, target: str) -> bool:
        """Whether mail re-routed to `target` can be delivered: a remote address is the
        MTA's to route; a local one must be known (a cached lookup, like any other).
        Raises DirectoryUnavailable."""
        address, policy = self.recipient(target)
        if address is None:
            return False
        return policy is None or self.known(address)

    def refuses_dsn_to(self, sender: str) -> bool:
        """Whether this engine would refuse a DSN to `sender` (null-sender mail to it): an
        address of a local domain the directory does not know (rule unknown_null_sender).
        Postmaster, known addresses, outbox domains (whose unknown addresses may live on
        the other server) and other domains are not refused. Decided by RCPT_RULES
        themselves, without counting; a lookup that fails is lookup_failed (tempfail)."""
        if not sender.strip() or sender.strip() == "<>":
            return False
        decision = self.rcpt(RcptFacts(sender), record=False)
        if decision.rule is _LOOKUP_FAILED:
            raise DirectoryUnavailable(f"cannot tell whether {sender!r} exists")
        return decision.rule is _UNKNOWN_NULL_SENDER

    def user_unknown(self, r: _Rcpt) -> Reply:
        assert r.policy is not None and r.address is not None
        return replies.user_unknown(r.address.full_key, r.policy.reject_text)

    def note_deferred(self, facts: RcptFacts, decision: RcptDecision) -> bool:
        """The milter deferred this recipient to a separate transaction (452 4.5.3): if it
        is one rcpt() counts (unknown, from a counted client, not a null sender), remember
        it so that the client's retry is not counted a second time (AttackTable.
        note_deferred). Whether it was remembered. The deferred attempt itself was counted
        (by policyd or the milter) like any other, so that a 452 tells nobody for free
        which addresses are unknown."""
        address = decision.recipient
        if decision.action is None or address is None or is_null_sender(facts.sender):
            return False
        key = self.counting_key(facts)
        if key is None:
            return False
        self.attacks.note_deferred(key, recipient_token(address.full_key), self.clock())
        return True

    def rcpt(
        self, facts: RcptFacts, *, record: bool = True, spf: SpfChecker | None = None
    ) -> RcptDecision:
        """Decide one RCPT TO. record=False decides without counting (explain). spf: the
        front end's own SPF check for bounce_to: verified (the milter's; policyd has none,
        and leaves such a sender to the milter)."""
        r = _Rcpt(self, facts, self.clock(), record, spf)
        try:
            # The table ends with a rule that always applies.
            for applies, outcome in self._rule_tests:
                if applies(r):
                    return outcome(self, r)
        except DirectoryUnavailable:
            return RcptDecision(
                _LOOKUP_FAILED, replies.S451_LOOKUP_FAILED, None, r.address, r.policy
            )
        raise AssertionError("RCPT rules must end with a rule that always applies")


# --------------------------------------------------------------------------- outbox routing


def _routing_outcome(engine: Engine, r: _Rcpt) -> RcptDecision:
    assert r.policy is not None and r.address is not None
    action = r.policy.action
    return RcptDecision(UNKNOWN_ACTION[action], None, action, r.address, r.policy)


ROUTING_RULE_NAMES = (
    RuleName.BAD_ADDRESS,
    RuleName.NOT_LOCAL,
    RuleName.POSTMASTER,
    RuleName.BARE_LOCAL_PART,
    RuleName.KNOWN,
)
# Routing asks only "is this an unknown recipient of a local domain, and what is its
# action?": never the sender, the client, blocks or queue pressure, so mail already
# accepted for an outbox recipient is routed the same way whenever it is delivered.
ROUTING_RULES: tuple[Rule, ...] = (
    *(rule for name in ROUTING_RULE_NAMES for rule in RCPT_RULES if rule.name is name),
    Rule(RuleName.UNKNOWN, lambda r: True, _routing_outcome),
)


def routing_engine(engine: Engine) -> Engine:
    """An engine over the same config and directory that decides by ROUTING_RULES."""
    return Engine(
        engine.config, engine.directory, engine.attacks, engine.queue, engine.clock, ROUTING_RULES
    )


def outbox_relay_for(decision: RcptDecision) -> str | None:
    """The outbox_relay of an unknown recipient of an outbox domain (as routing_engine()
    decides it), None (the MTA routes as usual) otherwise.

    It is also Sendmail's answer: FEATURE(ldap_routing)'s mailHost map (contrib/sendmail)
    relays the original address to this host through the relay mailer, whose port applies
    (config.check_semantics refuses a port in outbox_relay under milter.role: sendmail)."""
    policy = decision.policy
    if decision.action is not Action.OUTBOX or policy is None or not policy.outbox_relay:
        return None
    if decision.reply is not None:
        return None
    return policy.outbox_relay


def transport_for(decision: RcptDecision) -> str | None:
    """The Postfix transport(5) result for a recipient: "smtp:NEXTHOP" for an unknown
    recipient of an outbox domain, None (not found: Postfix routes as usual) otherwise."""
    relay = outbox_relay_for(decision)
    return None if relay is None else f"smtp:{relay}"
