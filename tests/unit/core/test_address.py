"""Envelope address parsing: normalisation, extensions, quoting, SMTPUTF8, limits, hostility."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from traqmilter.core.address import (
    _SIMPLE_ADDRESS,
    Address,
    AddressError,
    _parse_general,
    normalise_domain,
    parse_address,
)

VALID = [
    # label, raw, kwargs, want (local, domain, extension, delimiter)
    ("plain", "alice@example.com", {}, ("alice", "example.com", "", "")),
    ("brackets", "<alice@example.com>", {}, ("alice", "example.com", "", "")),
    ("case folded", "Alice@EXAMPLE.Com", {}, ("alice", "example.com", "", "")),
    ("case kept", "Alice@EXAMPLE.Com", {"fold_case": False}, ("Alice", "example.com", "", "")),
    ("extension", "alice+news@example.com", {}, ("alice", "example.com", "news", "+")),
    ("first delimiter wins", "a+b+c@example.com", {}, ("a", "example.com", "b+c", "+")),
    ("delimiter set", "a-b@example.com", {"delimiters": "+-"}, ("a", "example.com", "b", "-")),
    ("no delimiter", "a+b@example.com", {"delimiters": ""}, ("a+b", "example.com", "", "")),
    ("leading delimiter", "+x@example.com", {}, ("+x", "example.com", "", "")),
    ("trailing dot domain", "a@example.com.", {}, ("a", "example.com", "", "")),
    ("needless quotes", '"alice"@example.com', {}, ("alice", "example.com", "", "")),
    ("quoted space", '"john doe"@example.com', {}, ('"john doe"', "example.com", "", "")),
    ("quoted escape", '"a\\"b"@example.com', {}, ('"a\\"b"', "example.com", "", "")),
    ("source route", "<@relay.example:alice@example.com>", {}, ("alice", "example.com", "", "")),
    ("utf8 local", "jörg@example.com", {}, ("jörg", "example.com", "", "")),
    ("idn domain", "a@bücher.example", {}, ("a", "xn--bcher-kva.example", "", "")),
    ("bare postmaster", "postmaster", {"allow_bare": True}, ("postmaster", "", "", "")),
    ("64 octet local", "a" * 64 + "@example.com", {}, ("a" * 64, "example.com", "", "")),
]


@pytest.mark.parametrize(("label", "raw", "kwargs", "want"), VALID, ids=[v[0] for v in VALID])
def test_parse_valid(
    label: str, raw: str, kwargs: dict[str, object], want: tuple[str, ...]
) -> None:
    address = parse_address(raw, **kwargs)  # type: ignore[arg-type]
    assert (address.local, address.domain, address.extension, address.delimiter) == want


INVALID = [
    ("empty", ""),
    ("empty brackets", "<>"),
    ("no domain", "alice"),
    ("CRLF injection", "alice@example.com\r\nRCPT TO:<x@y>"),
    ("LF", "ali\nce@example.com"),
    ("NUL", "alice\x00@example.com"),
    ("DEL", "alice\x7f@example.com"),
    ("space", "al ice@example.com"),
    ("double dot", "a..b@example.com"),
    ("leading dot", ".a@example.com"),
    ("65 octet local", "a" * 65 + "@example.com"),
    ("65 octets in UTF-8", "ö" * 33 + "@example.com"),
    ("long path", "a@" + ".".join(["b" * 63] * 5)),
    ("bad label", "a@-example.com"),
    ("underscore domain", "a@ex_ample.com"),
    ("empty label", "a@example..com"),
    ("address literal", "a@[192.0.2.1]"),
    ("unterminated quote", '"abc@example.com'),
    ("text after quote", '"a"b@example.com'),
    ("huge", "a" * 100000 + "@example.com"),
    ("percent hack is fine but slash domain is not", "a@exa/mple.com"),
]


@pytest.mark.parametrize(("label", "raw"), INVALID, ids=[v[0] for v in INVALID])
def test_parse_invalid(label: str, raw: str) -> None:
    with pytest.raises(AddressError):
        parse_address(raw)


def test_keys() -> None:
    address = parse_address("Bob+Tag@Example.com")
    assert address.key == "bob@example.com"
    assert address.full_key == "bob+tag@example.com"
    assert str(address.with_domain("example.org")) == "bob+tag@example.org"
    assert Address("postmaster", "").key == "postmaster"


def test_error_text_is_safe() -> None:
    with pytest.raises(AddressError) as info:
        parse_address("x\r\n@example.com")
    assert "\r" not in str(info.value) and "\n" not in str(info.value)


def _general_result(text: str) -> tuple[str, str] | str:
    try:
        return _parse_general(text, True)
    except AddressError as exc:
        return str(exc)


def _fast_result(text: str) -> tuple[str, str] | str | None:
    simple = _SIMPLE_ADDRESS(text)
    if simple is None:
        return None
    local, domain = simple.groups()
    try:
        return local, normalise_domain(domain)
    except AddressError as exc:
        return str(exc)


_ADDRESS_ALPHABET = st.sampled_from(list('aZ09.+-_@"\\ <>:[]\x00\r\n\x7fé€'))


@given(st.text(_ADDRESS_ALPHABET, max_size=24))
def test_simple_path_agrees_with_the_general_one(text: str) -> None:
    """parse_address's one-regex path must give exactly what the general path gives, on
    every text it takes (addresses built to look alike, and hostile ones)."""
    fast = _fast_result(text)
    if fast is not None:
        assert fast == _general_result(text)


@pytest.mark.parametrize(
    ("text", "takes_simple_path"),
    [
        ("alice@example.com", True),
        ("a.b+c@EXAMPLE.com.", True),
        ("x@", True),
        ("x@[192.0.2.1]", True),
        ("a..b@example.com", False),
        ('"a b"@example.com', False),
        ("a@b@example.com", False),
        ("x\r@example.com", False),
    ],
)
def test_simple_path_cases(text: str, takes_simple_path: bool) -> None:
    fast = _fast_result(text)
    assert (fast is not None) == takes_simple_path
    if fast is not None:
        assert fast == _general_result(text)
