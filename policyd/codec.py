"""The Postfix policy-delegation protocol (SMTPD_POLICY_README), sans I/O.

Postfix writes a request as `name=value` lines, each ended by one LF, and ends the request
with an empty line (other policy clients end lines with CR LF, read the same); the policy
server answers `action=...` and an empty line, then both sides keep the connection for the
next request. PolicyDecoder turns bytes, fed in reads of any size, into PolicyRequest
values or one ProtocolError; encode_reply() makes the answer.
Nothing here touches a socket, so every framing case is tested without one.

Decisions (each one errs towards "no reply": Postfix then applies its default action, a
tempfail, so a bad request can delay mail but never let it in):
- LF ends a line, as Postfix's attr_print_plain() writes it, and so does CR LF, as other
  policy clients (and telnet) write it: the decoder turns each CR LF of the stream into LF
  before framing, so everything below, the limits included, applies to the request with
  LF line ends (a CR LF request may be one byte per line longer on the wire). A CR that
  ends a read is held until the next byte shows whether it starts a CR LF; a CR anywhere
  else is data. Replies always end lines with LF.
- Values are UTF-8 (Postfix sends UTF-8 addresses with SMTPUTF8 and sanitises the rest);
  invalid UTF-8 is an error rather than a guess.
- A name given twice is an error when policyd reads it (EXTRACTED_ATTRIBUTES): Postfix
  never repeats one, and when two `recipient=` lines disagree there is no safe choice.
- Unknown names are kept and ignored by the adapter, as the README asks.

The fast path: Postfix sends about 31 attributes and policyd reads 6. A dict of all 31
cost 7 us of the 10 us a request took to decode, so parse_request() checks the whole
request with C-speed operations (bytes.translate, compiled regexes) and extracts only
EXTRACTED_ATTRIBUTES, in one regex pass (4.7 us in all interpreted; most of it is the C
of the regex engine and bytes.translate, so compiled it is not much less). Every line,
read or not, gets:
the size limits, no NUL, valid UTF-8, the `name=value` form with a non-empty name. Lines
policyd does not read do not get the duplicate check: their values decide nothing, and
PolicyRequest.attributes (built on demand, for logs) keeps the last of repeated ones.

SECURITY: every buffer is bounded. A request may hold MAX_ATTRIBUTES lines of at most
MAX_LINE_BYTES each and MAX_REQUEST_BYTES in all; an over-long line, request or attribute
count is reported as soon as the bytes seen prove it, before its end arrives, so the
decoder never holds more than MAX_REQUEST_BYTES between feeds. A Postfix 3.7 request is
0.5-1 KiB in about 30 lines; the limits leave room for long ccert_* and policy_context
values.

BUGS: after a ProtocolError the decoder stays failed; the connection must be closed, since
no byte after the error can be framed with confidence.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

MAX_LINE_BYTES: Final = 2048
"""Longest `name=value` line, in bytes without its LF."""
MAX_ATTRIBUTES: Final = 100
"""Most lines in one request (Postfix 3.7 sends about 30)."""
MAX_REQUEST_BYTES: Final = 16 * 1024
"""Longest request, in bytes including every LF and the ending empty line."""

_LF: Final = 0x0A
_CR: Final = 0x0D
_EQUALS: Final = 0x3D


class ErrorKind(enum.StrEnum):
    LINE_TOO_LONG = "line too long"
    REQUEST_TOO_LONG = "request too long"
    TOO_MANY_ATTRIBUTES = "too many attributes"
    NUL_BYTE = "NUL byte"
    INVALID_UTF8 = "invalid UTF-8"
    MALFORMED_LINE = "line is not name=value"
    DUPLICATE_ATTRIBUTE = "attribute given twice"
    MISSING_REQUEST = "no request attribute"
    UNSUPPORTED_REQUEST = "unsupported request"


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Why the bytes on a connection are not a policy request. Safe to log: detail never
    holds request bytes beyond a short, sanitised attribute name."""

    kind: ErrorKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else str(self.kind)


class ProtocolViolation(Exception):
    """Raised by a request handler when a well-framed request makes no sense (an unknown
    `request=` type, an RCPT request without a recipient): the server logs it and closes
    the connection without a reply, like a framing error."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


EXTRACTED_ATTRIBUTES = (
    "request",
    "protocol_state",
    "recipient",
    "sender",
    "client_address",
    "sasl_username",
)
"""The attributes policyd reads; each is extracted, and refused when given twice."""
# Finds every `name=value` line of EXTRACTED_ATTRIBUTES in "\n" + text + "\n", in one
# pass at C speed (measured: 2 us for a Postfix request; a dict of all 31 lines costs 7).
_FIND_EXTRACTED: Final = re.compile("\n(" + "|".join(EXTRACTED_ATTRIBUTES) + ")=([^\n]*)").findall
# bytes.translate(None, _ALL_BUT_LF_AND_EQUALS) keeps only the LFs and "=" signs: a line
# without "=" shows as two LFs in a row.
_ALL_BUT_LF_AND_EQUALS: Final = bytes(b for b in range(256) if b not in b"\n=")
# CPython's bytes.find and `in` are slow for two-byte needles full of near misses (0.6 us
# on a Postfix request); the regex engine's literal search takes half that.
_EMPTY_NAME: Final = re.compile(b"\n=").search
_BLANK_LINE: Final = re.compile(b"\n\n").search


class PolicyRequest(NamedTuple):
    """One decoded request (a NamedTuple: one is made per request, at half the cost of a
    frozen dataclass). `request` is the value of the mandatory `request` attribute;
    extracted holds those of EXTRACTED_ATTRIBUTES that were present; text is the request's
    lines (already checked), from which `attributes` is built when asked."""

    request: str
    extracted: Mapping[str, str]
    text: str

    @property
    def attributes(self) -> dict[str, str]:
        """Every attribute, `request` included (built on each call: for logs, not the hot
        path). A repeated attribute policyd does not read keeps its last value."""
        return dict([line.split("=", 1) for line in self.text.split("\n")])

    def get(self, name: str) -> str:
        """An attribute's value; "" when absent (Postfix leaves out empty attributes too)."""
        if name in self.extracted:
            return self.extracted[name]
        if name in EXTRACTED_ATTRIBUTES:
            return ""
        return self.attributes.get(name, "")


def parse_request(raw: bytes) -> PolicyRequest | ProtocolError:
    """Parse the lines of one request (without the LF of its last line and the empty line)."""
    if len(raw) + 2 > MAX_REQUEST_BYTES:
        return ProtocolError(ErrorKind.REQUEST_TOO_LONG)
    if b"\0" in raw:
        return ProtocolError(ErrorKind.NUL_BYTE)
    # Only the LFs and "=" signs, in order: about 60 bytes to count and search, not 700.
    shape = raw.translate(None, _ALL_BUT_LF_AND_EQUALS)
    if shape.count(b"\n") >= MAX_ATTRIBUTES:
        return ProtocolError(ErrorKind.TOO_MANY_ATTRIBUTES)
    if len(raw) > MAX_LINE_BYTES and max(map(len, raw.split(b"\n"))) > MAX_LINE_BYTES:
        return ProtocolError(ErrorKind.LINE_TOO_LONG)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ProtocolError(ErrorKind.INVALID_UTF8)
    # A line without "=" leaves an LF with no "=" before it: at the start, after another
    # LF, or (the last line) at the end, where the framing LFs make it an empty line.
    if _BLANK_LINE(b"\n" + shape + b"\n"):
        return ProtocolError(ErrorKind.MALFORMED_LINE, "no '=' in line")
    if raw[0] == _EQUALS or _EMPTY_NAME(raw):  # raw is not empty: it has an "="
        return ProtocolError(ErrorKind.MALFORMED_LINE, "empty attribute name")
    pairs: list[tuple[str, str]] = _FIND_EXTRACTED(f"\n{text}\n")
    extracted = dict(pairs)
    if len(extracted) != len(pairs):
        names = [name for name, _ in pairs]
        return ProtocolError(
            ErrorKind.DUPLICATE_ATTRIBUTE, next(n for n in names if names.count(n) > 1)
        )
    request = extracted.get("request")
    if request is None:
        return ProtocolError(ErrorKind.MISSING_REQUEST)
    return PolicyRequest(request, extracted, text)


class PolicyDecoder:
    """Frames and parses the requests of one connection, fed reads of any size.

    feed() returns the requests completed by the new bytes, in order; a ProtocolError, if
    any, is the last item, and every later feed returns nothing. The same byte stream gives
    the same items whatever the read sizes.
    """

    __slots__ = ("_failed", "_pending", "_scanned")

    def __init__(self) -> None:
        self._pending = b""  # the start of an incomplete request
        self._scanned = 0  # _pending[:_scanned] is whole lines already checked
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held between feeds; never more than MAX_REQUEST_BYTES."""
        return len(self._pending)

    @property
    def failed(self) -> bool:
        return self._failed

    def feed(self, data: bytes) -> list[PolicyRequest | ProtocolError]:
        if self._failed or not data:
            return []
        pending = self._pending
        # CR LF to LF, only in bytes not seen before: a held CR that ended the last read,
        # then the new ones. Postfix sends no CR: a one-byte search (memchr) skips the
        # replace, whose two-byte search costs 0.6 us on a Postfix request.
        if pending and pending[len(pending) - 1] == _CR:
            data = pending[:-1] + (b"\r" + data).replace(b"\r\n", b"\n")
        elif b"\r" in data:
            data = pending + data.replace(b"\r\n", b"\n")
        elif pending:
            data = pending + data
        self._pending = b""
        items: list[PolicyRequest | ProtocolError] = []
        start = 0
        size = len(data)
        while start < size:
            if data[start] == _LF:
                return self._fail(items, ProtocolError(ErrorKind.MISSING_REQUEST, "empty"))
            blank = _BLANK_LINE(data, start)
            if blank is None:
                break
            end = blank.start()
            item = parse_request(data[start:end])
            items.append(item)
            if isinstance(item, ProtocolError):
                self._failed = True
                return items
            start = end + 2
        if start < size:
            error = self._check_partial(data, start, self._scanned if start == 0 else 0)
            if error is not None:
                return self._fail(items, error)
            self._pending = data[start:] if start else data
        else:
            self._scanned = 0
        return items

    def _check_partial(self, data: bytes, start: int, scanned: int) -> ProtocolError | None:
        """Check an incomplete request data[start:] for what already makes it invalid.
        Only lines after data[start + scanned] are new; earlier ones passed before."""
        size = len(data)
        line_start = start + scanned
        if data.find(b"\0", line_start) >= 0:
            return ProtocolError(ErrorKind.NUL_BYTE)
        while (newline := data.find(b"\n", line_start)) >= 0:
            if newline - line_start > MAX_LINE_BYTES:
                return ProtocolError(ErrorKind.LINE_TOO_LONG)
            line_start = newline + 1
        # A CR at the end may be the start of the line's CR LF end: not part of the line.
        line_end = size - 1 if data[size - 1] == _CR else size
        if line_end - line_start > MAX_LINE_BYTES:
            return ProtocolError(ErrorKind.LINE_TOO_LONG)
        # Lines here are never empty (an empty one would have ended the request).
        attributes = data.count(b"\n", start) + (1 if line_start < line_end else 0)
        if attributes > MAX_ATTRIBUTES:
            return ProtocolError(ErrorKind.TOO_MANY_ATTRIBUTES)
        if size - start >= MAX_REQUEST_BYTES:  # the ending LF cannot fit any more
            return ProtocolError(ErrorKind.REQUEST_TOO_LONG)
        self._scanned = line_start - start
        return None

    def _fail(
        self, items: list[PolicyRequest | ProtocolError], error: ProtocolError
    ) -> list[PolicyRequest | ProtocolError]:
        self._failed = True
        self._pending = b""
        self._scanned = 0
        items.append(error)
        return items


_DUNNO_REPLY: Final = b"action=DUNNO\n\n"


def encode_reply(action: str) -> bytes:
    """`action=<action>` and the empty line. Raises ValueError for an empty action or one
    holding CR, LF or NUL, which would split or end the reply early."""
    if action == "DUNNO":
        return _DUNNO_REPLY
    if not action or "\n" in action or "\r" in action or "\0" in action:
        raise ValueError("policy action must be one non-empty line")
    return b"action=" + action.encode("utf-8") + b"\n\n"
