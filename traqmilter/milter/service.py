"""What every milter connection shares: the engine, the action limits and the effects, made
safe for libmilter's threads (one thread per SMTP session).

The service gathers no facts and makes no decision: it asks the engine (RCPT time) and
core.plan (end of message), and performs the effects a plan names -- creating
mailboxes, building and handing over the DSN -- raising ActionFailed when one fails, so
the adapter tempfails the message (SPEC 7).

Locks: `decide_lock` serialises every call into the engine and the limits (neither is
thread-safe; both answer in microseconds). `create_lock` is held by a message with `create`
recipients from planning until its mailboxes exist, so that concurrent messages for one new
address make one mailbox and the creation rate is never overshot; lock order is
create_lock, then decide_lock.

SECURITY: a bounce template is read by traqmilter.templates (bounded) and rendered
sandboxed by core.template.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

from traqmilter.core.address import Address
from traqmilter.core.attack import Block
from traqmilter.core.digest import DigestEvent, events_of
from traqmilter.core.dsn import DsnError, DsnMessage, build_dsn
from traqmilter.core.engine import Engine, RcptDecision, RcptFacts, SpfChecker
from traqmilter.core.limits import ActionLimits
from traqmilter.core.plan import (
    AcceptedRecipient,
    MessageFacts,
    MessageNeeds,
    MessagePlan,
    commit_plan,
    message_needs,
    plan_message,
    rcpt_refusal,
    refresh_decision,
    transaction_split,
)
from traqmilter.core.replies import Reply
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import Action, Config
from traqmilter.core.template import TemplateError
from traqmilter.milter.submit import DsnSubmitter, SubmitError
from traqmilter.spf import spf_checker
from traqmilter.templates import read_template

log = logging.getLogger("traqmilter.milter")


_JUDGED_AGAIN = frozenset({Action.CREATE, Action.FORWARD})


class ActionFailed(Exception):
    """A side effect of an accept-time action failed: tempfail the message."""


class EngineSource(Protocol):
    """Where the current engine and config come from (traqmilter.runtime.Runtime): read at
    every use, so a reload takes effect for the next recipient."""

    @property
    def engine(self) -> Engine: ...

    @property
    def config(self) -> Config: ...


class MailboxStore(Protocol):
    """The writable directory store (traqmilter.directory.MailboxStore)."""

    def count_created(self) -> int: ...

    def create_from_template(self, address: Address, template: str) -> bool: ...


class MilterService:
    def __init__(
        self,
        source: EngineSource,
        *,
        mailboxes: Callable[[], MailboxStore | None],
        submitter: DsnSubmitter,
        count_unknown: bool = False,
        role: str = "postfix",
        on_block: Callable[[Block], None] | None = None,
        clock: Callable[[], float] = time.time,
        digests: Callable[[Sequence[DigestEvent]], None] | None = None,
        hooks: Callable[[tuple[str, ...], str], None] | None = None,
    ) -> None:
        """count_unknown: count unknown recipients towards dictionary-attack blocks. False
        under Postfix, where policyd has already counted them at RCPT time; True only when
        no policy service runs (Sendmail). role: milter.role as read at start, the MTA
        whose RCPT replies this milter words (Reply.rcpt_text). on_block persists a block
        the engine started. mailboxes gives the current writable store (a reload replaces
        it)."""
        self.source = source
        self.mailboxes = mailboxes
        self.submitter = submitter
        self.count_unknown = count_unknown
        self.role = role
        self.on_block = on_block
        self.clock = clock
        self.digests = digests
        self.hooks = hooks
        store = mailboxes()
        created = store.count_created() if store is not None else 0
        self.limits = ActionLimits(source.config, created_total=created)
        self._limits_config = source.config
        self._needs_config = source.config
        self._needs = message_needs(source.config)
        self._spf_config = source.config
        self._spf = spf_checker(source.config.bounce)
        self.decide_lock = threading.Lock()
        self.create_lock = threading.Lock()

    @property
    def queue_size(self) -> int:
        """The MTA's queue size as last sampled (the current engine's gauge)."""
        return self.source.engine.queue.size

    def _current_limits(self, config: Config) -> ActionLimits:
        if config is not self._limits_config:  # reloaded: new limits, same counts
            self.limits.reconfigure(config)
            self._limits_config = config
        return self.limits

    def _current_spf(self, config: Config) -> SpfChecker | None:
        if config is not self._spf_config:  # reloaded: the SPF settings may have changed
            self._spf = spf_checker(config.bounce)
            self._spf_config = config
        return self._spf

    # --- RCPT time

    def judge_recipient(
        self,
        facts: RcptFacts,
        params: Sequence[str],
        accepted: Sequence[AcceptedRecipient] = (),
    ) -> tuple[RcptDecision, Reply | None]:
        """The decision for one RCPT TO, and the reply refusing it (None: accept).

        The reply is the engine's own (under Postfix only reachable when the policy service
        is absent or the directory changed since it answered), else the fall-back to reject
        of an action that could not be carried out (core.plan.rcpt_refusal), else the
        deferral to a separate transaction (core.plan.transaction_split: `accepted` are the
        recipients this transaction has accepted so far; the decision returned is then
        that rule's)."""
        engine = self.source.engine
        spf = self._current_spf(engine.config)
        checked: SpfChecker | None = None
        if spf is not None:
            # The SPF check asks DNS: never under the lock every session shares. Only a
            # bounce recipient whose sender is not verified otherwise needs it.
            with self.decide_lock:
                first = engine.rcpt(facts, record=False)
            if first.rule is RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM:
                checked = _Checked(spf.check(facts.client_address, facts.sender, facts.helo_name))
        with self.decide_lock:
            decision = engine.rcpt(facts, record=self.count_unknown, spf=checked)
            refusal = decision.reply or rcpt_refusal(
                decision,
                params,
                sender=facts.sender,
                client_address=facts.client_address,
                config=engine.config,
                limits=self._current_limits(engine.config),
                now=self.clock(),
            )
        if decision.new_block is not None and self.on_block is not None:
            self.on_block(decision.new_block)
        if refusal is None:
            split = transaction_split(accepted, decision)
            if split is not None:
                # This attempt was counted (here or by policyd); the client's retry of
                # it must not be counted again (AttackTable.note_deferred).
                with self.decide_lock:
                    engine.note_deferred(facts, decision)
                return split, split.reply
        return decision, refusal

    # --- end of message

    @contextlib.contextmanager
    def planning(self, recipients: Sequence[AcceptedRecipient]) -> Iterator[None]:
        """Hold the create lock while a message with `create` recipients is planned and its
        mailboxes are made; other messages do not wait for it."""
        if any(r.action is Action.CREATE for r in recipients):
            with self.create_lock:
                yield
        else:
            yield

    def needs(self) -> MessageNeeds:
        """What of a message the current config can need (read at each connection)."""
        config = self.source.config
        if config is not self._needs_config:
            self._needs = message_needs(config)
            self._needs_config = config
        return self._needs

    def plan(self, facts: MessageFacts) -> MessagePlan:
        """Judge `create` and `forward` recipients again (a concurrent message may have made
        the mailbox; the catch-all target may have been removed since RCPT time), plan the
        message and commit the plan to the limits. Call inside planning()."""
        with self.decide_lock:
            engine = self.source.engine
            if any(r.action in _JUDGED_AGAIN for r in facts.recipients):
                recipients = tuple(
                    replace(r, decision=refresh_decision(r.decision, self._fresh(engine, r, facts)))
                    if r.action in _JUDGED_AGAIN
                    else r
                    for r in facts.recipients
                )
                facts = replace(facts, recipients=recipients)
            now = self.clock()
            limits = self._current_limits(engine.config)
            plan = plan_message(facts, engine.config, limits, now)
            commit_plan(plan, facts, limits, now)
        return plan

    @staticmethod
    def _fresh(engine: Engine, r: AcceptedRecipient, facts: MessageFacts) -> RcptDecision:
        return engine.rcpt(
            RcptFacts(r.address, facts.sender, facts.client_address, facts.sasl_username),
            record=False,
        )

    def create_mailboxes(self, plan: MessagePlan) -> list[str]:
        """Make the plan's new mailboxes; return the keys this call created (a mailbox a
        concurrent message made first is fine). Call inside planning()."""
        if not plan.creates:
            return []
        store = self.mailboxes()
        if store is None:
            raise ActionFailed("create: no writable directory store")
        created = []
        for box in plan.creates:
            try:
                made = store.create_from_template(box.address, box.template)
            except Exception as exc:  # DirectoryError, ValueError, database trouble
                raise ActionFailed(f"create {box.address.key}: {exc}") from exc
            if made:
                created.append(box.address.key)
                with self.decide_lock:
                    self.limits.record_create(self.clock())
        return created

    def tell(self, facts: MessageFacts, plan: MessagePlan, created: Sequence[str]) -> None:
        """After a message was accepted: record its events for the digests and queue the
        on_create hooks. Both only hand over, and never fail the message: its recipients
        are already changed and its mailboxes made, so an error here is logged, not raised."""
        if self.digests is None and self.hooks is None:
            return
        try:
            events = events_of(facts, plan, created)
            if events and self.digests is not None:
                self.digests(events)
            if self.hooks is not None:
                for event in events:
                    if event.on_create:
                        self.hooks(event.on_create, event.address)
        except Exception:  # a bug; the mail goes on
            log.exception("%s: milter: digest or on_create not recorded", facts.queue_id)

    def build_dsn(self, plan: MessagePlan) -> DsnMessage | None:
        if plan.dsn is None:
            return None
        try:
            return build_dsn(plan.dsn, read_template(plan.dsn_template))
        except (DsnError, TemplateError, OSError, UnicodeDecodeError) as exc:
            raise ActionFailed(f"DSN not built: {exc}") from exc

    def submit_dsn(self, dsn: DsnMessage) -> None:
        try:
            self.submitter.submit(dsn)
        except SubmitError as exc:
            raise ActionFailed(f"DSN not handed over: {exc}") from exc


class _Checked:
    """An SPF result already found, as the engine's SpfChecker."""

    def __init__(self, result: str) -> None:
        self.result = result

    def check(self, client_address: str, sender: str, helo: str) -> str:
        return self.result
