"""Whether a bounce's envelope sender can be verified (domain setting bounce_to: verified).

A DSN goes to the envelope sender, which spam forges; a DSN to a forged sender is
backscatter. So `bounce` sends one only to a sender something vouches for:

- the client: SASL-authenticated, or in dictionary_attack.exempt (the site's mynetworks);
  known at RCPT time (engine rule unknown_bounce_trusted_client);
- an SPF check of the envelope sender's domain against the client address that passed,
  made by traqmilter itself (bounce.spf_check, through the engine's injected SpfChecker); known at
  RCPT time (unknown_bounce_spf_pass, or unknown_bounce_unverified: rejected there);
- an Authentication-Results header (RFC 8601) written by this host's own verifier, the one
  whose authserv-id is bounce.authserv_id, that says spf=pass for the envelope sender's
  domain or dkim=pass for a signing domain aligned with it; known only at end of message
  (header_verdict, used by core.plan).

SECURITY: an Authentication-Results header is text the sender can write too. Headers
naming any other authserv-id are ignored. One naming ours is trusted only when it is the
only one: our verifier adds exactly one, so a second is a forgery (RFC 8601 section 5 asks
the border MTA to remove forged ones; docs/actions.md shows Postfix's header_checks, which
see the client's headers and never those a milter adds). Parsing is the authres library's
(RFC 8601 grammar); a header it cannot parse verifies nothing. DKIM alignment is the
signing domain equal to the sender's domain or a parent of it (relaxed alignment without a
public-suffix list, so never a bare top-level domain).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import NamedTuple

import authres

from traqmilter.core.rule_names import RuleName

MAX_AUTH_RESULTS = 20
"""Authentication-Results headers kept per message (more are counted, not parsed)."""
MAX_AUTH_RESULTS_CHARS = 4096
"""Longer Authentication-Results values are not parsed (and verify nothing)."""


VERIFIED_BY = {"spf=pass": RuleName.AUTHRES_SPF_PASS, "dkim=pass": RuleName.AUTHRES_DKIM_PASS}
"""The rule that verified a bounce's sender at end of message, by the `how` of a verified
Verdict (header_verdict gives these two only)."""


class Verdict(NamedTuple):
    verified: bool
    how: str  # for the log: what verified the sender, or why nothing did


def sender_domain(sender: str) -> str:
    """The envelope sender's domain, lower case ("" for the null sender or no domain)."""
    text = sender.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.rpartition("@")[2].rstrip(".").lower() if "@" in text else ""


def resolver_address(text: str) -> tuple[str, int] | None:
    """bounce.spf_resolver as (address, port): "127.0.0.1", "127.0.0.1:5353", "::1",
    "[::1]:5353"; None when it is not one."""
    host, port = text.strip(), 53
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, digits = host.partition(":")
        if not digits.isdigit():
            return None
        port = int(digits)
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    return (address, port) if 0 < port < 65536 else None


def aligned(signing_domain: str, domain: str) -> bool:
    """Relaxed alignment without a public-suffix list: equal, or a parent domain that is
    not a bare top-level domain."""
    d = signing_domain.strip().rstrip(".").lower()
    if not d or not domain:
        return False
    return d == domain or ("." in d and domain.endswith("." + d))


def header_verdict(values: Sequence[str], authserv_id: str, sender: str) -> Verdict:
    """Judge the Authentication-Results header values of a message (as received, in order)
    for the envelope sender."""
    if not authserv_id:
        return Verdict(False, "no bounce.authserv_id configured")
    domain = sender_domain(sender)
    ours = []
    for value in values:
        parsed = _parse(value)
        if parsed is not None and parsed.authserv_id.lower() == authserv_id.lower():
            ours.append(parsed)
    if not ours:
        return Verdict(False, f"no Authentication-Results of {authserv_id}")
    if len(ours) > 1:
        return Verdict(False, f"{len(ours)} Authentication-Results of {authserv_id} (forged)")
    for result in ours[0].results:
        method, outcome = str(result.method).lower(), str(result.result).lower()
        if outcome != "pass":
            continue
        if method == "spf" and sender_domain(_prop(result, "smtp", "mailfrom")) == domain:
            return Verdict(True, "spf=pass")
        if method == "dkim" and aligned(_prop(result, "header", "d"), domain):
            return Verdict(True, "dkim=pass")
    return Verdict(False, f"no spf=pass or aligned dkim=pass from {authserv_id}")


def _parse(value: str) -> authres.AuthenticationResultsHeader | None:
    if len(value) > MAX_AUTH_RESULTS_CHARS:
        return None
    try:
        return authres.AuthenticationResultsHeader.parse_value(" ".join(value.split()))
    except (authres.AuthResError, ValueError, IndexError):
        return None


def _prop(result: authres.AuthenticationResult, ptype: str, name: str) -> str:
    for prop in result.properties:
        if str(prop.type).lower() == ptype and str(prop.name).lower() == name:
            value = str(prop.value or "")
            # smtp.mailfrom may be the bare domain (RFC 8601 2.7.2) or the address.
            return value if ptype != "smtp" or "@" in value else f"x@{value}"
    return ""
