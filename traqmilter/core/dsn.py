"""Delivery status notifications for the `bounce` action (SPEC 4.2; RFC 3461, 3464, 6522, 6533).

Pure: the caller passes the template source (read from disk by an adapter), the clock
readings and the facts of one message; build_dsn() returns the complete DSN as bytes with
CRLF line ends, ready to hand to the MTA with a null envelope sender. Output is a function
of the input only (no randomness), so golden files stay stable.

The DSN is a multipart/report (RFC 6522) of three parts:
1. text/plain, the human part, rendered from the administrator's Jinja2 template;
2. message/delivery-status (RFC 3464), built here by code, never by the template;
3. the original header section as text/rfc822-headers, or with RET=FULL the whole original
   as message/rfc822 when it fits max_returned_message_octets (else headers, as Postfix).
When any address in the DSN is non-ASCII the RFC 6533 types are used instead
(message/global-delivery-status, message/global-headers, message/global) and the result is
flagged smtputf8 / body_8bitmime for submission.

SECURITY: every value that came from the network (addresses, ENVID, ORCPT, the original
Subject and Message-ID, queue id, client name, diagnostic text) is validated or cleaned
before it reaches a header or a delivery-status field: CR, LF, NUL and other controls never
get through, and over-long values are cut. The human part is rendered by core.template
(Jinja2's immutable sandbox; values are passed as data, never evaluated). Template problems
raise template.TemplateError and bad facts raise DsnError; both are typed so the milter can
tempfail (451 4.3.0).

BUGS: domain names in addresses are shown as A-labels (xn--...), as
address.parse_address() returns them.
"""

from __future__ import annotations

import binascii
import codecs
import enum
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime
from email.header import Header
from email.utils import format_datetime

from traqmilter.core import replies
from traqmilter.core.address import AddressError, normalise_domain, parse_address
from traqmilter.core.settings import DEFAULT_REJECT_TEXT
from traqmilter.core.template import UNSAFE_CATEGORIES, compile_template, render_text

DEFAULT_SUBJECT = "Undelivered Mail Returned to Sender"
MAIL_SYSTEM_NAME = "Mail Delivery System"

MAX_SUBJECT_CHARS = 200  # the DSN's Subject and the original_subject variable
MAX_RETURNED_HEADER_OCTETS = 102_400  # as Postfix's header_size_limit
DEFAULT_MAX_RETURNED_MESSAGE_OCTETS = 50_000  # as Postfix's bounce_size_limit
MAX_ENVID_CHARS = 100  # RFC 3461 section 4.4
MAX_ORCPT_CHARS = 500  # RFC 3461 section 4.2
MAX_DIAGNOSTIC_CHARS = 500
MAX_MTA_NAME_CHARS = 255
MAX_QUEUE_ID_CHARS = 64
MAX_LINE_OCTETS = 998  # RFC 5322 section 2.1.1


class DsnError(ValueError):
    """The facts do not allow a DSN to be built; str() says why without echoing input."""


class NoDsnReason(enum.StrEnum):
    """Why a message gets no DSN (for the event log)."""

    NULL_SENDER = "null sender"
    MAILER_DAEMON_SENDER = "sender is MAILER-DAEMON"
    INVALID_SENDER = "invalid sender address"
    ORIGINAL_IS_REPORT = "original is a delivery or other report"
    AUTO_SUBMITTED = "original is Auto-Submitted"
    NOTIFY = "NOTIFY excludes FAILURE for every recipient"


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the DSN reports as failed.

    final_recipient: the envelope recipient (RCPT TO) as the MTA handed it over.
    orcpt: the RCPT TO ORCPT= parameter value exactly as received (xtext, RFC 3461
        section 4.2), e.g. "rfc822;user+2Bext@example.com"; decoded and checked here.
    status: the RFC 3463 enhanced status code, a permanent 5.x.x.
    diagnostic: the SMTP reply ("550 5.1.1 <a@b>: ..."); None gives the standard text.
    notify: the RCPT TO NOTIFY= values (RFC 3461 section 4.1); empty when none was given.
    """

    final_recipient: str
    orcpt: str | None = None
    status: str = "5.1.1"
    diagnostic: str | None = None
    notify: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """The facts of one message whose failed recipients get one DSN.

    envelope_sender: the original MAIL FROM, where the DSN goes ("" is the null sender).
    original_headers: the original header section as received (bytes; anything after the
        first empty line is ignored).
    original_body: the original body, used only with RET=FULL.
    ret, envid: the MAIL FROM RET= and ENVID= values as received (ENVID still xtext).
    arrival_date, now: aware datetimes (arrival of the original; Date of the DSN).
    reporting_mta: our host name (Reporting-MTA, and the Message-ID domain by default).
    received_from_mta: the client, e.g. "mail.example.org ([192.0.2.1])"; optional.
    postmaster: the DSN's From address, e.g. MAILER-DAEMON@mx.example.com.
    queue_id: the MTA's queue id of the original.
    max_returned_message_octets: RET=FULL returns the whole original only up to this size.
    """

    envelope_sender: str
    recipients: tuple[FailedRecipient, ...]
    original_headers: bytes
    arrival_date: datetime
    now: datetime
    reporting_mta: str
    postmaster: str
    queue_id: str
    original_body: bytes | None = None
    ret: str | None = None
    envid: str | None = None
    received_from_mta: str | None = None
    message_id_domain: str = ""
    max_returned_message_octets: int = DEFAULT_MAX_RETURNED_MESSAGE_OCTETS


@dataclass(frozen=True, slots=True)
class DsnMessage:
    """A DSN ready for submission: MAIL FROM:<> RCPT TO:<envelope_recipient>.

    smtputf8: submit with SMTPUTF8 (a header holds a non-ASCII address).
    body_8bitmime: submit with BODY=8BITMIME (a part uses 8bit transfer encoding).
    returned_content: "message" (RET=FULL honoured) or "headers".
    """

    envelope_recipient: str
    data: bytes
    message_id: str
    recipients: tuple[str, ...]
    smtputf8: bool
    body_8bitmime: bool
    returned_content: str

    @property
    def envelope_sender(self) -> str:
        return ""  # a DSN always has the null reverse-path (RFC 3464 section 2; RFC 5321 4.5.5)


# --------------------------------------------------------------------------- decisions


def recipients_needing_dsn(request: DsnRequest) -> tuple[FailedRecipient, ...]:
    """The failed recipients whose NOTIFY asks for a failure report (absent NOTIFY does)."""
    return tuple(rcpt for rcpt in request.recipients if wants_failure_report(rcpt.notify))


def no_dsn_reason(request: DsnRequest) -> NoDsnReason | None:
    """Why this message must get no DSN, or None when one is due."""
    sender = request.envelope_sender.strip()
    if sender in ("", "<>"):
        return NoDsnReason.NULL_SENDER
    try:
        address = _mailbox(sender, "envelope sender")
    except DsnError:
        return NoDsnReason.INVALID_SENDER
    if address.rpartition("@")[0].lower() == "mailer-daemon":
        return NoDsnReason.MAILER_DAEMON_SENDER
    facts = _OriginalFacts.from_headers(
        _header_fields(_header_section(request.original_headers)[0])
    )
    if facts.is_report:
        return NoDsnReason.ORIGINAL_IS_REPORT
    if facts.auto_submitted:
        return NoDsnReason.AUTO_SUBMITTED
    if not recipients_needing_dsn(request):
        return NoDsnReason.NOTIFY
    return None


def wants_failure_report(notify: Iterable[str]) -> bool:
    """Whether a recipient's NOTIFY values (RFC 3461) ask for a report of its failure."""
    values = {value.strip().upper() for value in notify}
    if not values:
        return True  # RFC 3461 section 4.1: no NOTIFY means FAILURE (and maybe DELAY)
    return "NEVER" not in values and "FAILURE" in values


# --------------------------------------------------------------------------- the builder


def build_dsn(request: DsnRequest, template_source: str) -> DsnMessage:
    """Build the one DSN for this message's failed recipients (SPEC 4.2).

    Raises DsnError when no DSN may be sent (see no_dsn_reason) or a fact is unusable,
    TemplateError when the template fails; both mean: tempfail the message.
    """
    reason = no_dsn_reason(request)
    if reason is not None:
        raise DsnError(f"no DSN is due: {reason}")
    template = compile_template(template_source)
    failed = recipients_needing_dsn(request)

    sender = _mailbox(request.envelope_sender, "envelope sender")
    postmaster = _mailbox(request.postmaster, "postmaster")
    finals = tuple(_mailbox(r.final_recipient, "recipient", allow_bare=True) for r in failed)
    reporting_mta = _host_name(request.reporting_mta, "reporting_mta")
    message_id_domain = _host_name(request.message_id_domain or reporting_mta, "message_id_domain")
    arrival_date = _rfc5322_date(request.arrival_date, "arrival_date")
    now = _rfc5322_date(request.now, "now")
    queue_id = _queue_id(request.queue_id)
    global_types = not all(a.isascii() for a in (sender, postmaster, *finals))

    section, section_cut = _header_section(request.original_headers)
    facts = _OriginalFacts.from_headers(_header_fields(section))
    returned = _returned_part(request, section, section_cut, global_types)

    variables: dict[str, object] = {
        "recipients": finals,
        "sender": sender,
        "original_subject": facts.subject,
        "arrival_date": arrival_date,
        "reporting_mta": reporting_mta,
        "queue_id": queue_id,
        "postmaster": postmaster,
        "full_message_returned": returned.is_full_message,
    }
    subject, human_text = render_text(template, variables)
    subject = _clean_text(subject, MAX_SUBJECT_CHARS) or DEFAULT_SUBJECT

    status_fields = _DeliveryStatus(
        reporting_mta=reporting_mta,
        envid=_decode_envid(request.envid),
        received_from_mta=_mta_name(request.received_from_mta),
        arrival_date=arrival_date,
        last_attempt_date=now,
        queue_id=queue_id,
        global_types=global_types,
    )
    parts = (
        _human_part(human_text),
        status_fields.part(zip(failed, finals, strict=True)),
        returned.part,
    )

    digest = hashlib.sha256(
        b"\0".join(
            [
                sender.encode(),
                *(f.encode() for f in finals),
                now.encode(),
                queue_id.encode(),
                section,
            ]
        )
    ).hexdigest()
    message_id = f"<{request.now:%Y%m%d%H%M%S}.{queue_id}.{digest[:16]}@{message_id_domain}>"
    boundary = _boundary(digest, parts)
    eight_bit = any(part.eight_bit for part in parts)

    header_lines = [
        f"From: {MAIL_SYSTEM_NAME} <{postmaster}>",
        f"To: <{sender}>",
        *_subject_lines(subject),
        f"Date: {now}",
        f"Message-ID: {message_id}",
    ]
    if facts.message_id:
        header_lines += [f"In-Reply-To: {facts.message_id}", f"References: {facts.message_id}"]
    report_type = "global-delivery-status" if global_types else "delivery-status"
    header_lines += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type};",
        f'\tboundary="{boundary}"',
    ]
    if eight_bit:
        header_lines.append("Content-Transfer-Encoding: 8bit")

    data = _assemble(header_lines, boundary, parts)
    return DsnMessage(
        envelope_recipient=sender,
        data=data,
        message_id=message_id,
        recipients=finals,
        smtputf8=not all(a.isascii() for a in (sender, postmaster)),
        body_8bitmime=eight_bit,
        returned_content="message" if returned.is_full_message else "headers",
    )


@dataclass(frozen=True, slots=True)
class _Part:
    headers: tuple[str, ...]
    body: bytes  # CRLF line ends, ends with CRLF (or empty)
    eight_bit: bool = False


def _assemble(header_lines: list[str], boundary: str, parts: Iterable[_Part]) -> bytes:
    out = [_crlf_lines(header_lines), b"\r\n", b"This is a MIME-encapsulated message.\r\n"]
    delimiter = f"\r\n--{boundary}".encode("ascii")
    for part in parts:
        out += [delimiter, b"\r\n", _crlf_lines(part.headers), b"\r\n", part.body]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def _crlf_lines(lines: Iterable[str]) -> bytes:
    return b"".join(line.encode("utf-8") + b"\r\n" for line in lines)


def _boundary(digest: str, parts: Iterable[_Part]) -> str:
    """A boundary derived from the content ("=_" never occurs in quoted-printable) and
    checked against every part, so it is deterministic and cannot collide."""
    bodies = [part.body for part in parts]
    base = f"=_traqmilter_{digest[16:40]}"
    candidate, attempt = base, 0
    while any(f"--{candidate}".encode("ascii") in body for body in bodies):
        attempt += 1
        candidate = f"{base}_{attempt}"
    return candidate


def _subject_lines(subject: str) -> list[str]:
    # Non-ASCII, and text that a reader would decode as an encoded word, goes out encoded,
    # so a literal "=?...?=" from the network is shown literally.
    charset = "us-ascii" if subject.isascii() and "=?" not in subject else "utf-8"
    encoded = Header(subject, charset, header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}".split("\r\n")


def _human_part(text: str) -> _Part:
    lines = [line.rstrip() for line in _CONTROLS_BUT_TAB.sub("", text).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    body = "".join(f"{line}\r\n" for line in lines).encode("utf-8", "replace")
    if body.isascii() and _lines_fit(body):
        return _Part(
            ("Content-Description: Notification", "Content-Type: text/plain; charset=us-ascii"),
            body,
        )
    return _Part(
        (
            "Content-Description: Notification",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
        ),
        _quoted_printable(body),
    )


@dataclass(frozen=True, slots=True)
class _DeliveryStatus:
    reporting_mta: str
    envid: str | None
    received_from_mta: str | None
    arrival_date: str
    last_attempt_date: str
    queue_id: str
    global_types: bool

    def part(self, recipients: Iterable[tuple[FailedRecipient, str]]) -> _Part:
        # Field order follows the ABNF of RFC 3464 sections 2.2 and 2.3.
        fields = []
        if self.envid:
            fields.append(f"Original-Envelope-Id: {self.envid}")
        fields.append(f"Reporting-MTA: dns; {self.reporting_mta}")
        if self.received_from_mta:
            fields.append(f"Received-From-MTA: dns; {self.received_from_mta}")
        fields.append(f"Arrival-Date: {self.arrival_date}")
        fields.append(f"X-Traqmilter-Queue-ID: {self.queue_id}")
        blocks = [fields]
        for rcpt, final in recipients:
            blocks.append(self._recipient_fields(rcpt, final))
        text = "\r\n".join("".join(f"{line}\r\n" for line in block) for block in blocks)
        subtype = "global-delivery-status" if self.global_types else "delivery-status"
        headers = ["Content-Description: Delivery report", f"Content-Type: message/{subtype}"]
        eight_bit = not text.isascii()  # only possible with the global type
        if eight_bit:
            headers.append("Content-Transfer-Encoding: 8bit")  # RFC 6533 section 6.2
        return _Part(tuple(headers), text.encode("utf-8"), eight_bit)

    def _recipient_fields(self, rcpt: FailedRecipient, final: str) -> list[str]:
        if not _STATUS.fullmatch(rcpt.status):
            raise DsnError("status must be a permanent enhanced status code (5.x.x)")
        fields = []
        original = _decode_orcpt(rcpt.orcpt, self.global_types)
        if original:
            fields.append(f"Original-Recipient: {original}")
        address_type = "rfc822" if final.isascii() else "utf-8"  # RFC 6533 section 3
        fields.append(f"Final-Recipient: {address_type}; {final}")
        fields.append("Action: failed")
        fields.append(f"Status: {rcpt.status}")
        diagnostic = rcpt.diagnostic
        if diagnostic is None:
            reply = replies.user_unknown(final, DEFAULT_REJECT_TEXT)
            diagnostic = f"550 {rcpt.status} {reply.rcpt_text(final)}"
        fields.append(f"Diagnostic-Code: smtp; {self._printable(diagnostic, MAX_DIAGNOSTIC_CHARS)}")
        fields.append(f"Last-Attempt-Date: {self.last_attempt_date}")
        return fields

    def _printable(self, text: str, limit: int) -> str:
        """One line; non-ASCII kept only in a global DSN."""
        cleaned = "".join(
            "?"
            if unicodedata.category(ch) in UNSAFE_CATEGORIES
            or not (ch.isascii() or self.global_types)
            else ch
            for ch in text[: limit * 2]
        )
        return " ".join(cleaned.split())[:limit]


_STATUS = re.compile(r"5\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class _Returned:
    part: _Part
    is_full_message: bool


def _returned_part(
    request: DsnRequest, section: bytes, section_cut: bool, global_types: bool
) -> _Returned:
    """Part 3: the whole original with RET=FULL when it fits unaltered, else its headers."""
    wants_full = (request.ret or "").strip().upper() == "FULL"
    body = request.original_body
    if wants_full and body is not None and not section_cut:
        limit = request.max_returned_message_octets
        if len(section) + 2 + len(body) <= limit:
            message = section + b"\r\n" + _crlf(body)
            if b"\0" not in message and _lines_fit(message):
                media_type = "message/global" if global_types else "message/rfc822"
                headers = [
                    "Content-Description: Undelivered Message",
                    f"Content-Type: {media_type}",
                ]
                eight_bit = not message.isascii()
                if eight_bit:
                    headers.append("Content-Transfer-Encoding: 8bit")
                return _Returned(_Part(tuple(headers), message, eight_bit), True)

    headers = ["Content-Description: Undelivered Message Headers"]
    if global_types:
        headers.append("Content-Type: message/global-headers")
    else:
        headers.append("Content-Type: text/rfc822-headers")
    if _is_clean_text(section, allow_utf8=False):
        return _Returned(_Part(tuple(headers), section), False)
    if global_types and _is_clean_text(section, allow_utf8=True):
        headers.append("Content-Transfer-Encoding: 8bit")
        return _Returned(_Part(tuple(headers), section, eight_bit=True), False)
    # Legacy 8-bit bytes, controls or over-long lines: quoted-printable keeps them intact
    # and the DSN 7-bit clean (RFC 6533 section 6.3 allows it for message/global-headers).
    headers.append("Content-Transfer-Encoding: quoted-printable")
    return _Returned(_Part(tuple(headers), _quoted_printable(section)), False)


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 quoted-printable with CRLF line ends, input already CRLF-normalised."""
    return binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)


def _is_clean_text(data: bytes, *, allow_utf8: bool) -> bool:
    if not _lines_fit(data) or _CONTROL_OCTETS.search(data):
        return False
    if data.isascii():
        return True
    if not allow_utf8:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _lines_fit(data: bytes) -> bool:
    return all(len(line) <= MAX_LINE_OCTETS for line in data.split(b"\r\n"))


_CONTROL_OCTETS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


# --------------------------------------------------------------------------- the original


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _header_section(raw: bytes) -> tuple[bytes, bool]:
    """The original header section with CRLF line ends, cut at the first empty line and,
    on a field boundary, at MAX_RETURNED_HEADER_OCTETS; and whether it was cut short."""
    head = raw[: MAX_RETURNED_HEADER_OCTETS * 2]
    text = _crlf(head)
    if text.startswith(b"\r\n"):
        return b"", False
    end = text.find(b"\r\n\r\n")
    complete = end >= 0 or len(head) == len(raw)
    if end >= 0:
        text = text[: end + 2]
    elif not text.endswith(b"\r\n") and text:
        text += b"\r\n"
    if len(text) <= MAX_RETURNED_HEADER_OCTETS:
        return text, not complete
    kept = 0
    for field in _split_fields(text):
        if kept + len(field) > MAX_RETURNED_HEADER_OCTETS:
            break
        kept += len(field)
    return text[:kept], True


def _split_fields(section: bytes) -> Iterator[bytes]:
    """Each header field with its continuation lines, CRLFs included."""
    start = 0
    for match in re.finditer(rb"\r\n(?![ \t])", section):
        yield section[start : match.end()]
        start = match.end()
    if start < len(section):
        yield section[start:]


def _header_fields(section: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each well-formed field, in order."""
    fields = []
    for field in _split_fields(section):
        name, colon, value = field.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            continue
        unfolded = re.sub(rb"\r\n(?=[ \t])", b"", value).strip()
        fields.append((name.decode("ascii").lower(), unfolded.decode("utf-8", "replace")))
    return fields


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,76}")
_MESSAGE_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


@dataclass(frozen=True, slots=True)
class _OriginalFacts:
    subject: str
    message_id: str
    is_report: bool
    auto_submitted: bool

    @classmethod
    def from_headers(cls, fields: list[tuple[str, str]]) -> _OriginalFacts:
        first: dict[str, str] = {}
        for name, value in fields:
            first.setdefault(name, value)
        content_type = first.get("content-type", "").lower()
        # Every multipart/report (DSN, MDN, ARF) is a machine's report: never answer one.
        is_report = bool(re.match(r"\s*multipart\s*/\s*report\b", content_type))
        auto = re.match(r"\s*([A-Za-z0-9-]+)", first.get("auto-submitted", ""))
        message_id = _MESSAGE_ID.match(first.get("message-id", ""))
        subject = _decode_encoded_words(first.get("subject", "")[:4096])
        return cls(
            subject=_clean_text(subject, MAX_SUBJECT_CHARS),
            message_id=message_id.group(0) if message_id else "",
            is_report=is_report,
            # RFC 3834 section 5: any value but "no" marks an automatic message
            auto_submitted=auto is not None and auto.group(1).lower() != "no",
        )


_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")


def _decode_encoded_words(value: str) -> str:
    """RFC 2047 decoding that never fails: undecodable words stay as they are."""
    out: list[str] = []
    position = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        if not (after_word and not between.strip()):  # RFC 2047 6.2: drop space between words
            out.append(between)
        out.append(_decode_word(match))
        position = match.end()
        after_word = True
    out.append(value[position:])
    return "".join(out)


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, text = match.group(1), match.group(2).upper(), match.group(3)
    try:
        if encoding == "Q":
            data = quoprimime.header_decode(text).encode("latin-1")
        else:
            data = binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
        if "escape" in codecs.lookup(charset).name:
            return match.group(0)
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown charset, bad base64 (binascii.Error)
        return match.group(0)


_CONTROLS_BUT_TAB = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HIDDEN = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean_text(text: str, limit: int) -> str:
    """One line of plain text: controls, line and paragraph separators and bidi overrides
    become spaces, runs of white space one space, then cut to limit characters."""
    kept = "".join(
        " " if unicodedata.category(ch) in UNSAFE_CATEGORIES or ch in _HIDDEN else ch for ch in text
    )
    collapsed = " ".join(kept.split())
    if len(collapsed) <= limit:
        return collapsed
    return collapsed[: limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------- facts


def _mailbox(raw: str, what: str, *, allow_bare: bool = False) -> str:
    """The address in canonical form (case kept, domain as A-labels), or DsnError."""
    try:
        address = parse_address(raw, delimiters="", fold_case=False, allow_bare=allow_bare)
    except AddressError as exc:
        raise DsnError(f"{what}: {exc}") from None
    if _SURROGATE.search(address.full_key):  # undecodable octets smuggled in as escapes
        raise DsnError(f"{what}: invalid character in address")
    return address.full_key


_SURROGATE = re.compile("[\ud800-\udfff]")


def _host_name(raw: str, what: str) -> str:
    try:
        return normalise_domain(raw.strip())
    except AddressError:
        raise DsnError(f"{what} is not a valid host name") from None


def _rfc5322_date(moment: datetime, what: str) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise DsnError(f"{what} must be an aware datetime")
    return format_datetime(moment)


def _queue_id(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:MAX_QUEUE_ID_CHARS] or "unknown"


def _mta_name(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = raw.strip()
    if not text or len(text) > MAX_MTA_NAME_CHARS or not _PRINTABLE_ASCII.fullmatch(text):
        return None
    return text


_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")


def decode_xtext(text: str) -> bytes:
    """Decode RFC 3461 section 4 xtext ("+2B" is "+"); DsnError when it is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise DsnError("not xtext")
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")


def _decode_envid(raw: str | None) -> str | None:
    """ENVID as Original-Envelope-Id, or None when it is absent or unsafe (RFC 3461 4.4:
    printable ASCII, at most 100 characters)."""
    if not raw:
        return None
    try:
        value = decode_xtext(raw.strip()).decode("ascii")
    except (DsnError, UnicodeDecodeError):
        return None
    if not value or len(value) > MAX_ENVID_CHARS or not _PRINTABLE_ASCII.fullmatch(value):
        return None
    return value.strip() or None


_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")


def _decode_orcpt(raw: str | None, global_types: bool) -> str | None:
    """ORCPT as Original-Recipient ("type;address", kept as given after xtext decoding), or
    None when it is absent or unsafe. A non-ASCII utf-8 address stays raw in a global DSN
    and becomes RFC 6533 utf-8-addr-xtext (\\x{HEX}) in an ASCII one."""
    if not raw:
        return None
    try:
        text = decode_xtext(raw.strip()).decode("utf-8")
    except (DsnError, UnicodeDecodeError):
        return None
    address_type, semicolon, address = text.partition(";")
    address_type, address = address_type.strip(), address.strip()
    if not semicolon or not address or not _ADDRESS_TYPE.fullmatch(address_type):
        return None
    if any(unicodedata.category(ch) in UNSAFE_CATEGORIES for ch in address):
        return None
    if not address.isascii():
        if address_type.lower() != "utf-8":
            return None
        if not global_types:
            address = "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in address)
    value = f"{address_type};{address}"
    return value if len(value) <= MAX_ORCPT_CHARS else None
