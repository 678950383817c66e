"""From a Postfix policy request to the engine's decision and back: gathers facts, performs
effects, never decides.

Only `request=smtpd_access_policy` exists in Postfix; any other request type is a protocol
violation (no reply; Postfix tempfails). At `protocol_state=RCPT` the engine decides (a
missing `recipient` is an empty one: the engine has no opinion on it, and the adapter logs
a warning once per connection, since the client is misconfigured) and its
reply is sent as the action text (e.g. `550 5.1.1 User unknown`, which Postfix sends on as
`550 5.1.1 <x@example.com>: Recipient address rejected: User unknown`); no objection is
`DUNNO`, so Postfix's later restrictions still run. Every other protocol state gets
`DUNNO`. The adapter never answers `OK`: the engine's replies are 4xx/5xx by construction
(core.replies.Reply).

Effects: a block the engine starts is handed to on_block (the caller persists it) before
the reply goes out; if on_block raises, the request is tempfailed by the server like any
handler failure (SPEC 7: a failed side effect never turns into an answer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from policyd.codec import ErrorKind, PolicyRequest, ProtocolError, ProtocolViolation
from policyd.server import ConnectionNotes
from traqmilter.core.attack import Block
from traqmilter.core.engine import Engine, RcptDecision, RcptFacts

log = logging.getLogger(__name__)

NO_OBJECTION: Final = "DUNNO"
SMTPD_ACCESS_POLICY: Final = "smtpd_access_policy"
NO_RECIPIENT_WARNING: Final = "RCPT request without a recipient"

DecisionObserver = Callable[[PolicyRequest, RcptDecision], None]


class PolicyAdapter:
    """The policy server's request handler: request -> action text."""

    __slots__ = ("engine", "on_block", "on_decision")

    def __init__(
        self,
        engine: Engine,
        on_block: Callable[[Block], None],
        *,
        on_decision: DecisionObserver | None = None,
    ) -> None:
        """on_decision, if given, sees every RCPT decision after its effects were performed
        (for the event log and metrics); it must not raise."""
        self.engine = engine
        self.on_block = on_block
        self.on_decision = on_decision

    def __call__(self, request: PolicyRequest, notes: ConnectionNotes | None = None) -> str:
        """The action for one request; notes is its connection's (None outside a server:
        a warning is then given each time)."""
        if request.request != SMTPD_ACCESS_POLICY:
            raise ProtocolViolation(
                ProtocolError(
                    ErrorKind.UNSUPPORTED_REQUEST, "request type is not " + SMTPD_ACCESS_POLICY
                )
            )
        attributes = request.extracted  # holds every attribute read here
        if attributes.get("protocol_state") != "RCPT":
            return NO_OBJECTION
        recipient = attributes.get("recipient", "")
        decision = self.engine.rcpt(
            RcptFacts(
                recipient,
                attributes.get("sender", ""),
                attributes.get("client_address", ""),
                attributes.get("sasl_username", ""),
            )
        )
        if not recipient and (notes is None or notes.first(NO_RECIPIENT_WARNING)):
            log.warning(
                "warning: %s: %s from client %s; answered %s: the policy client is likely "
                "misconfigured (Postfix always sends recipient at RCPT); logged once per "
                "connection",
                notes.peer if notes is not None else "-",
                NO_RECIPIENT_WARNING,
                attributes.get("client_address") or "unknown",
                NO_OBJECTION,
            )
        if decision.new_block is not None:
            self.on_block(decision.new_block)
        if self.on_decision is not None:
            self.on_decision(request, decision)
        reply = decision.reply
        return NO_OBJECTION if reply is None else reply.format()
