"""The milter keeps a transaction to one kind of recipient (core.plan.transaction_split):
a bounce recipient whose sender only end of message can verify (bounce_to: verified,
unverified: reject) never shares a transaction with one whose fate is settled at RCPT
time. The later of two kinds is answered 452 4.5.3 and logged with its rule; the client
sends it again in a new transaction on the same connection, where it is judged alone."""

from __future__ import annotations

import logging
from pathlib import Path

import Milter
import pytest
from milter_support import MTA_HOSTNAME, Conversation, Deployment, make_config, make_deployment

from traqmilter.core.attack import client_key
from traqmilter.core.settings import (
    Action,
    BounceSettings,
    DictionaryAttackSettings,
    DomainPolicy,
    MilterSettings,
)

SENDER = "eve@forged.example"
OURS = MTA_HOSTNAME
FAILED = [("Authentication-Results", f"{OURS}; spf=fail smtp.mailfrom={SENDER}")]
PASSED = [("Authentication-Results", f"{OURS}; spf=pass smtp.mailfrom={SENDER}")]
SPLIT_TEXT = (
    "<{}>: Recipient address rejected: Too many recipients; "
    "send this one again in a separate transaction"
)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    domains = dict(make_config().domains)
    domains["verified.example"] = DomainPolicy(action=Action.BOUNCE)  # bounce_to: verified
    config = make_config(
        domains=domains, bounce=BounceSettings(reporting_mta=OURS, authserv_id=OURS)
    )
    return make_deployment(tmp_path, config)


def test_unknown_after_known_is_deferred_then_rejected_alone(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    conversation = Conversation(deployment.service)
    caplog.set_level(logging.INFO, logger="traqmilter.milter")
    mixed = conversation.send(SENDER, ["alice@example.com", "zed@verified.example"], headers=FAILED)
    assert mixed.rcpts == {
        "alice@example.com": Milter.CONTINUE,
        "zed@verified.example": Milter.TEMPFAIL,
    }
    assert mixed.reply == ("452", "4.5.3", SPLIT_TEXT.format("zed@verified.example"))
    # alice alone: no action, the message goes on unchanged
    assert mixed.accepted_unchanged
    line = next(r.getMessage() for r in caplog.records if "RCPT" in r.getMessage())
    assert "defer: RCPT from client.test[192.0.2.10]: 452 4.5.3 <zed@verified.example>" in line
    assert line.endswith("rule=separate_transaction")

    alone = conversation.send(SENDER, ["zed@verified.example"], headers=FAILED)
    assert alone.rcpts == {"zed@verified.example": Milter.CONTINUE}
    assert alone.eom == Milter.REJECT
    assert alone.reply == (
        "550",
        "5.1.1",
        "<zed@verified.example>: Recipient address rejected: User unknown",
    )
    assert deployment.submitter.submitted == []


def test_known_after_unknown_is_deferred_and_the_verified_sender_gets_the_dsn(
    deployment: Deployment,
) -> None:
    conversation = Conversation(deployment.service)
    first = conversation.send(
        SENDER,
        ["zed@verified.example", "amy@verified.example", "alice@example.com"],
        headers=PASSED,
    )
    assert first.rcpts == {
        "zed@verified.example": Milter.CONTINUE,
        "amy@verified.example": Milter.CONTINUE,  # its own kind: the same transaction
        "alice@example.com": Milter.TEMPFAIL,
    }
    assert first.eom == Milter.DISCARD  # both bounced in one DSN, nobody left
    (dsn,) = deployment.submitter.submitted
    assert dsn.envelope_recipient == SENDER
    assert dsn.recipients == ("zed@verified.example", "amy@verified.example")
    second = conversation.send(SENDER, ["alice@example.com"], headers=PASSED)
    assert second.rcpts == {"alice@example.com": Milter.CONTINUE} and second.accepted_unchanged


def test_a_new_transaction_starts_afresh(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service)
    conversation.send(SENDER, ["zed@verified.example"], headers=FAILED)
    # the previous transaction's kind does not carry over to the next MAIL FROM
    known = conversation.send(SENDER, ["alice@example.com", "bob@shop.example"])
    assert set(known.rcpts.values()) == {Milter.CONTINUE}


def test_discard_domains_mix_freely(tmp_path: Path) -> None:
    domains = dict(make_config().domains)
    domains["drop.example"] = DomainPolicy(action=Action.BOUNCE, unverified="discard")
    config = make_config(
        domains=domains, bounce=BounceSettings(reporting_mta=OURS, authserv_id=OURS)
    )
    deployment = make_deployment(tmp_path, config)
    outcome = Conversation(deployment.service).send(
        SENDER, ["alice@example.com", "zed@drop.example"], headers=FAILED
    )
    assert set(outcome.rcpts.values()) == {Milter.CONTINUE}
    assert outcome.eom == Milter.CONTINUE and outcome.deleted == ["<zed@drop.example>"]


# --------------------------------------------------------------------------- counting
THRESHOLD = 3


def test_sendmail_role_counts_a_deferred_unknown_once_not_at_its_retry_too(
    tmp_path: Path,
) -> None:
    """In the sendmail role the milter counts unknown recipients itself. A client that
    sends `threshold` unknown recipients, each split off with 452 and sent again as RFC
    5321 asks, has made `threshold` unknown attempts, not twice as many: it is not
    blocked. The next unknown recipient still blocks it."""
    domains = dict(make_config().domains)
    domains["verified.example"] = DomainPolicy(action=Action.BOUNCE)
    config = make_config(
        domains=domains,
        bounce=BounceSettings(reporting_mta=OURS, authserv_id=OURS),
        milter=MilterSettings(role="sendmail"),
        dictionary_attack=DictionaryAttackSettings(threshold=THRESHOLD, exempt=()),
    )
    deployment = make_deployment(tmp_path, config, count_unknown=True)
    deployment.engine.attacks.configure(
        threshold=THRESHOLD, window_seconds=600, block_seconds=3600, ipv6_prefix=64, max_clients=9
    )
    conversation = Conversation(deployment.service)
    for n in range(THRESHOLD):
        deferred = f"zed{n}@verified.example"
        mixed = conversation.send(SENDER, ["alice@example.com", deferred])
        assert mixed.rcpts[deferred] == Milter.TEMPFAIL, (n, mixed)
        assert mixed.reply == ("452", "4.5.3", SPLIT_TEXT.format(deferred))
        retry = conversation.send(SENDER, [deferred], headers=FAILED)
        assert retry.rcpts == {deferred: Milter.CONTINUE}, (n, retry)
        assert retry.eom == Milter.REJECT
    assert deployment.engine.attacks.blocked_until(client_key("192.0.2.10", 64) or 0, 0) is None
    blocked = conversation.send(SENDER, ["one-more@verified.example"])
    assert blocked.rcpts == {"one-more@verified.example": Milter.TEMPFAIL}
    assert blocked.reply is not None and blocked.reply[:2] == ("450", "4.7.1")
