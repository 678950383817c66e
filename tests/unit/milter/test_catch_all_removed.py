"""The milter's side of a removed catch-all target: its RCPT callback defers the domain's
unknown recipients (451 4.3.0) with a warning naming the target, rewrites nothing, and
forwards again once the target exists."""

from __future__ import annotations

import logging
from pathlib import Path

import Milter
import pytest
from milter_support import Conversation, make_deployment

from traqmilter.core.address import parse_address
from traqmilter.core.plan import MessageFacts, MessagePlan

SENDER = "sender@remote.example"


def test_a_removed_target_defers_with_a_warning_and_rewrites_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deployment = make_deployment(tmp_path)
    assert deployment.store.remove_mailbox("admin@fwd.example")
    with caplog.at_level(logging.INFO, logger="traqmilter.milter"):
        outcome = Conversation(deployment.service).send(SENDER, ["x@fwd.example"])
    assert outcome.rcpts == {"x@fwd.example": Milter.TEMPFAIL}
    assert outcome.reply is not None and outcome.reply[:2] == ("451", "4.3.0")
    assert outcome.added == outcome.deleted == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "warning: forward target <admin@fwd.example> of <x@fwd.example> does not exist: "
        "unknown recipients there are deferred (451 4.3.0) until it does "
        "(traqmilter mailbox add, or change forward_to)"
    ]
    assert "rule=forward_target_missing" in caplog.text

    deployment.store.add_mailbox(parse_address("admin@fwd.example"))
    outcome = Conversation(deployment.service).send(SENDER, ["x@fwd.example"])
    assert outcome.eom == Milter.CONTINUE
    assert [address for address, _params in outcome.added] == ["<admin@fwd.example>"]


def test_a_target_removed_between_rcpt_and_end_of_message_tempfails_the_message(
    tmp_path: Path,
) -> None:
    """The RCPT-time verdict was `forward`; the target goes before the message ends (the
    planning is what runs at end of message): the whole message is deferred, nothing
    rewritten, so the MTA never bounces it."""
    deployment = make_deployment(tmp_path)
    service = deployment.service
    plan = service.plan

    def plan_after_removal(facts: MessageFacts) -> MessagePlan:
        assert deployment.store.remove_mailbox("admin@fwd.example")
        return plan(facts)

    service.plan = plan_after_removal  # type: ignore[method-assign]
    outcome = Conversation(service).send(SENDER, ["x@fwd.example", "alice@example.com"])
    assert outcome.rcpts == {"x@fwd.example": Milter.CONTINUE, "alice@example.com": Milter.CONTINUE}
    assert outcome.eom == Milter.TEMPFAIL
    assert outcome.reply is not None and outcome.reply[:2] == ("451", "4.3.0")
    assert outcome.added == outcome.deleted == []
