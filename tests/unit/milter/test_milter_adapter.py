"""TraqMilter through pymilter's TestCtx: what it asks of the MTA for each action."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import logging
import threading
from pathlib import Path

import Milter
import pytest
from milter_support import (
    MTA_HOSTNAME,
    Conversation,
    Deployment,
    make_config,
    make_deployment,
)

from traqmilter.core.plan import HOP_HEADER, ORIGINAL_TO_HEADER
from traqmilter.core.settings import (
    Action,
    BounceSettings,
    CreateSettings,
    DomainPolicy,
    LoopSettings,
)
from traqmilter.milter.adapter import WANTED_ACTIONS, TraqMilter
from traqmilter.milter.collect import HeaderCollector

SENDER = "sender@remote.example"


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return make_deployment(tmp_path)


def test_negotiation_asks_only_for_what_the_plans_use(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service)
    milter = conversation.milter
    assert milter._actions == WANTED_ACTIONS
    protocol = milter._protocol
    for skipped in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOEOH, Milter.P_NOUNKNOWN):
        assert protocol & skipped
    # This config bounces and re-routes: headers and body are needed.
    for wanted in (
        Milter.P_NOMAIL,
        Milter.P_NORCPT,
        Milter.P_NODATA,
        Milter.P_NOHDRS,
        Milter.P_NOBODY,
    ):
        assert not protocol & wanted
    for no_reply in (Milter.P_NR_MAIL, Milter.P_NR_HDR, Milter.P_NR_BODY):
        assert protocol & no_reply
    # RCPT and DATA are answered: a recipient can be refused, and DATA keeps Nagle away.
    assert not protocol & Milter.P_NR_RCPT and not protocol & Milter.P_NR_DATA


@pytest.mark.parametrize(
    ("actions", "headers", "body"),
    [
        ({"reject"}, False, False),
        ({"create"}, False, False),
        ({"forward"}, True, False),
        ({"outbox", "reject"}, True, False),
        ({"bounce"}, True, True),
    ],
)
def test_headers_and_body_only_when_the_config_can_need_them(
    tmp_path: Path, actions: set[str], headers: bool, body: bool
) -> None:
    domains = {
        f"d{i}.example": DomainPolicy(
            action=Action(action),
            forward_to="admin@fwd.example",
            readdress_to="x.example",
            outbox_relay="[mx2.example]:25",
        )
        for i, action in enumerate(sorted(actions))
    }
    deployment = make_deployment(tmp_path, make_config(domains=domains))
    protocol = Conversation(deployment.service).milter._protocol
    assert bool(protocol & Milter.P_NOHDRS) is not headers
    assert bool(protocol & Milter.P_NOBODY) is not body


def test_client_from_the_connect_macros(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service, client="2001:db8::7", name="mail.example")
    conversation.ctx._setsymval("_", "user@mail.example [IPv6:2001:db8::7]")
    conversation.send(SENDER, ["alice@example.com"])
    milter = conversation.milter
    assert milter.client_address == "2001:db8::7" and milter.client_name == "mail.example"
    assert milter.mta_hostname == MTA_HOSTNAME
    local = Conversation(deployment.service)
    local.ctx._setsymval("_", "localhost")  # a local submission: no address at all
    local.send(SENDER, ["alice@example.com"])
    assert local.milter.client_address == "" and local.milter.client_name == ""


def test_known_recipient_is_left_alone(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(SENDER, ["alice@example.com"])
    # Accepted at DATA: the MTA sends no headers, body or end of message for it.
    assert outcome.data == Milter.ACCEPT and outcome.eom is None
    assert outcome.added == outcome.deleted == outcome.headers == []
    assert outcome.accepted_unchanged
    assert deployment.submitter.submitted == []


@pytest.mark.parametrize(
    "recipients",
    [
        ["alice@example.com", "a@elsewhere.test"],  # known and not local: no action
        ["alice@example.com", "bob@shop.example"],  # a create domain, mailbox exists
    ],
)
def test_message_without_actions_is_accepted_at_data(
    deployment: Deployment, recipients: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_args: object) -> None:
        raise AssertionError("header collected for a message accepted at DATA")

    conversation = Conversation(deployment.service)
    monkeypatch.setattr(HeaderCollector, "add", never)
    outcome = conversation.send(SENDER, recipients)
    assert outcome.data == Milter.ACCEPT and outcome.accepted_unchanged
    # The next message of the same connection starts afresh and may need everything.
    monkeypatch.undo()
    forwarded = conversation.send(SENDER, ["alice@example.com", "x@fwd.example"])
    assert forwarded.data == Milter.CONTINUE and forwarded.eom == Milter.CONTINUE
    assert forwarded.deleted == ["<x@fwd.example>"]
    again = conversation.send(SENDER, ["alice@example.com"])
    assert again.data == Milter.ACCEPT


def test_a_failed_mail_callback_is_not_accepted_at_data(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation = Conversation(deployment.service)

    def broken() -> None:
        raise RuntimeError("macro bug")

    monkeypatch.setattr(conversation.milter, "_learn_client", broken)
    outcome = conversation.send(SENDER, ["alice@example.com"])
    assert outcome.data == Milter.CONTINUE and outcome.eom == Milter.TEMPFAIL


def test_forward_two_unknown_recipients_one_copy(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(SENDER, ["x@fwd.example", "Y@fwd.example"])
    assert outcome.eom == Milter.CONTINUE
    assert outcome.deleted == ["<x@fwd.example>", "<Y@fwd.example>"]
    assert outcome.added == [("<admin@fwd.example>", None)]
    assert outcome.headers == [
        (HOP_HEADER, f"{MTA_HOSTNAME} (forward)"),
        (ORIGINAL_TO_HEADER, "<x@fwd.example>, <Y@fwd.example>"),
    ]


def test_readdress_keeps_extension_and_carries_parameters(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(
        SENDER, [("Zed+Tag@old.example", "NOTIFY=FAILURE,DELAY")]
    )
    assert outcome.eom == Milter.CONTINUE
    assert outcome.deleted == ["<Zed+Tag@old.example>"]
    assert outcome.added == [
        ("<Zed+Tag@example.com>", "NOTIFY=FAILURE,DELAY ORCPT=rfc822;Zed+2BTag@old.example")
    ]


def test_mixed_message_each_recipient_its_fate(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "traqmilter.milter")
    outcome = Conversation(deployment.service).send(
        SENDER,
        [
            "alice@example.com",
            "zed@bounce.example",
            "x@fwd.example",
            "y@old.example",
            "far@split.example",
            "newbie@shop.example",
        ],
    )
    assert outcome.eom == Milter.CONTINUE
    assert outcome.deleted == ["<zed@bounce.example>", "<x@fwd.example>", "<y@old.example>"]
    assert [a for a, _params in outcome.added] == ["<y@example.com>", "<admin@fwd.example>"]
    assert [name for name, _value in outcome.headers] == [HOP_HEADER]  # no Bcc leak
    (dsn,) = deployment.submitter.submitted
    assert dsn.envelope_sender == "" and dsn.envelope_recipient == SENDER
    assert dsn.recipients == ("zed@bounce.example",)
    mailbox = deployment.store.get_mailbox("newbie@shop.example")
    assert mailbox is not None and mailbox.created_by == "create"
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "4QUEUEID: milter: forwarded: from=<sender@remote.example> "
        "to=<x@fwd.example> new=<admin@fwd.example>" in line
        for line in lines
    )
    assert any(
        "bounced: from=<sender@remote.example> to=<zed@bounce.example>" in line for line in lines
    )
    assert any("mailbox created: newbie@shop.example" in line for line in lines)


def test_bounce_only_discards_after_the_dsn(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(
        SENDER,
        ["zed@bounce.example"],
        mail_params=("RET=HDRS", "ENVID=QQ314159"),
        headers=[("Subject", "Hi {{7*7}} 100%"), ("Message-ID", "<abc@remote.example>")],
    )
    assert outcome.eom == Milter.DISCARD
    assert outcome.deleted == ["<zed@bounce.example>"]
    (dsn,) = deployment.submitter.submitted
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    human, status, headers = report.iter_parts()
    assert "Hi {{7*7}} 100%" in human.get_content()
    status_text = status.as_string()
    assert "Original-Envelope-Id: QQ314159" in status_text
    assert "Final-Recipient: rfc822; zed@bounce.example" in status_text
    assert "Received-From-MTA: dns; client.test ([192.0.2.10])" in status_text
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <abc@remote.example>" in headers.get_payload(decode=True)


def test_ret_full_returns_the_message(deployment: Deployment) -> None:
    Conversation(deployment.service).send(
        SENDER, ["zed@bounce.example"], mail_params=("RET=FULL",), body=b"The body.\r\n"
    )
    (dsn,) = deployment.submitter.submitted
    assert dsn.returned_content == "message" and b"The body." in dsn.data


def test_notify_never_drops_without_dsn(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(
        SENDER, [("zed@bounce.example", "NOTIFY=NEVER")]
    )
    assert outcome.eom == Milter.DISCARD and deployment.submitter.submitted == []


def test_dsn_not_handed_over_tempfails_and_keeps_the_message(deployment: Deployment) -> None:
    deployment.submitter.failure = "connection refused"
    outcome = Conversation(deployment.service).send(SENDER, ["zed@bounce.example"])
    assert outcome.eom == Milter.TEMPFAIL
    assert outcome.reply == ("451", "4.3.0", "Temporary local problem, try again later")


def test_broken_template_tempfails(tmp_path: Path) -> None:
    template = tmp_path / "bounce.txt.j2"
    template.write_text("{{ no_such_variable }}\n")
    config = make_config()
    config.domains["bounce.example"] = dataclasses.replace(
        config.domains["bounce.example"], bounce_template=str(template)
    )
    deployment = make_deployment(tmp_path, config)
    outcome = Conversation(deployment.service).send(SENDER, ["zed@bounce.example"])
    assert outcome.eom == Milter.TEMPFAIL and deployment.submitter.submitted == []


def test_dsn_rate_falls_back_to_reject_at_rcpt(tmp_path: Path) -> None:
    config = make_config(bounce=BounceSettings(rate_per_sender=1, reporting_mta=MTA_HOSTNAME))
    deployment = make_deployment(tmp_path, config)
    first = Conversation(deployment.service).send(SENDER, ["a@bounce.example"])
    assert first.eom == Milter.DISCARD
    second = Conversation(deployment.service).send(
        SENDER, ["b@bounce.example", "alice@example.com"]
    )
    assert second.rcpts == {"b@bounce.example": Milter.REJECT, "alice@example.com": Milter.CONTINUE}
    assert second.accepted_unchanged and len(deployment.submitter.submitted) == 1


def test_rcpt_time_refusals(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service)
    outcome = conversation.send(SENDER, ["zed@example.com"])
    assert outcome.rcpts == {"zed@example.com": Milter.REJECT}
    assert outcome.reply == (
        "550",
        "5.1.1",
        "<zed@example.com>: Recipient address rejected: User unknown",
    )
    percent = conversation.send(SENDER, ["100%real@example.com"])
    assert percent.rcpts == {"100%real@example.com": Milter.REJECT}
    assert percent.reply is not None and percent.reply[2] == (
        "<100%%real@example.com>: Recipient address rejected: User unknown"
    )
    for reserved in ("postmaster2", "abuse", "root", "mailer-daemon"):
        refused = conversation.send(SENDER, [f"{reserved}@shop.example"])
        if reserved == "postmaster2":
            assert refused.eom == Milter.CONTINUE  # not reserved: created
        else:
            assert refused.rcpts == {f"{reserved}@shop.example": Milter.REJECT}
    dots = conversation.send(SENDER, ["../etc@shop.example"])
    assert dots.reply is not None and dots.reply[:2] == ("501", "5.1.3")
    assert deployment.store.get_mailbox("root@shop.example") is None


@pytest.mark.parametrize(
    "recipient",
    ["a\r\nb@example.com", "x@fwd.example\r\nRCPT TO:<y@fwd.example>", "a\x00@x.example"],
)
def test_control_characters_in_addresses_are_refused(
    deployment: Deployment, recipient: str
) -> None:
    outcome = Conversation(deployment.service).send(SENDER, [recipient])
    assert outcome.rcpts == {recipient: Milter.REJECT}
    assert outcome.reply is not None and outcome.reply[:2] == ("501", "5.1.3")


def test_header_injection_stays_inside_the_dsn_headers_part(deployment: Deployment) -> None:
    Conversation(deployment.service).send(
        SENDER,
        ["zed@bounce.example"],
        headers=[("Subject", b"x\nBcc: victim@example.org\n\nbody"), ("To", "zed@bounce.example")],
    )
    (dsn,) = deployment.submitter.submitted
    head, _, _ = dsn.data.partition(b"\r\n\r\n")
    assert b"victim" not in head and b"Bcc" not in head
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report["Subject"] == "Undelivered Mail Returned to Sender"


def test_loop_is_stopped(deployment: Deployment) -> None:
    hops = [(HOP_HEADER, f"mx{i}.example (forward)") for i in range(5)]
    outcome = Conversation(deployment.service).send(SENDER, ["x@fwd.example"], headers=hops)
    assert outcome.eom == Milter.REJECT
    assert outcome.reply == ("554", "5.4.6", "Mail loop detected: too many hops")
    assert outcome.added == outcome.deleted == []


def test_received_limit(tmp_path: Path) -> None:
    deployment = make_deployment(tmp_path, make_config(loops=LoopSettings(max_received=5)))
    received = [("Received", f"from h{i}") for i in range(6)]
    conversation = Conversation(deployment.service)
    assert conversation.send(SENDER, ["far@split.example"], headers=received).eom == Milter.REJECT
    assert conversation.send(SENDER, ["alice@example.com"], headers=received).accepted_unchanged


def test_outbox_keeps_the_recipient_and_adds_the_hop(deployment: Deployment) -> None:
    outcome = Conversation(deployment.service).send(SENDER, ["far@split.example"])
    assert outcome.eom == Milter.CONTINUE
    assert outcome.added == outcome.deleted == []
    assert outcome.headers == [(HOP_HEADER, f"{MTA_HOSTNAME} (outbox)")]


def test_create_copies_the_template_once(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service)
    first = conversation.send(SENDER, ["new+tag@shop.example"])
    assert first.eom == Milter.CONTINUE and first.added == first.deleted == []
    mailbox = deployment.store.get_mailbox("new@shop.example")
    assert mailbox is not None and mailbox.maildir == "shop.example/new/"
    conversation.send(SENDER, ["new@shop.example"])  # known now: nothing to create
    assert deployment.service.limits.created_total == 1


def test_fifty_concurrent_messages_for_one_new_mailbox(tmp_path: Path) -> None:
    deployment = make_deployment(tmp_path, make_config(create=CreateSettings(rate_per_hour=1)))
    conversations = [Conversation(deployment.service) for _ in range(50)]
    results: list[bool] = []
    start = threading.Barrier(50)

    def send(conversation: Conversation) -> None:
        start.wait()
        # Accepted unchanged at end of message, or already at DATA once the mailbox exists.
        results.append(conversation.send(SENDER, ["fresh@shop.example"]).accepted_unchanged)

    threads = [threading.Thread(target=send, args=(c,)) for c in conversations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 50  # rate 1/h: the one mailbox serves them all
    assert deployment.store.get_mailbox("fresh@shop.example") is not None
    assert deployment.service.limits.created_total == 1


def test_create_failure_tempfails(tmp_path: Path) -> None:
    config = make_config()
    config.domains["shop.example"] = dataclasses.replace(
        config.domains["shop.example"], template="no-such-template"
    )
    deployment = make_deployment(tmp_path, config)
    outcome = Conversation(deployment.service).send(SENDER, ["new@shop.example"])
    assert outcome.eom == Milter.TEMPFAIL
    assert outcome.reply == ("451", "4.3.0", "Temporary local problem, try again later")
    assert deployment.store.get_mailbox("new@shop.example") is None


def test_lookup_failure_tempfails_the_recipient(deployment: Deployment) -> None:
    deployment.store.close()
    outcome = Conversation(deployment.service).send(SENDER, ["alice@example.com"])
    assert outcome.rcpts == {"alice@example.com": Milter.TEMPFAIL}
    assert outcome.reply is not None and outcome.reply[:2] == ("451", "4.3.0")


def test_exception_in_a_callback_tempfails(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("directory bug")  # a bug, not DirectoryUnavailable

    monkeypatch.setattr(deployment.engine.directory, "contains", broken)
    outcome = Conversation(deployment.service).send(SENDER, ["alice@example.com"])
    assert outcome.rcpts == {"alice@example.com": Milter.TEMPFAIL}
    assert outcome.reply == ("451", "4.3.0", "Temporary local problem, try again later")


def test_failure_in_a_no_reply_callback_tempfails_at_eom(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_self: HeaderCollector, _name: str, _value: bytes) -> None:
        raise RuntimeError("collector bug")

    monkeypatch.setattr(HeaderCollector, "add", broken)
    outcome = Conversation(deployment.service).send(SENDER, ["x@fwd.example"])
    assert outcome.eom == Milter.TEMPFAIL and outcome.added == []


def test_abort_forgets_the_message(deployment: Deployment) -> None:
    conversation = Conversation(deployment.service)
    conversation.ctx._envfrom(f"<{SENDER}>")
    conversation.milter.envrcpt_bytes(b"<x@fwd.example>")
    assert conversation.milter.recipients
    conversation.milter.abort()
    assert conversation.milter.recipients == [] and conversation.milter.sender == ""
    outcome = conversation.send(SENDER, ["alice@example.com"])
    assert outcome.added == outcome.deleted == []
    conversation.close()


def test_queue_id_without_a_context(deployment: Deployment) -> None:
    milter = TraqMilter(deployment.service)
    milter._setctx(None)
    assert milter.queue_id == "NOQUEUE"
