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
