"""The RFC 3464 DSN builder: golden messages, backscatter rules, hostile input, templates.

Golden files hold the exact bytes build_dsn() returns for the shipped template. After a
deliberate change, regenerate them with TRAQMILTER_REGEN_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import binascii
import dataclasses
import email
import email.policy
import email.utils
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from importlib.resources import files
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traqmilter.core.dsn import (
    DEFAULT_SUBJECT,
    MAX_RETURNED_HEADER_OCTETS,
    MAX_SUBJECT_CHARS,
    DsnError,
    DsnMessage,
    DsnRequest,
    FailedRecipient,
    NoDsnReason,
    _boundary,
    _Part,
    build_dsn,
    decode_xtext,
    no_dsn_reason,
    recipients_needing_dsn,
)
from traqmilter.core.template import MAX_RENDERED_OCTETS, TemplateError, validate_template

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("TRAQMILTER_REGEN_GOLDEN") == "1"
DEFAULT_TEMPLATE = files("traqmilter").joinpath("data/bounce.txt.j2").read_text("utf-8")
SUBJECT_TEMPLATE = (
    "Subject: Undeliverable: {{ original_subject }}\n\nGone: {{ recipients|join(', ') }}\n"
)

ARRIVAL = datetime(2025, 11, 24, 16, 54, 0, tzinfo=UTC)
NOW = ARRIVAL + timedelta(seconds=3)
ORIGINAL_HEADERS = (
    b"Received: from mail.example.org (mail.example.org [192.0.2.1])\r\n"
    b"\tby mx.example.com (Postfix) with ESMTP id 4ZxQ1s2Lz9\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: nosuch@example.com\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"Message-ID: <lunch.1@example.org>\r\n"
    b"Date: Mon, 24 Nov 2025 16:53:58 +0000\r\n"
)
ORIGINAL_BODY = b"Hi,\r\n\r\nlunch on Friday at noon?\r\n\r\nAlice\r\n"

TOP_LEVEL_FIELDS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}
PER_MESSAGE_FIELDS = {
    "original-envelope-id",
    "reporting-mta",
    "received-from-mta",
    "arrival-date",
    "x-traqmilter-queue-id",
}
PER_RECIPIENT_FIELDS = {
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "diagnostic-code",
    "last-attempt-date",
}


def make_request(**changes: object) -> DsnRequest:
    request = DsnRequest(
        envelope_sender="alice@example.org",
        recipients=(FailedRecipient("nosuch@example.com"),),
        original_headers=ORIGINAL_HEADERS,
        original_body=ORIGINAL_BODY,
        arrival_date=ARRIVAL,
        now=NOW,
        reporting_mta="mx.example.com",
        postmaster="MAILER-DAEMON@mx.example.com",
        queue_id="4ZxQ1s2Lz9",
    )
    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class RawPart:
    headers: dict[str, str]
    body: bytes

    def decoded(self) -> bytes:
        if self.headers.get("content-transfer-encoding") == "quoted-printable":
            return binascii.a2b_qp(self.body)
        return self.body


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def human_text(message: EmailMessage) -> str:
    part = next(message.iter_parts())
    assert isinstance(part, EmailMessage)
    return str(part.get_content()).replace("\r\n", "\n")


def unescape(text: str) -> str:
    """The email package keeps raw UTF-8 header octets as surrogate escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8")


def raw_parts(data: bytes) -> list[RawPart]:
    """The MIME parts exactly as written, split on the boundary by hand."""
    boundary = parse(data).get_boundary()
    assert boundary
    chunks = data.split(f"\r\n--{boundary}".encode())
    assert chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, separator, body = chunk[2:].partition(b"\r\n\r\n")
        assert separator
        fields = (line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(RawPart({name.lower(): value for name, value in fields}, body))
    return parts


def status_blocks(part: RawPart) -> list[dict[str, str]]:
    """message/delivery-status fields: the per-message block, then one per recipient."""
    text = part.decoded().decode("utf-8")
    assert text.endswith("\r\n")
    blocks = []
    for block in text[:-2].split("\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in block.split("\r\n"):
            name, separator, value = line.partition(": ")
            assert separator, line
            assert name.lower() not in fields, f"repeated field {name}"
            fields[name.lower()] = value
        blocks.append(fields)
    return blocks


def assert_well_formed(dsn: DsnMessage) -> EmailMessage:
    """CRLF only, lines within 998 octets, no NUL, parses without defects, and only the
    header fields and delivery-status fields we write (nothing injected)."""
    data = dsn.data
    assert b"\0" not in data
    assert data.endswith(b"\r\n")
    for line in data[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998
    if not dsn.body_8bitmime:
        assert data.isascii()
    message = parse(data)
    assert message.defects == []
    assert {name.lower() for name in message} <= TOP_LEVEL_FIELDS
    for name, value in message.items():
        assert "\r" not in str(value) and "\n" not in str(value), name
    parts = list(message.iter_parts())
    assert len(parts) == 3
    for part in parts:
        assert part.defects == []
    blocks = status_blocks(raw_parts(data)[1])
    assert set(blocks[0]) <= PER_MESSAGE_FIELDS
    for block in blocks[1:]:
        assert set(block) <= PER_RECIPIENT_FIELDS
    return message


# --------------------------------------------------------------------------- golden files


@dataclass(frozen=True)
class GoldenCase:
    name: str
    request: DsnRequest
    final_recipients: tuple[str, ...]
    original_recipients: tuple[str | None, ...]
    envid: str | None = None
    report_type: str = "delivery-status"
    returned_type: str = "text/rfc822-headers"
    smtputf8: bool = False
    body_8bitmime: bool = False
    diagnostics: dict[str, str] = field(default_factory=dict)


GOLDEN_CASES = [
    GoldenCase(
        "simple",
        make_request(),
        final_recipients=("nosuch@example.com",),
        original_recipients=(None,),
    ),
    GoldenCase(
        "multiple_recipients",
        make_request(
            recipients=(
                FailedRecipient("nosuch@example.com"),
                FailedRecipient("never@example.com", notify=frozenset({"NEVER"})),
                FailedRecipient(
                    "sales-old@example.com",
                    notify=frozenset({"FAILURE", "DELAY"}),
                    diagnostic="550 5.1.1 <sales-old@example.com>: Mailbox retired",
                ),
                FailedRecipient("delay-only@example.com", notify=frozenset({"SUCCESS", "DELAY"})),
                FailedRecipient("bob.typo@example.com", status="5.1.10"),
            ),
            arrival_date=ARRIVAL.astimezone(timezone(timedelta(hours=1))),
        ),
        final_recipients=("nosuch@example.com", "sales-old@example.com", "bob.typo@example.com"),
        original_recipients=(None, None, None),
        diagnostics={
            "sales-old@example.com": "smtp; 550 5.1.1 <sales-old@example.com>: Mailbox retired"
        },
    ),
    GoldenCase(
        "orcpt_envid",
        make_request(
            recipients=(
                FailedRecipient("nosuch@example.com", orcpt="rfc822;nosuch+2Blists@example.com"),
                FailedRecipient("typo@example.com", orcpt="rfc822;Typo@Example.COM"),
            ),
            envid="QQ314159+2Bx+3D1",
            ret="HDRS",
            received_from_mta="mail.example.org ([192.0.2.1])",
        ),
        final_recipients=("nosuch@example.com", "typo@example.com"),
        original_recipients=("rfc822;nosuch+lists@example.com", "rfc822;Typo@Example.COM"),
        envid="QQ314159+x=1",
    ),
    GoldenCase(
        "ret_full",
        make_request(ret="FULL", envid="full-1"),
        final_recipients=("nosuch@example.com",),
        original_recipients=(None,),
        envid="full-1",
        returned_type="message/rfc822",
    ),
    GoldenCase(
        "non_ascii",
        make_request(
            envelope_sender="jörg@bücher.example",
            recipients=(
                FailedRecipient("用户@example.com", orcpt="utf-8;\\x{7528}\\x{6237}@example.com"),
                FailedRecipient("plain@example.com"),
            ),
            original_headers=(
                "From: Jörg <jörg@bücher.example>\r\n"
                "To: 用户@example.com, plain@example.com\r\n"
                "Subject: Grüße aus Köln\r\n"
                "Message-ID: <gruss.7@bücher.example>\r\n"
            ).encode(),
        ),
        final_recipients=("用户@example.com", "plain@example.com"),
        original_recipients=("utf-8;\\x{7528}\\x{6237}@example.com", None),
        report_type="global-delivery-status",
        returned_type="message/global-headers",
        smtputf8=True,
        body_8bitmime=True,
    ),
]


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda case: case.name)
def test_golden_bytes(case: GoldenCase) -> None:
    dsn = build_dsn(case.request, DEFAULT_TEMPLATE)
    path = GOLDEN / f"{case.name}.eml"
    if REGENERATE:
        path.write_bytes(dsn.data)
    assert dsn.data == path.read_bytes(), f"{path} differs; see the module docstring"


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda case: case.name)
def test_golden_fields(case: GoldenCase) -> None:
    request = case.request
    dsn = build_dsn(request, DEFAULT_TEMPLATE)
    message = assert_well_formed(dsn)

    assert dsn.envelope_sender == ""
    assert dsn.envelope_recipient == unescape(message["To"].addresses[0].addr_spec)
    assert dsn.smtputf8 is case.smtputf8
    assert dsn.body_8bitmime is case.body_8bitmime
    assert dsn.recipients == case.final_recipients

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == case.report_type
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.com"
    assert message["Subject"] == DEFAULT_SUBJECT
    assert message["Date"].datetime == NOW
    assert message["Message-ID"] == dsn.message_id
    assert dsn.message_id.endswith("@mx.example.com>")

    human, status, returned = message.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == f"message/{case.report_type}"
    assert returned.get_content_type() == case.returned_type

    text = human.get_content().replace("\r\n", "\n")
    for address in case.final_recipients:
        assert f"<{address}>: User unknown" in text
    assert "does not exist" in text or "do not exist" in text
    assert request.queue_id in text

    raw = raw_parts(dsn.data)
    per_message, *per_recipient = status_blocks(raw[1])
    assert per_message["reporting-mta"] == "dns; mx.example.com"
    assert per_message["arrival-date"] == email.utils.format_datetime(request.arrival_date)
    assert per_message["x-traqmilter-queue-id"] == request.queue_id
    assert per_message.get("original-envelope-id") == case.envid
    finals = [block["final-recipient"].split("; ", 1)[1] for block in per_recipient]
    assert tuple(finals) == case.final_recipients
    wanted = recipients_needing_dsn(request)
    for block, rcpt, final, original in zip(
        per_recipient, wanted, case.final_recipients, case.original_recipients, strict=True
    ):
        address_type = "rfc822" if final.isascii() else "utf-8"
        assert block["final-recipient"] == f"{address_type}; {final}"
        assert block.get("original-recipient") == original
        assert block["action"] == "failed"
        assert block["status"] == rcpt.status
        assert block["diagnostic-code"] == case.diagnostics.get(
            final, f"smtp; 550 {rcpt.status} <{final}>: Recipient address rejected: User unknown"
        )
        assert block["last-attempt-date"] == email.utils.format_datetime(NOW)

    if case.returned_type in ("message/rfc822", "message/global"):
        assert dsn.returned_content == "message"
        assert raw[2].body == request.original_headers + b"\r\n" + (request.original_body or b"")
        assert "Your message is attached below." in text
    else:
        assert dsn.returned_content == "headers"
        assert raw[2].decoded() == request.original_headers
        assert "The headers of your message are attached below." in text


def test_golden_files_are_all_used() -> None:
    assert {path.stem for path in GOLDEN.glob("*.eml")} == {case.name for case in GOLDEN_CASES}


def test_output_is_deterministic_and_message_ids_differ_by_time() -> None:
    first = build_dsn(make_request(), DEFAULT_TEMPLATE)
    assert build_dsn(make_request(), DEFAULT_TEMPLATE) == first
    later = build_dsn(make_request(now=NOW + timedelta(seconds=1)), DEFAULT_TEMPLATE)
    assert later.message_id != first.message_id


def test_reply_threads_with_the_original_message_id() -> None:
    message = parse(build_dsn(make_request(), DEFAULT_TEMPLATE).data)
    assert message["In-Reply-To"] == "<lunch.1@example.org>"
    assert message["References"] == "<lunch.1@example.org>"
    without = parse(
        build_dsn(make_request(original_headers=b"Subject: x\r\n"), DEFAULT_TEMPLATE).data
    )
    assert without["In-Reply-To"] is None and without["References"] is None


# --------------------------------------------------------------------------- RET


@pytest.mark.parametrize(
    ("label", "changes", "want_type", "want_content"),
    [
        ("hdrs", {"ret": "HDRS"}, "text/rfc822-headers", "headers"),
        ("no ret", {"ret": None}, "text/rfc822-headers", "headers"),
        ("full", {"ret": "full"}, "message/rfc822", "message"),
        (
            "full without body",
            {"ret": "FULL", "original_body": None},
            "text/rfc822-headers",
            "headers",
        ),
        (
            "full over the limit",
            {"ret": "FULL", "max_returned_message_octets": len(ORIGINAL_HEADERS)},
            "text/rfc822-headers",
            "headers",
        ),
        (
            "full with a line over 998 octets",
            {"ret": "FULL", "original_body": b"x" * 999 + b"\r\n"},
            "text/rfc822-headers",
            "headers",
        ),
        (
            "full with NUL",
            {"ret": "FULL", "original_body": b"a\0b\r\n"},
            "text/rfc822-headers",
            "headers",
        ),
    ],
)
def test_returned_content(
    label: str, changes: dict[str, object], want_type: str, want_content: str
) -> None:
    dsn = build_dsn(make_request(**changes), DEFAULT_TEMPLATE)
    message = assert_well_formed(dsn)
    assert list(message.iter_parts())[2].get_content_type() == want_type, label
    assert dsn.returned_content == want_content


def test_ret_full_with_8bit_body_is_sent_8bit() -> None:
    body = "Grüße\nbare LF line ends\n".encode()
    dsn = build_dsn(make_request(ret="FULL", original_body=body), DEFAULT_TEMPLATE)
    message = assert_well_formed(dsn)
    assert dsn.body_8bitmime and not dsn.smtputf8
    assert message["Content-Transfer-Encoding"] == "8bit"
    returned = raw_parts(dsn.data)[2]
    assert returned.headers["content-transfer-encoding"] == "8bit"
    assert returned.body.endswith("Grüße\r\nbare LF line ends\r\n".encode())
    inner = list(message.iter_parts())[2].get_payload(0)
    assert isinstance(inner, EmailMessage)
    assert inner["Subject"] == "Lunch on Friday?"


def test_returned_headers_stop_at_the_body_and_at_the_size_limit() -> None:
    with_body = build_dsn(
        make_request(original_headers=ORIGINAL_HEADERS + b"\r\nbody\r\n"), DEFAULT_TEMPLATE
    )
    assert raw_parts(with_body.data)[2].body == ORIGINAL_HEADERS

    field_line = b"X-Filler: " + b"f" * 80 + b"\r\n"
    huge = ORIGINAL_HEADERS + field_line * (2 * MAX_RETURNED_HEADER_OCTETS // len(field_line))
    dsn = build_dsn(make_request(original_headers=huge, ret="FULL"), DEFAULT_TEMPLATE)
    assert_well_formed(dsn)
    returned = raw_parts(dsn.data)[2].body
    assert len(returned) <= MAX_RETURNED_HEADER_OCTETS
    assert returned.startswith(ORIGINAL_HEADERS) and returned.endswith(field_line)
    assert dsn.returned_content == "headers"  # a cut header section is never sent as "full"


# --------------------------------------------------------------------------- backscatter


@pytest.mark.parametrize(
    ("label", "changes", "want"),
    [
        ("null sender", {"envelope_sender": ""}, NoDsnReason.NULL_SENDER),
        ("null sender in brackets", {"envelope_sender": "<>"}, NoDsnReason.NULL_SENDER),
        (
            "mailer-daemon",
            {"envelope_sender": "Mailer-Daemon@example.net"},
            NoDsnReason.MAILER_DAEMON_SENDER,
        ),
        (
            "sender with CRLF",
            {"envelope_sender": "a@b.example\r\nBcc: x@y"},
            NoDsnReason.INVALID_SENDER,
        ),
        ("sender without domain", {"envelope_sender": "alice"}, NoDsnReason.INVALID_SENDER),
        (
            "sender with an escaped octet",
            {"envelope_sender": "j\udcf6rg@example.org"},
            NoDsnReason.INVALID_SENDER,
        ),
        (
            "sender quoted MAILER-DAEMON",
            {"envelope_sender": '"MAILER-DAEMON"@example.net'},
            NoDsnReason.MAILER_DAEMON_SENDER,
        ),
        (
            "original is a DSN",
            {
                "original_headers": b"From: MAILER-DAEMON@mx.example.net\r\n"
                b"Content-Type: multipart/report;\r\n report-type=delivery-status;\r\n"
                b' boundary="x"\r\n'
            },
            NoDsnReason.ORIGINAL_IS_REPORT,
        ),
        (
            "original is a global DSN",
            {
                "original_headers": b"Content-Type: Multipart/Report;"
                b" report-type=global-delivery-status\r\n"
            },
            NoDsnReason.ORIGINAL_IS_REPORT,
        ),
        (
            "auto-replied",
            {"original_headers": b"Auto-Submitted: auto-replied\r\n"},
            NoDsnReason.AUTO_SUBMITTED,
        ),
        (
            "auto-generated with comment",
            {"original_headers": b"auto-submitted: auto-generated (vacation)\r\n"},
            NoDsnReason.AUTO_SUBMITTED,
        ),
        (
            "NOTIFY=NEVER",
            {"recipients": (FailedRecipient("a@example.com", notify=frozenset({"NEVER"})),)},
            NoDsnReason.NOTIFY,
        ),
        (
            "NOTIFY=SUCCESS,DELAY",
            {
                "recipients": (
                    FailedRecipient("a@example.com", notify=frozenset({"SUCCESS", "DELAY"})),
                )
            },
            NoDsnReason.NOTIFY,
        ),
        ("no recipients", {"recipients": ()}, NoDsnReason.NOTIFY),
        ("ordinary message", {}, None),
        ("Auto-Submitted: no", {"original_headers": b"Auto-Submitted: no\r\n"}, None),
        (
            "multipart/mixed",
            {"original_headers": b"Content-Type: multipart/mixed; boundary=x\r\n"},
            None,
        ),
        (
            "NOTIFY=failure in lower case",
            {"recipients": (FailedRecipient("a@example.com", notify=frozenset({"failure"})),)},
            None,
        ),
    ],
)
def test_when_a_dsn_is_due(
    label: str, changes: dict[str, object], want: NoDsnReason | None
) -> None:
    request = make_request(**changes)
    assert no_dsn_reason(request) == want, label
    if want is None:
        assert_well_formed(build_dsn(request, DEFAULT_TEMPLATE))
    else:
        with pytest.raises(DsnError, match="no DSN is due"):
            build_dsn(request, DEFAULT_TEMPLATE)


def test_recipients_needing_dsn_honour_notify() -> None:
    recipients = (
        FailedRecipient("default@example.com"),
        FailedRecipient("failure@example.com", notify=frozenset({"FAILURE"})),
        FailedRecipient("never@example.com", notify=frozenset({"NEVER"})),
        FailedRecipient("success@example.com", notify=frozenset({"SUCCESS"})),
        FailedRecipient("all@example.com", notify=frozenset({"SUCCESS", "FAILURE", "DELAY"})),
    )
    wanted = recipients_needing_dsn(make_request(recipients=recipients))
    assert [r.final_recipient for r in wanted] == [
        "default@example.com",
        "failure@example.com",
        "all@example.com",
    ]


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("label", "subject_field", "want_subject"),
    [
        ("encoded CRLF", b"=?utf-8?q?hi=0D=0ABcc:_evil@example.net?=", "hi Bcc: evil@example.net"),
        ("template syntax", b"{{7*7}} {% raw %} %s %(x)s", "{{7*7}} {% raw %} %s %(x)s"),
        ("bare CR ends the field", b"a\rBcc: evil@example.net", "a"),
        ("NUL and DEL", b"a\x00b\x7fc", "a b c"),
        ("invalid UTF-8", b"caf\xe9 \xff\xfe", "caf\ufffd \ufffd\ufffd"),
        ("line separators", "a\u2028b\u2029c\x85d".encode(), "a b c d"),
        ("bidi override", "invoice\u202egnp.exe".encode(), "invoice gnp.exe"),
        (
            "double-encoded word",
            b"=?utf-8?q?=3D=3Futf-8=3Fq=3F=3D0D=3D0ABcc:=5Fx=3F=3D?=",
            "=?utf-8?q?=0D=0ABcc:_x?=",
        ),
        ("unknown charset", b"=?x-nonsense?q?abc?= ok", "=?x-nonsense?q?abc?= ok"),
        ("escape codec", b"=?unicode_escape?q?\\x0a?=", "=?unicode_escape?q?\\x0a?="),
        ("broken base64", b"=?utf-8?b?!!!?=", "=?utf-8?b?!!!?="),
        ("folded", b"one\r\n two\r\n\tthree", "one two three"),
    ],
)
def test_hostile_subject_is_only_data(label: str, subject_field: bytes, want_subject: str) -> None:
    headers = b"From: a@example.org\r\nSubject: " + subject_field + b"\r\nX-After: 1\r\n"
    dsn = build_dsn(make_request(original_headers=headers), SUBJECT_TEMPLATE)
    message = assert_well_formed(dsn)
    assert message["Subject"] == f"Undeliverable: {want_subject}", label
    assert message["Bcc"] is None


def test_ten_kilobyte_subject_is_cut_and_returned_headers_stay_within_998() -> None:
    headers = b"Subject: " + b"A" * 10240 + b"\r\nFrom: a@example.org\r\n"
    dsn = build_dsn(make_request(original_headers=headers), SUBJECT_TEMPLATE)
    message = assert_well_formed(dsn)
    subject = message["Subject"]
    assert subject.startswith("Undeliverable: AAAA") and subject.endswith("...")
    assert len(subject) <= MAX_SUBJECT_CHARS
    returned = raw_parts(dsn.data)[2]
    assert returned.headers["content-transfer-encoding"] == "quoted-printable"
    assert returned.decoded() == headers


def test_invalid_utf8_headers_are_returned_intact_and_7bit() -> None:
    headers = b"Subject: caf\xe9\r\nX-Junk: \x00\x1b[31m\xff\r\n"
    dsn = build_dsn(make_request(original_headers=headers), DEFAULT_TEMPLATE)
    assert_well_formed(dsn)
    assert dsn.data.isascii() and not dsn.body_8bitmime
    assert raw_parts(dsn.data)[2].decoded() == headers


@pytest.mark.parametrize(
    ("label", "headers", "want_returned"),
    [
        ("empty", b"", b""),
        ("body only", b"\r\n\r\nbody\r\n", b""),
        ("junk line", b"no colon here\r\n", b"no colon here\r\n"),
        ("no final line end", b"Subject: x", b"Subject: x\r\n"),
        ("LF line ends", b"Subject: x\n\tfolded\n\nbody\n", b"Subject: x\r\n\tfolded\r\n"),
    ],
)
def test_odd_header_blocks_are_returned_safely(
    label: str, headers: bytes, want_returned: bytes
) -> None:
    dsn = build_dsn(make_request(original_headers=headers), DEFAULT_TEMPLATE)
    assert_well_formed(dsn)
    assert raw_parts(dsn.data)[2].body == want_returned, label


@pytest.mark.parametrize(
    ("label", "changes", "absent_field"),
    [
        ("ENVID with CRLF", {"envid": "abc+0D+0ABcc:+20evil@example.net"}, "original-envelope-id"),
        ("ENVID with NUL", {"envid": "abc+00"}, "original-envelope-id"),
        ("ENVID not xtext", {"envid": "abc def"}, "original-envelope-id"),
        ("ENVID bad hex", {"envid": "abc+ZZ"}, "original-envelope-id"),
        ("ENVID 8-bit", {"envid": "caf+E9"}, "original-envelope-id"),
        ("ENVID too long", {"envid": "e" * 101}, "original-envelope-id"),
        (
            "client with CRLF",
            {"received_from_mta": "x\r\nBcc: evil@example.net"},
            "received-from-mta",
        ),
        ("client non-ASCII", {"received_from_mta": "mäil.example"}, "received-from-mta"),
    ],
)
def test_unsafe_per_message_values_are_left_out(
    label: str, changes: dict[str, object], absent_field: str
) -> None:
    dsn = build_dsn(make_request(**changes), DEFAULT_TEMPLATE)
    assert_well_formed(dsn)
    per_message = status_blocks(raw_parts(dsn.data)[1])[0]
    assert absent_field not in per_message, label
    assert b"evil" not in dsn.data


@pytest.mark.parametrize(
    ("label", "orcpt"),
    [
        ("CRLF", "rfc822;a+0D+0ABcc:+20evil@example.net"),
        ("NUL", "rfc822;a+00@example.net"),
        ("no type", "a@example.net"),
        ("bad type", "rfc 822;a@example.net"),
        ("empty address", "rfc822;"),
        ("non-ASCII in rfc822", "rfc822;j+C3+B6rg@example.net"),
        ("not xtext", "rfc822;a b@example.net"),
        ("too long", "rfc822;" + "a" * 500),
    ],
)
def test_unsafe_orcpt_is_left_out(label: str, orcpt: str) -> None:
    request = make_request(recipients=(FailedRecipient("nosuch@example.com", orcpt=orcpt),))
    dsn = build_dsn(request, DEFAULT_TEMPLATE)
    assert_well_formed(dsn)
    assert "original-recipient" not in status_blocks(raw_parts(dsn.data)[1])[1], label


def test_utf8_orcpt_becomes_7bit_in_an_ascii_dsn() -> None:
    orcpt = "utf-8;+E7+94+A8@example.com"  # raw UTF-8 bytes, xtext-encoded
    dsn = build_dsn(
        make_request(recipients=(FailedRecipient("a@example.com", orcpt=orcpt),)), DEFAULT_TEMPLATE
    )
    assert_well_formed(dsn)
    block = status_blocks(raw_parts(dsn.data)[1])[1]
    assert block["original-recipient"] == "utf-8;\\x{7528}@example.com"
    assert dsn.data.isascii()


def test_hostile_queue_id_diagnostic_and_template_syntax_in_addresses() -> None:
    request = make_request(
        queue_id="ABC\r\nBcc: evil@example.net",
        recipients=(
            FailedRecipient(
                "{{7*7}}@example.com", diagnostic="550 5.1.1 gone\r\nBcc: evil@example.net\x00"
            ),
        ),
    )
    dsn = build_dsn(request, DEFAULT_TEMPLATE)
    message = assert_well_formed(dsn)
    per_message, per_recipient = status_blocks(raw_parts(dsn.data)[1])
    assert per_message["x-traqmilter-queue-id"] == "ABC__Bcc__evil_example_net"
    assert per_recipient["final-recipient"] == "rfc822; {{7*7}}@example.com"
    assert per_recipient["diagnostic-code"] == "smtp; 550 5.1.1 gone??Bcc: evil@example.net?"
    text = human_text(message)
    assert "<{{7*7}}@example.com>: User unknown" in text and "49" not in text


@pytest.mark.parametrize(
    ("label", "changes", "message"),
    [
        (
            "recipient with CRLF",
            {"recipients": (FailedRecipient("a\r\nb@example.com"),)},
            "recipient",
        ),
        (
            "recipient with an escaped octet",
            {"recipients": (FailedRecipient("j\udcf6rg@example.com"),)},
            "recipient",
        ),
        (
            "temporary status",
            {"recipients": (FailedRecipient("a@example.com", status="4.1.1"),)},
            "status",
        ),
        ("naive arrival date", {"arrival_date": datetime(2025, 1, 1)}, "arrival_date"),
        ("naive now", {"now": datetime(2025, 1, 1)}, "now"),
        ("bad reporting MTA", {"reporting_mta": "mx example\r\n"}, "reporting_mta"),
        ("bad message-id domain", {"message_id_domain": "a..b"}, "message_id_domain"),
        ("bad postmaster", {"postmaster": "MAILER-DAEMON"}, "postmaster"),
    ],
)
def test_unusable_facts_raise_dsn_error(
    label: str, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(DsnError, match=message):
        build_dsn(make_request(**changes), DEFAULT_TEMPLATE)


_specials = st.sampled_from("\r\n\0\t:{}%\u2028\udcff")
_network_text = st.text(st.characters() | _specials, max_size=300)


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(
    subject=_network_text,
    envid=_network_text,
    orcpt=_network_text,
    queue_id=_network_text,
    client=_network_text,
    diagnostic=_network_text,
)
def test_any_network_text_gives_a_well_formed_dsn(
    subject: str, envid: str, orcpt: str, queue_id: str, client: str, diagnostic: str
) -> None:
    request = make_request(
        original_headers=b"Subject: "
        + subject.encode("utf-8", "surrogatepass")
        + b"\r\nFrom: a@example.org\r\n",
        envid=envid,
        queue_id=queue_id,
        received_from_mta=client,
        recipients=(FailedRecipient("nosuch@example.com", orcpt=orcpt, diagnostic=diagnostic),),
    )
    assert_well_formed(build_dsn(request, SUBJECT_TEMPLATE))


# --------------------------------------------------------------------------- xtext


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", b""),
        ("abc", b"abc"),
        ("a+2Bb", b"a+b"),
        ("+3D", b"="),
        ("+2b", b"+"),
        ("a+0D+0A", b"a\r\n"),
        ("+C3+A9", b"\xc3\xa9"),
        ("{{7*7}}", b"{{7*7}}"),
    ],
)
def test_decode_xtext(text: str, want: bytes) -> None:
    assert decode_xtext(text) == want


@pytest.mark.parametrize("text", ["a b", "a=b", "a+", "a+2", "a+GG", "é", "a\r\n"])
def test_decode_xtext_refuses_what_is_not_xtext(text: str) -> None:
    with pytest.raises(DsnError, match="not xtext"):
        decode_xtext(text)


# --------------------------------------------------------------------------- templates


def test_shipped_template_is_valid() -> None:
    validate_template(DEFAULT_TEMPLATE)


@pytest.mark.parametrize(
    ("label", "source", "message"),
    [
        ("syntax error", "Hello\n{% if sender %}\nno end", "line 3"),
        ("unclosed variable", "{{ sender ", "line 1"),
        ("unknown variable", "Hi\n{{ nosuch }}", r"line 2: unknown variable 'nosuch'"),
        ("python internals", "{{ sender.__class__.__mro__ }}", "private attribute '__mro__'"),
        ("subscript internals", "{{ sender['__class__'] }}", "private attribute '__class__'"),
        ("attr filter", "{{ sender|attr('__class__') }}", "unsafe"),
        ("method internals", "{{ recipients.__len__() }}", "private attribute '__len__'"),
        ("template reference", "{{ self._TemplateReference__context }}", "private attribute"),
        ("function globals", "{{ sender.upper.__globals__ }}", "private attribute"),
        ("include", "{% include 'other.j2' %}", "not available"),
        ("extends", "{% extends 'base.j2' %}", "not available"),
        ("import", "{% import 'macros.j2' as m %}", "not available"),
        (
            "range is not offered",
            "{% for i in range(3) %}x{% endfor %}",
            "unknown variable 'range'",
        ),
        ("lipsum is not offered", "{{ lipsum() }}", "unknown variable 'lipsum'"),
        ("cycler is not offered", "{{ cycler.__init__ }}", "private attribute"),
        ("unknown filter", "{{ sender|nosuchfilter }}", "nosuchfilter"),
        ("undefined attribute", "{{ sender.nosuch }}", "UndefinedError"),
        ("mutation", "{{ recipients.append('x') }}", "unsafe|UndefinedError"),
        ("division by zero", "x\n{{ 1 / 0 }}", "line 2: ZeroDivisionError"),
        ("empty text", "{% if false %}x{% endif %}\n\n", "empty text"),
        ("only a subject", "Subject: hi\n", "empty text"),
        (
            "too much output",
            "{% for r in recipients %}{{ 'x' * 70000 }}{% endfor %}",
            f"more than {MAX_RENDERED_OCTETS} octets",
        ),
        ("too long a source", "x" * 70000, "longer than"),
    ],
)
def test_bad_templates_are_refused(label: str, source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        validate_template(source)
    with pytest.raises(TemplateError):
        build_dsn(make_request(), source)


def test_render_failure_at_runtime_is_a_typed_error() -> None:
    source = "Second recipient: {{ recipients[1] }}\n"
    validate_template(source)  # the sample facts have two recipients
    with pytest.raises(TemplateError, match="line 1"):
        build_dsn(make_request(), source)


def test_template_subject_line_sets_the_subject() -> None:
    dsn = build_dsn(
        make_request(original_headers="Subject: Grüße\r\n".encode()),
        "Subject: Nicht zustellbar: {{ original_subject }}\n\nDie Adresse gibt es nicht.\n",
    )
    message = assert_well_formed(dsn)
    assert message["Subject"] == "Nicht zustellbar: Grüße"
    assert human_text(message) == "Die Adresse gibt es nicht.\n"


@pytest.mark.parametrize(
    ("source", "want_text"),
    [
        ("No subject line here.\n", "No subject line here.\n"),
        ("Subject:   \n\nEmpty subject line.\n", "Empty subject line.\n"),
    ],
)
def test_without_a_subject_line_the_default_subject_is_used(source: str, want_text: str) -> None:
    message = assert_well_formed(build_dsn(make_request(), source))
    assert message["Subject"] == DEFAULT_SUBJECT
    assert human_text(message) == want_text


def test_all_variables_reach_the_template() -> None:
    source = (
        "{{ recipients|join(',') }}|{{ sender }}|{{ original_subject }}|{{ arrival_date }}|"
        "{{ reporting_mta }}|{{ queue_id }}|{{ postmaster }}|{{ full_message_returned }}\n"
    )
    dsn = build_dsn(make_request(), source)
    text = human_text(assert_well_formed(dsn))
    assert text == (
        "nosuch@example.com|alice@example.org|Lunch on Friday?|Mon, 24 Nov 2025 16:54:00 +0000|"
        "mx.example.com|4ZxQ1s2Lz9|MAILER-DAEMON@mx.example.com|False\n"
    )


def test_long_template_lines_are_sent_quoted_printable() -> None:
    source = "{{ 'word ' * 300 }}\n"
    dsn = build_dsn(make_request(), source)
    assert_well_formed(dsn)
    human = raw_parts(dsn.data)[0]
    assert human.headers["content-transfer-encoding"] == "quoted-printable"
    assert human.decoded() == ("word " * 300).rstrip().encode() + b"\r\n"


def test_boundary_never_collides_with_content() -> None:
    digest = "0" * 64
    plain = _boundary(digest, [_Part((), b"text\r\n")])
    colliding = _boundary(digest, [_Part((), f"--{plain}\r\n--{plain}_1\r\n".encode())])
    assert colliding == f"{plain}_2"
