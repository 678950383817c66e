"""traqmilter's own SPF check (bounce.spf_check): pyspf over dnspython, bounded in time,
results remembered. The core's SpfChecker (core.verify); the milter calls it at RCPT time
for a bounce whose sender must be verified, on libmilter's per-session thread.

pyspf asks DNS through its module-level DNSLookup function; the checker points it at its
own dnspython resolver (bounce.spf_resolver, else the system's), so the last checker made
(the current config) is the one asked. Any failure -- timeout, no server, a pyspf error --
is temperror: the sender is then not verified, never wrongly verified.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import dns.exception
import dns.resolver
import spf

from traqmilter.core.settings import BounceSettings
from traqmilter.core.verify import resolver_address

log = logging.getLogger("traqmilter.milter")

CACHE_SIZE: Final = 10_000
"""Results remembered (emptied when full, so memory stays bounded)."""
CACHE_SECONDS: Final = 300.0
"""How long a result is remembered: short against the TTLs of SPF records, long enough
that a spam run from one client for one sender domain costs one check."""


class PyspfChecker:
    def __init__(
        self,
        timeout: float,
        resolver: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self._resolver = dns.resolver.Resolver(configure=not resolver)
        if resolver:
            found = resolver_address(resolver)
            if found is None:
                raise ValueError(f"bounce.spf_resolver: not an address: {resolver!r}")
            self._resolver.nameservers = [found[0]]
            self._resolver.port = found[1]
        self._resolver.lifetime = timeout
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._lock = threading.Lock()
        spf.DNSLookup = self._lookup

    def check(self, client_address: str, sender: str, helo: str) -> str:
        sender = sender.strip().removeprefix("<").removesuffix(">")  # as the milter has it
        key = (client_address, sender.lower(), helo.lower())
        now = self.clock()
        with self._lock:
            found = self._cache.get(key)
        if found is not None and now - found[0] < CACHE_SECONDS:
            return found[1]
        try:
            result, _explanation = spf.check2(
                i=client_address, s=sender, h=helo or "unknown", querytime=self.timeout
            )
        except (
            spf.TempError,
            spf.PermError,
            spf.AmbiguityWarning,
            ValueError,
            UnicodeError,
        ) as exc:
            log.warning("SPF check for %s from %s failed: %s", sender, client_address, exc)
            result = "temperror"
        result = str(result).lower()
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = (now, result)
        return result

    def _lookup(
        self, name: str, qtype: str, strict: Any = True, timeout: float = 30
    ) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup contract (spf.DNSLookup_dnspython) over our resolver."""
        try:
            answers = self._resolver.resolve(
                name, qtype, lifetime=min(timeout, self.timeout), search=False
            )
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        found: list[tuple[tuple[str, str], Any]] = []
        for rdata in answers:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                found.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), rdata.strings))
        return found


def spf_checker(bounce: BounceSettings) -> PyspfChecker | None:
    """The checker bounce.spf_check asks for, or None."""
    return PyspfChecker(bounce.spf_timeout, bounce.spf_resolver) if bounce.spf_check else None
