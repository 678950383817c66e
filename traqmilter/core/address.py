"""Envelope address parsing and normalisation (RFC 5321, RFC 6531).

Every address that reaches traqmilter comes from the network and is hostile until it has
passed through parse_address(): the result is either an Address whose parts are safe to
look up, log and hand back to the MTA, or an AddressError naming what was wrong.

SECURITY: control characters (CR, LF, NUL, other C0, DEL) are refused everywhere, even in
quoted local parts, so a parsed address can never inject a header, a log line or an SMTP
command. Lengths follow RFC 5321 section 4.5.3.1 (local part 64 octets, domain 255,
path 256), measured in UTF-8 octets.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

MAX_LOCAL_OCTETS: Final = 64
MAX_DOMAIN_OCTETS: Final = 255
MAX_PATH_OCTETS: Final = 256

# atext of RFC 5322 plus any non-ASCII character (RFC 6531 UTF8-non-ascii).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_DOT_ATOM: Final = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# A dot-atom local part, "@", and a domain without "@" or control characters: exactly the
# texts for which the general path would split at the last "@" and keep the local part as
# it is. Anything else (quoted, bare, a source route, an error) takes the general path.
_SIMPLE_ADDRESS: Final = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@([^@\x00-\x1f\x7f]*)").fullmatch
_QTEXT_SAFE = re.compile(r"[\x20-\x7e\u0080-\U0010ffff]*")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SOURCE_ROUTE = re.compile(r"^@[^:]*:")


class AddressError(ValueError):
    """The text is not an acceptable envelope address; str() says why, safely."""


class Address(NamedTuple):
    """A parsed envelope address (immutable; a NamedTuple because policyd makes one per
    RCPT and a frozen dataclass costs twice as much to build).

    local: the local part without its extension, canonical (unquoted where RFC 5321 allows)
        and case-folded unless the directory compares local parts case-sensitively.
    extension: what followed the first recipient delimiter ("" when none).
    domain: lower-case ASCII (IDNA A-labels), no trailing dot; "" for bare "postmaster".
    delimiter: the delimiter character that was found ("" when none).
    """

    local: str
    domain: str
    extension: str = ""
    delimiter: str = ""

    @property
    def key(self) -> str:
        """Lookup key of the base address: local@domain (no extension)."""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def full_key(self) -> str:
        """Lookup key including the extension: local+ext@domain."""
        local = f"{self.local}{self.delimiter}{self.extension}" if self.delimiter else self.local
        return f"{local}@{self.domain}" if self.domain else local

    def with_domain(self, domain: str) -> Address:
        return Address(self.local, domain, self.extension, self.delimiter)

    def __str__(self) -> str:
        return self.full_key


def parse_address(
    raw: str,
    *,
    delimiters: str = "+",
    fold_case: bool = True,
    allow_bare: bool = False,
) -> Address:
    """Parse an envelope address as an MTA hands it over (with or without <>).

    allow_bare accepts a local part with no domain (RFC 5321 allows only "postmaster";
    Postfix passes such addresses when it appends no domain).
    """
    if len(raw) > 4 * MAX_PATH_OCTETS:
        raise AddressError("address too long")
    text = raw.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    simple = _SIMPLE_ADDRESS(text)
    if simple is not None:  # the common case, checked by one regex (0.4 of the 2 us)
        local, domain = simple.groups()
        domain = normalise_domain(domain)
    else:
        local, domain = _parse_general(text, allow_bare)
    # A character is at most 4 octets: short text needs no encoding to be measured.
    if len(text) > MAX_PATH_OCTETS // 4 and _octets(text) > MAX_PATH_OCTETS:
        raise AddressError("address too long")
    if len(local) > MAX_LOCAL_OCTETS // 4 and _octets(local) > MAX_LOCAL_OCTETS:
        raise AddressError("local part too long")
    if fold_case:
        local = local.lower()
    base, delimiter, extension = _split_extension(local, delimiters)
    return Address(base, domain, extension, delimiter)


def _parse_general(text: str, allow_bare: bool) -> tuple[str, str]:
    """(canonical local part, normalised domain or "") of any address _SIMPLE_ADDRESS
    does not match: quoted local parts, source routes, bare local parts, and errors."""
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    if text.startswith("@"):
        text = _SOURCE_ROUTE.sub("", text)  # RFC 5321 4.1.2: accept and ignore source routes
    if not text:
        raise AddressError("empty address")
    if len(text) > MAX_PATH_OCTETS // 4 and _octets(text) > MAX_PATH_OCTETS:
        raise AddressError("address too long")
    local, domain = _split_at_domain(text)
    if domain is None:
        if not allow_bare:
            raise AddressError("address has no domain")
        domain = ""
    else:
        domain = normalise_domain(domain)
    return _canonical_local(local), domain


DOMAIN_MEMO_SIZE: Final = 1024
"""Domains whose normal form is remembered: mail names few domains, and checking one label
by label costs more than the rest of parsing. Emptied when full, so bounded."""
_domain_memo: dict[str, str] = {}


def bare_address(text: str) -> str:
    """An address as an MTA hands it over ("<a@b>", " a@b ") without its angle brackets,
    case kept: for log lines, headers and counting keys, never for a lookup."""
    text = text.strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def normalise_domain(domain: str) -> str:
    """Lower-case a domain, drop one trailing dot, convert U-labels to A-labels."""
    try:
        return _domain_memo[domain]
    except KeyError:
        pass
    normal = _normalise_domain(domain)  # raises for a bad domain: only good ones are kept
    if len(_domain_memo) >= DOMAIN_MEMO_SIZE:
        _domain_memo.clear()
    _domain_memo[domain] = normal
    return normal


def _normalise_domain(domain: str) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        raise AddressError("address literals are not local domains")
    domain = domain.rstrip(".") if domain.endswith(".") and not domain.endswith("..") else domain
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise AddressError("invalid internationalised domain") from exc
    domain = domain.lower()
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise AddressError("invalid domain")
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    return domain


def _split_at_domain(text: str) -> tuple[str, str | None]:
    if text.startswith('"'):
        end = _quoted_end(text)
        local, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return local, None
        if not rest.startswith("@"):
            raise AddressError("text after quoted local part")
        return local, rest[1:]
    local, at, domain = text.rpartition("@")
    if not at:
        return text, None
    return local, domain


def _quoted_end(text: str) -> int:
    """Index of the closing quote of a quoted string that starts at text[0]."""
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i
        i += 1
    raise AddressError("unterminated quoted local part")


def _canonical_local(local: str) -> str:
    if not local:
        raise AddressError("empty local part")
    if local.startswith('"'):
        content = re.sub(r"\\(.)", r"\1", local[1:-1])
        if not _QTEXT_SAFE.fullmatch(content):
            raise AddressError("invalid quoted local part")
        if _DOT_ATOM.fullmatch(content):
            return content  # RFC 5321 4.1.2: "abc"@d and abc@d are the same mailbox
        escaped = content.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if not _DOT_ATOM.fullmatch(local):
        raise AddressError("invalid local part")
    return local


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _split_extension(local: str, delimiters: str) -> tuple[str, str, str]:
    """Split user+ext the way Postfix's recipient_delimiter does (first delimiter wins)."""
    if not delimiters or local.startswith('"'):
        return local, "", ""
    if len(delimiters) == 1:
        i = local.find(delimiters)
    else:
        i = min((found for d in delimiters if (found := local.find(d)) >= 0), default=-1)
    if i <= 0:  # none, or "+foo", which has no base to fall back on
        return local, "", ""
    return local[:i], local[i], local[i + 1 :]
