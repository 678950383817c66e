"""The policy protocol codec without sockets: framing, limits, errors, replies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policyd_support import policy_request

from policyd.codec import (
    EXTRACTED_ATTRIBUTES,
    MAX_ATTRIBUTES,
    MAX_LINE_BYTES,
    MAX_REQUEST_BYTES,
    ErrorKind,
    PolicyDecoder,
    PolicyRequest,
    ProtocolError,
    encode_reply,
)

pytestmark = pytest.mark.timeout(60)

READ_SIZES = [65536, 4096, 128, 16, 1]


def decode(stream: bytes, read_size: int) -> list[PolicyRequest | ProtocolError]:
    decoder = PolicyDecoder()
    items: list[PolicyRequest | ProtocolError] = []
    for offset in range(0, len(stream), read_size):
        items += decoder.feed(stream[offset : offset + read_size])
        assert decoder.buffered < MAX_REQUEST_BYTES
    return items


def error_kinds(items: list[PolicyRequest | ProtocolError]) -> list[ErrorKind | str]:
    return [item.kind if isinstance(item, ProtocolError) else item.request for item in items]


LONG_VALUE = "x" * (MAX_LINE_BYTES - len("name="))
CASES = [
    # label, stream, want: request types in order, then the error kind (if any)
    ("one request", b"request=smtpd_access_policy\n\n", ["smtpd_access_policy"]),
    ("two requests", b"request=a\n\nrequest=b\nx=1\n\n", ["a", "b"]),
    ("value holds '='", b"request=a\nsender=x=y@z\n\n", ["a"]),
    ("empty value", b"request=a\nqueue_id=\n\n", ["a"]),
    ("UTF-8 value", "request=a\nrecipient=josé@example.com\n\n".encode(), ["a"]),
    ("CR LF ends a line", b"request=a\r\nx=y\r\n\r\n", ["a"]),
    ("CR LF and LF mixed", b"request=a\nx=y\r\n\nrequest=b\r\n\r\n", ["a", "b"]),
    ("CR LF then LF ends the request", b"request=a\r\n\n", ["a"]),
    ("CR inside a value is data", b"request=a\rb\r\n\r\n", ["a\rb"]),
    ("CR before CR LF is data", b"request=a\r\r\n\r\n", ["a\r"]),
    ("CR LF empty request", b"\r\n", [ErrorKind.MISSING_REQUEST]),
    ("line of one CR", b"request=a\r\n\r\r\n\r\n", [ErrorKind.MALFORMED_LINE]),
    ("CR LF longest line", f"request=a\r\nname={LONG_VALUE}\r\n\r\n".encode(), ["a"]),
    (
        "CR LF line too long",
        f"request=a\r\nname={LONG_VALUE}x\r\n\r\n".encode(),
        [ErrorKind.LINE_TOO_LONG],
    ),
    (
        "CR LF most attributes",
        b"request=a\r\n" + b"".join(b"n%d=v\r\n" % i for i in range(MAX_ATTRIBUTES - 1)) + b"\r\n",
        ["a"],
    ),
    (
        "CR LF too many attributes",
        b"request=a\r\n" + b"".join(b"n%d=v\r\n" % i for i in range(MAX_ATTRIBUTES)) + b"\r\n",
        [ErrorKind.TOO_MANY_ATTRIBUTES],
    ),
    ("incomplete request waits", b"request=a\nrecipient=b", []),
    ("longest line", f"request=a\nname={LONG_VALUE}\n\n".encode(), ["a"]),
    ("line too long", f"request=a\nname={LONG_VALUE}x\n\n".encode(), [ErrorKind.LINE_TOO_LONG]),
    (
        "most attributes",
        b"request=a\n" + b"".join(b"n%d=v\n" % i for i in range(MAX_ATTRIBUTES - 1)) + b"\n",
        ["a"],
    ),
    (
        "too many attributes",
        b"request=a\n" + b"".join(b"n%d=v\n" % i for i in range(MAX_ATTRIBUTES)) + b"\n",
        [ErrorKind.TOO_MANY_ATTRIBUTES],
    ),
    (
        "request too long",
        b"request=a\n" + b"".join(b"n%02d=%s\n" % (i, b"v" * 1000) for i in range(17)) + b"\n",
        [ErrorKind.REQUEST_TOO_LONG],
    ),
    ("NUL byte", b"request=a\nsender=x\0y\n\n", [ErrorKind.NUL_BYTE]),
    ("invalid UTF-8", b"request=a\nrecipient=\xff@example.com\n\n", [ErrorKind.INVALID_UTF8]),
    ("truncated UTF-8", b"request=a\nrecipient=\xc3\n\n", [ErrorKind.INVALID_UTF8]),
    ("line without '='", b"request=a\nhello\n\n", [ErrorKind.MALFORMED_LINE]),
    ("empty name", b"request=a\n=value\n\n", [ErrorKind.MALFORMED_LINE]),
    ("duplicate name", b"request=a\nrecipient=x\nrecipient=y\n\n", [ErrorKind.DUPLICATE_ATTRIBUTE]),
    ("missing request", b"recipient=x\n\n", [ErrorKind.MISSING_REQUEST]),
    ("empty request", b"\n", [ErrorKind.MISSING_REQUEST]),
    ("empty request after one", b"request=a\n\n\n", ["a", ErrorKind.MISSING_REQUEST]),
    (
        "error ends the stream",
        b"request=a\n\nbad\n\nrequest=b\n\n",
        ["a", ErrorKind.MALFORMED_LINE],
    ),
    ("NUL in an incomplete request", b"request=a\nx=\0", [ErrorKind.NUL_BYTE]),
]


@pytest.mark.parametrize("read_size", READ_SIZES)
@pytest.mark.parametrize(("label", "stream", "want"), CASES, ids=[c[0] for c in CASES])
def test_decoder_table(label: str, stream: bytes, want: list[object], read_size: int) -> None:
    assert error_kinds(decode(stream, read_size)) == want, label


@pytest.mark.parametrize("read_size", READ_SIZES)
def test_a_crlf_request_decodes_as_its_lf_twin(read_size: int) -> None:
    """Other policy clients end lines with CR LF: the request, values and all, is the one
    Postfix's LF line ends give."""
    lf = policy_request(recipient="bob@example.com", sender="", ccert_subject="C" * 900)
    (want,) = PolicyDecoder().feed(lf)
    assert decode(lf.replace(b"\n", b"\r\n"), read_size) == [want]
    assert decode(lf.replace(b"\n", b"\r\n") * 3, read_size) == [want] * 3


def test_request_attributes_and_missing_ones_read_as_empty() -> None:
    (request,) = PolicyDecoder().feed(policy_request(recipient="bob@example.com"))
    assert isinstance(request, PolicyRequest)
    assert request.request == "smtpd_access_policy"
    assert request.get("recipient") == "bob@example.com"
    assert request.get("protocol_state") == "RCPT"
    assert request.get("no_such_attribute") == ""
    assert len(request.attributes) == 31


@pytest.mark.parametrize("name", EXTRACTED_ATTRIBUTES)
def test_every_attribute_policyd_reads_is_refused_when_repeated(name: str) -> None:
    stream = policy_request(sasl_username="alice")
    repeated = stream.replace(b"\n\n", f"\n{name}=again\n\n".encode(), 1)
    assert error_kinds(PolicyDecoder().feed(repeated)) == [ErrorKind.DUPLICATE_ATTRIBUTE]


def test_a_repeated_attribute_policyd_does_not_read_is_kept_last() -> None:
    """Documented in policyd.codec: only attributes policyd reads get the duplicate check."""
    stream = b"request=smtpd_access_policy\nqueue_id=A\nrecipient=b@example.com\nqueue_id=B\n\n"
    (request,) = PolicyDecoder().feed(stream)
    assert isinstance(request, PolicyRequest)
    assert request.get("queue_id") == "B" and request.attributes["queue_id"] == "B"
    assert request.extracted == {"request": "smtpd_access_policy", "recipient": "b@example.com"}


@pytest.mark.parametrize(
    ("line", "detail"),
    [(b"no_equals_sign", "no '=' in line"), (b"=value", "empty attribute name")],
)
def test_an_unread_malformed_line_anywhere_is_refused(line: bytes, detail: str) -> None:
    stream = policy_request()
    for position in (1, 15, stream.count(b"\n") - 1):  # start, middle, last line
        lines = stream[:-2].split(b"\n")
        lines.insert(position, line)
        items = PolicyDecoder().feed(b"\n".join(lines) + b"\n\n")
        assert items == [ProtocolError(ErrorKind.MALFORMED_LINE, detail)], position


def test_postfix_request_fits_the_limits_with_room_to_spare() -> None:
    raw = policy_request(ccert_subject="C" * 1000, policy_context="p" * 500)
    assert len(raw) < MAX_REQUEST_BYTES / 4
    assert max(map(len, raw.split(b"\n"))) < MAX_LINE_BYTES


def test_a_failed_decoder_stays_failed() -> None:
    decoder = PolicyDecoder()
    assert error_kinds(decoder.feed(b"junk\n\n")) == [ErrorKind.MALFORMED_LINE]
    assert decoder.failed
    assert decoder.feed(b"request=a\n\n") == []
    assert decoder.buffered == 0


HOSTILE_STREAMS = [
    ("endless line", b"request=a\nx=" + b"y" * 1_000_000, ErrorKind.LINE_TOO_LONG),
    ("100k attributes", b"request=a\n" + b"a=b\n" * 100_000, ErrorKind.TOO_MANY_ATTRIBUTES),
    ("long lines, no end", (b"n=" + b"v" * 2000 + b"\n") * 100, ErrorKind.REQUEST_TOO_LONG),
    ("NUL flood", b"\0" * 1_000_000, ErrorKind.NUL_BYTE),
    ("CR flood", b"\r" * 1_000_000, ErrorKind.LINE_TOO_LONG),
    ("endless CR LF line", b"request=a\r\nx=" + b"y" * 1_000_000, ErrorKind.LINE_TOO_LONG),
    (
        "100k CR LF attributes",
        b"request=a\r\n" + b"a=b\r\n" * 100_000,
        ErrorKind.TOO_MANY_ATTRIBUTES,
    ),
]


@pytest.mark.parametrize("read_size", [65536, 4096, 16])
@pytest.mark.parametrize(
    ("label", "stream", "kind"), HOSTILE_STREAMS, ids=[h[0] for h in HOSTILE_STREAMS]
)
def test_hostile_stream_fails_early_and_buffers_within_the_limit(
    label: str, stream: bytes, kind: ErrorKind, read_size: int
) -> None:
    decoder = PolicyDecoder()
    fed = 0
    for offset in range(0, len(stream), read_size):
        items = decoder.feed(stream[offset : offset + read_size])
        fed += read_size
        assert decoder.buffered < MAX_REQUEST_BYTES
        if items:
            assert error_kinds(items) == [kind]
            break
    else:
        pytest.fail(f"{label}: no error after {fed} bytes")
    # The error shows as soon as the bytes prove it: within one limit (and one read).
    assert fed <= MAX_REQUEST_BYTES + read_size


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.binary(max_size=40), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
    line_ends=st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=3, max_size=3),
)
def test_read_sizes_never_change_what_is_decoded(
    values: list[bytes], cuts: list[int], line_ends: list[bytes]
) -> None:
    """The same bytes, cut anywhere, decode to the same items (a framing-bug detector),
    whichever line ends (LF, CR LF) the requests use; values may hold CRs of their own."""
    first, second, blank = line_ends
    stream = b"".join(b"request=r" + first + b"v=" + value + second + blank for value in values)
    whole = PolicyDecoder().feed(stream)
    decoder = PolicyDecoder()
    pieces: list[PolicyRequest | ProtocolError] = []
    offset = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        pieces += decoder.feed(stream[offset : offset + cut])
        offset += cut
        if offset >= len(stream):
            break
    assert pieces == whole


@pytest.mark.parametrize(
    ("action", "wire"),
    [
        ("DUNNO", b"action=DUNNO\n\n"),
        ("550 5.1.1 <a@b>: User unknown", b"action=550 5.1.1 <a@b>: User unknown\n\n"),
        ("550 5.1.1 <josé@b>", "action=550 5.1.1 <josé@b>\n\n".encode()),
    ],
)
def test_encode_reply(action: str, wire: bytes) -> None:
    assert encode_reply(action) == wire


@pytest.mark.parametrize("action", ["", "DUNNO\n", "550 a\r\nx", "450\nrequest=x", "a\0b"])
def test_encode_reply_refuses_what_would_break_the_framing(action: str) -> None:
    with pytest.raises(ValueError, match="one non-empty line"):
        encode_reply(action)
