"""Bounded collectors of the header section and the body, fed by the milter's header and
body callbacks: gathering facts is the adapter's job; end-of-message planning
(core.plan) only reads the HeaderSummary and body they hand over.

SECURITY: collected header text is bounded (MAX_KEPT_HEADER_OCTETS) and so is a kept body
(its limit), whatever the message size; a multi-line value is folded so that it can never
start a field of its own in the returned headers.
"""

from __future__ import annotations

import re

from traqmilter.core.plan import HOP_HEADER, MAX_KEPT_HEADER_OCTETS, HeaderSummary
from traqmilter.core.verify import MAX_AUTH_RESULTS

_HOP_HEADER_LOWER = HOP_HEADER.lower()
_AUTH_RESULTS_LOWER = "authentication-results"


class HeaderCollector:
    """Builds a HeaderSummary from the header callbacks of one message (not thread-safe:
    one per milter connection)."""

    __slots__ = ("_kept", "_size", "auth_results", "hops", "received", "truncated")

    def __init__(self) -> None:
        self._kept: list[bytes] = []
        self._size = 0
        self.received = 0
        self.hops = 0
        self.truncated = False
        self.auth_results: list[str] = []

    def add(self, name: str, value: bytes) -> None:
        lower = name.lower()
        if lower == "received":
            self.received += 1
        elif lower == _HOP_HEADER_LOWER:
            self.hops += 1
        elif lower == _AUTH_RESULTS_LOWER and len(self.auth_results) < MAX_AUTH_RESULTS:
            self.auth_results.append(value.decode("utf-8", "replace"))
        if self.truncated:
            return
        folded = value if b"\n" not in value and b"\r" not in value else _folded(value)
        field_bytes = name.encode("ascii", "replace") + b": " + folded + b"\r\n"
        if self._size + len(field_bytes) > MAX_KEPT_HEADER_OCTETS:
            self.truncated = True
            return
        self._kept.append(field_bytes)
        self._size += len(field_bytes)

    def summary(self) -> HeaderSummary:
        return HeaderSummary(
            b"".join(self._kept),
            self.received,
            self.hops,
            self.truncated,
            tuple(self.auth_results),
        )


def _folded(value: bytes) -> bytes:
    """A multi-line header value with CRLF line ends, every line break continuing the
    field: a bare LF followed by anything else would start a new field in the returned
    headers."""
    lines = re.split(rb"\r\n|\r|\n", value)
    return b"\r\n".join(
        line if i == 0 or line[:1] in (b" ", b"\t") else b" " + line for i, line in enumerate(lines)
    )


class BodyCollector:
    """Keeps the body only up to `limit` octets (more is noted, not kept)."""

    __slots__ = ("_chunks", "_size", "limit", "overflow")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflow = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if self._size + len(chunk) > self.limit:
            self.overflow = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)
        self._size += len(chunk)

    def body(self) -> bytes | None:
        """The whole body, or None when it was longer than the limit."""
        return None if self.overflow else b"".join(self._chunks)
