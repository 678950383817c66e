"""The pymilter callbacks: gather facts from the MTA, ask the service, perform the plan.

One TraqMilter instance per SMTP connection; libmilter calls it on that session's thread,
so instance state needs no lock and shared state lives in MilterService.

The conversation (Postfix, milter protocol 6):
- negotiate: ask for the actions the plans need (add and delete recipients, recipients
  with ESMTP parameters, add headers) and only the callbacks below; helo, end-of-headers
  and unknown commands are skipped. `data` is requested although it does nothing: without
  it Postfix's DATA exchange leaves the milter socket idle in a pattern that meets Nagle's
  algorithm and delayed ACKs (NOTES-postfix.md, "about 40 ms per message").
- envfrom, header, body: facts only, answered with NOREPLY where the MTA allows it (no
  round trip). A failure in one of them cannot be answered on the spot: it is logged and
  the message is tempfailed at end of message. The connect callback is skipped: the MTA
  sends the connect macros anyway (client address, its own name), read at the first MAIL.
  Headers and body are skipped too for connections that cannot need them under the
  current config (headers: only bounce and re-routing actions read them; the body: only a
  DSN returning the full message).
- envrcpt: the engine's decision for the recipient; a refusal (engine reply, or an action
  that could not be carried out) rejects that recipient alone, now. The instance holds the
  transaction's accepted recipients, so a recipient that must travel in a transaction of
  its own kind is deferred here (452 4.5.3, core.plan.transaction_split): only the milter
  sees the whole transaction (a policy request names one recipient).
- data: when no accepted recipient has an accept-time action (the usual message: every
  recipient known), answer ACCEPT: the message goes on unchanged and the MTA skips the
  milter for the rest of it (headers, body, eom). Otherwise CONTINUE, and the per-connection
  choices above decide whether headers and body follow (docs/operations.md, "What the
  milter asks of the MTA").
- eom: plan, then the effects in this order -- mailboxes, DSN built, header and recipient
  changes, DSN handed over -- and only then DISCARD (no recipient left) or CONTINUE.
  Any failure on the way: 451 4.3.0, TEMPFAIL; the MTA drops the changes with the message.
- abort and close: forget the message; close forgets the connection.

Every callback catches its own exceptions (log with traceback, 451 4.3.0, TEMPFAIL);
pymilter's own safety net (tempfail on an uncaught exception) stays as the last resort.

SECURITY: reply texts come from core.replies (no control characters); '%' is doubled for
libmilter's format. Everything from the MTA is bounded: header text by HeaderCollector,
the body by BodyCollector (and only kept for RET=FULL with a bounced recipient).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import Milter

from traqmilter.core import replies
from traqmilter.core.address import bare_address
from traqmilter.core.dsn import DEFAULT_MAX_RETURNED_MESSAGE_OCTETS
from traqmilter.core.engine import RcptFacts
from traqmilter.core.plan import (
    AcceptedRecipient,
    Fate,
    MessageFacts,
    MessagePlan,
    needs_end_of_message,
    wants_body,
)
from traqmilter.core.replies import Reply
from traqmilter.core.rule_names import RuleName
from traqmilter.logs import decision, forward_target_missing, log_value, refusal_action
from traqmilter.metrics import Metrics
from traqmilter.milter.collect import BodyCollector, HeaderCollector
from traqmilter.milter.service import ActionFailed, MilterService

log = logging.getLogger("traqmilter.milter")

# pymilter is untyped: its constants and decorators, typed once here.
CONTINUE: int = Milter.CONTINUE
TEMPFAIL: int = Milter.TEMPFAIL
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
DISCARD: int = Milter.DISCARD
ADDRCPT_PAR: int = Milter.ADDRCPT_PAR
# The milter actions the plans use; nothing else is requested from the MTA.
WANTED_ACTIONS: int = Milter.ADDHDRS | Milter.ADDRCPT | Milter.ADDRCPT_PAR | Milter.DELRCPT

P_NOHDRS: int = Milter.P_NOHDRS
P_NOBODY: int = Milter.P_NOBODY
_CLIENT_MACRO = re.compile(r"(\S*)\s*\[([^\]]*)\]")

F = TypeVar("F", bound=Callable[..., Any])


def _noreply(callback: F) -> F:
    """pymilter's @noreply: the MTA need not wait for this callback's answer."""
    wrapped: F = Milter.noreply(callback)
    return wrapped


def _as_bytes(callback: F) -> F:
    """pymilter's @decode("bytes"): header values arrive undecoded."""
    wrapped: F = Milter.decode("bytes")(callback)
    return wrapped


def _answered(callback: F) -> F:
    """A callback whose result goes back to the MTA: on any exception, log it and
    answer 451 4.3.0 (TEMPFAIL)."""

    @functools.wraps(callback)
    def guarded(self: TraqMilter, *args: Any) -> int:
        try:
            result: int = callback(self, *args)
            return result
        except Exception:
            log.exception("%s: milter: %s failed; tempfail", self.queue_id, callback.__name__)
            self.count_error()
            try:
                return self.refuse(replies.S451_LOCAL_ERROR)
            except (AttributeError, Milter.error):  # the connection is gone: no reply
                return TEMPFAIL

    return guarded  # type: ignore[return-value]


def _unanswered(callback: F) -> F:
    """A callback the MTA may not wait for (NOREPLY): on any exception, log it and mark the
    message failed; eom tempfails it."""

    @functools.wraps(callback)
    def guarded(self: TraqMilter, *args: Any) -> int:
        try:
            callback(self, *args)
        except Exception:
            log.exception(
                "%s: milter: %s failed; the message will be tempfailed",
                self.queue_id,
                callback.__name__,
            )
            self.count_error()
            self.failed = True
        return CONTINUE

    return guarded  # type: ignore[return-value]


def _angled(address: str) -> str:
    """An address from the MTA as `<address>` in a log line, escaped (traqmilter.logs)."""
    return f"<{log_value(bare_address(address))}>"


class TraqMilter(Milter.Base):  # type: ignore[misc]
    """One SMTP connection."""

    def __init__(self, service: MilterService, *, metrics: Metrics | None = None) -> None:
        """metrics, if given, counts this connection's decisions, actions and errors."""
        self.service = service
        self.metrics = metrics
        self.client_address = ""
        self.client_name = ""
        self.mta_hostname = ""
        self._reset_message()

    def _reset_message(self) -> None:
        self.sender = ""
        self.mail_params: tuple[str, ...] = ()
        self.sasl_username = ""
        self.helo_name = ""
        self.arrival = 0.0
        self.recipients: list[AcceptedRecipient] = []
        self.headers = HeaderCollector()
        self.kept_body: BodyCollector | None = None
        self.failed = False

    @property
    def _raw_queue_id(self) -> str:
        try:
            value = self.getsymval("i")
        except (AttributeError, Milter.error):  # no context any more (after close)
            value = None
        return value or ""

    @property
    def queue_id(self) -> str:
        """The queue id as it appears in log lines (escaped), NOQUEUE before one exists."""
        return log_value(self._raw_queue_id) or "NOQUEUE"

    def refuse(self, reply: Reply, recipient: str | None = None) -> int:
        """Set the SMTP reply and return the milter status of its class. A recipient's
        refusal is worded as Postfix words its own ("Recipient address rejected: "), under
        the MTA's own prefix (Reply.rcpt_text)."""
        if recipient is None:
            text = reply.text
        else:
            text = reply.rcpt_text(bare_address(recipient), mta=self.service.role)
        self.setreply(str(reply.code), reply.enhanced_code, text.replace("%", "%%"))
        return REJECT if reply.permanent else TEMPFAIL

    # --- negotiation

    def negotiate(self, opts: list[int]) -> int:
        offered = opts[1]
        result: int = super().negotiate(opts)
        opts[0] = self._actions = opts[0] & WANTED_ACTIONS
        # Every callback costs the milter a thread switch into Python: skip the header
        # section and the body for connections that cannot need them under this config.
        needs = self.service.needs()
        skip = (0 if needs.headers else P_NOHDRS) | (0 if needs.body else P_NOBODY)
        opts[1] = self._protocol = opts[1] | (skip & offered)
        return result

    # --- facts

    @_noreply
    @_unanswered
    def envfrom(self, sender: str, *params: str) -> int:
        self._reset_message()
        self.sender = sender
        self.mail_params = params
        self.sasl_username = self.getsymval("{auth_authen}") or ""
        self.helo_name = self.getsymval("s") or ""  # only when the MTA sends macro s
        self.arrival = time.time()
        if not self.mta_hostname:  # once per connection: the connect macros stay available
            self._learn_client()
        return CONTINUE

    def count_error(self) -> None:
        if self.metrics is not None:
            self.metrics.errors_here.inc()

    def _learn_client(self) -> None:
        """Client and MTA names from the connect macros, which the MTA sends even though the
        connect callback is skipped (one callback less per connection): Postfix's `_` is
        "name [address]", Sendmail's "name [address]" or "user@name [IPv6:address]";
        Sendmail also has {client_addr} and {client_name}."""
        self.mta_hostname = self.getsymval("j") or "localhost"
        name = self.getsymval("{client_name}") or ""
        address = self.getsymval("{client_addr}") or ""
        if not address:
            match = _CLIENT_MACRO.match(self.getsymval("_") or "")
            if match is not None:
                name = name or match.group(1).rpartition("@")[2]
                address = match.group(2)
        address = address.removeprefix("IPv6:").removeprefix("ipv6:")
        try:
            self.client_address = str(ipaddress.ip_address(address))
        except ValueError:
            self.client_address = ""  # a local submission or a unix socket: no client IP
        self.client_name = name

    @_answered
    def envrcpt(self, recipient: str, *params: str) -> int:
        facts = RcptFacts(
            recipient, self.sender, self.client_address, self.sasl_username, self.helo_name
        )
        started = time.perf_counter()
        rcpt, refusal = self.service.judge_recipient(facts, params, self.recipients)
        if self.metrics is not None:
            self.metrics.latency_here.observe(time.perf_counter() - started)
            self.metrics.decision(rcpt)
        if refusal is not None:
            if rcpt.rule is RuleName.FORWARD_TARGET_MISSING:
                forward_target_missing(log, rcpt)
            self._log_decision(
                refusal_action(refusal), (recipient,), rcpt.rule, stage="RCPT", reply=refusal
            )
            return self.refuse(refusal, recipient)
        self.recipients.append(AcceptedRecipient(recipient, params, rcpt))
        return CONTINUE

    @_answered
    def data(self) -> int:
        if not self.failed and not needs_end_of_message(self.recipients):
            # Every recipient goes on unchanged: ACCEPT ends this message for the milter,
            # and the MTA sends none of its headers, body or end of message (each a thread
            # switch into Python here, eom a round trip). A failure in envfrom must still
            # tempfail the message at eom, so it does not take this way.
            return ACCEPT
        if wants_body(self.mail_params, self.recipients):
            self.kept_body = BodyCollector(DEFAULT_MAX_RETURNED_MESSAGE_OCTETS)
        return CONTINUE

    @_noreply
    @_unanswered
    @_as_bytes
    def header(self, name: str, value: bytes) -> int:
        self.headers.add(name, value)
        return CONTINUE

    @_noreply
    @_unanswered
    def body(self, chunk: bytes) -> int:
        if self.kept_body is not None:
            self.kept_body.add(chunk)
        return CONTINUE

    # --- end of message

    @_answered
    def eom(self) -> int:
        if self.failed:
            log.error("%s: milter: a callback failed earlier; tempfail", self.queue_id)
            return self.refuse(replies.S451_LOCAL_ERROR)
        facts = self._facts()
        service = self.service
        try:
            with service.planning(facts.recipients):
                plan = service.plan(facts)
                if plan.reply is not None:
                    self._log_refusal(facts, plan)
                    return self.refuse(plan.reply)
                created = service.create_mailboxes(plan)
            dsn = service.build_dsn(plan)
            self._change_message(plan)
            if dsn is not None:
                service.submit_dsn(dsn)
        except ActionFailed as exc:
            # Our own wording around a local failure (store, submission); escaped, since a
            # submission error may quote the MTA's reply.
            log.error("%s: milter: %s; tempfail", facts.queue_id, log_value(str(exc)))
            self.count_error()
            return self.refuse(replies.S451_LOCAL_ERROR)
        self._log_fates(facts, plan, created, dsn is not None)
        service.tell(facts, plan, created)
        return DISCARD if plan.discard else CONTINUE

    def _facts(self) -> MessageFacts:
        return MessageFacts(
            sender=self.sender,
            recipients=tuple(self.recipients),
            mail_params=self.mail_params,
            headers=self.headers.summary(),
            body=self.kept_body.body() if self.kept_body is not None else None,
            client_address=self.client_address,
            client_name=self.client_name,
            sasl_username=self.sasl_username,
            queue_id=self.queue_id,
            mta_hostname=self.mta_hostname,
            arrival=self.arrival,
            queue_size=self.service.queue_size,
        )

    def _change_message(self, plan: MessagePlan) -> None:
        for name, value in plan.headers:
            self.addheader(name, value)
        for address in plan.delete:
            self.delrcpt(address)
        with_params = bool(self._actions & ADDRCPT_PAR)  # Sendmail before 8.14: no
        for new in plan.add:
            if new.params and with_params:
                self.addrcpt(new.address, " ".join(new.params))
            else:
                self.addrcpt(new.address)

    # --- the event log: one line per decision, Postfix style

    def _log_decision(
        self,
        action: str,
        recipients: tuple[str, ...],
        rule: str,
        *,
        stage: str = "",
        reply: Reply | None = None,
        new: str = "",
    ) -> None:
        decision(
            log,
            "milter",
            action,
            queue_id=self._raw_queue_id,
            client_name=self.client_name,
            client_address=self.client_address,
            sender=self.sender,
            recipients=recipients,
            rule=rule,
            stage=stage,
            reply=reply,
            new=new,
        )

    def _log_refusal(self, facts: MessageFacts, plan: MessagePlan) -> None:
        assert plan.reply is not None
        self._log_decision(
            refusal_action(plan.reply),
            tuple(r.address for r in facts.recipients),
            plan.rule,
            stage="END-OF-MESSAGE",
            reply=plan.reply,
        )

    def _log_fates(
        self, facts: MessageFacts, plan: MessagePlan, created: list[str], dsn_sent: bool
    ) -> None:
        if self.metrics is not None:
            self.metrics.actions(
                created=len(created), dsn_sent=dsn_sent, dsn_suppressed=plan.no_dsn is not None
            )
        if not log.isEnabledFor(logging.INFO):
            return
        for fate in plan.fates:
            if fate.fate is Fate.KEPT:
                continue
            self._log_decision(
                fate.fate.value, (fate.recipient,), fate.rule, new=fate.new_recipient
            )
        for key in created:
            log.info("%s: milter: mailbox created: %s", facts.queue_id, log_value(key))
        if dsn_sent:
            log.info("%s: milter: DSN handed over: to=%s", facts.queue_id, _angled(facts.sender))
        elif plan.no_dsn is not None:
            log.info("%s: milter: no DSN: %s", facts.queue_id, plan.no_dsn.value)
        if plan.discard:
            log.info("%s: milter: discarded: no recipient left", facts.queue_id)

    # --- end of transaction and connection

    @_answered
    def abort(self) -> int:
        self._reset_message()
        return CONTINUE

    @_answered
    def close(self) -> int:
        self._reset_message()
        return CONTINUE
