"""Dictionary-attack arithmetic: unknown-recipient attempts per client over a sliding window.

Like Postfix's anvil(8) this only counts; it trusts nothing but the client address the MTA
reports, and keeps its state in memory with a hard bound. Time is passed in (seconds since
the epoch, so blocks can be persisted and survive a restart); nothing here reads a clock.

Memory: a client is keyed by an int (IPv4 address, or the IPv6 /prefix network shifted
into a disjoint range) and holds either one int timestamp or a short tuple of them, so
1,000,000 tracked clients stay well under 256 MB. When the table is full, the least
recently counted client is forgotten first; blocked clients live in a separate table so
that forgetting never lifts a block. That table is bounded too: beyond max_clients blocks,
the one that ends first is dropped (an attacker cannot exhaust memory by being blocked).

BUGS: a client's window holds at most `threshold` timestamps (older ones cannot matter).
"""

from __future__ import annotations

import heapq
import ipaddress
from dataclasses import dataclass

_V6_BASE = 1 << 32  # IPv6 keys start above every IPv4 key


@dataclass(frozen=True, slots=True)
class Block:
    client: str  # "192.0.2.1" or "2001:db8:1:2::/64"
    until: float  # seconds since the epoch
    attempts: int


def client_key(client_address: str, ipv6_prefix: int) -> int | None:
    """Counting key of a client address; None when it is not an IP address."""
    try:
        ip = ipaddress.ip_address(client_address.strip())
    except ValueError:
        return None
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return int(ip.ipv4_mapped)
        return _V6_BASE + (int(ip) >> (128 - ipv6_prefix))
    return int(ip)


def key_text(key: int, ipv6_prefix: int) -> str:
    if key < _V6_BASE:
        return str(ipaddress.IPv4Address(key))
    network = (key - _V6_BASE) << (128 - ipv6_prefix)
    return f"{ipaddress.IPv6Address(network)}/{ipv6_prefix}"


def text_key(text: str, ipv6_prefix: int) -> int | None:
    """Inverse of key_text (also accepts a plain address)."""
    return client_key(text.partition("/")[0], ipv6_prefix)


class AttackTable:
    """Attempt counts and blocks. Not thread-safe: callers on threads serialise access."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        window_seconds: float = 600,
        block_seconds: float = 3600,
        ipv6_prefix: int = 64,
        max_clients: int = 1_000_000,
    ) -> None:
        self._attempts: dict[int, int | tuple[int, ...]] = {}
        self._blocks: dict[int, tuple[float, int]] = {}
        self.configure(
            threshold=threshold,
            window_seconds=window_seconds,
            block_seconds=block_seconds,
            ipv6_prefix=ipv6_prefix,
            max_clients=max_clients,
        )

    def configure(
        self,
        *,
        threshold: int,
        window_seconds: float,
        block_seconds: float,
        ipv6_prefix: int,
        max_clients: int,
    ) -> None:
        """Apply new limits (on reload) keeping the counts and blocks already made."""
        if ipv6_prefix != getattr(self, "ipv6_prefix", ipv6_prefix):
            self._attempts.clear()  # keys of another prefix length mean other networks
            self._blocks = {k: v for k, v in self._blocks.items() if k < _V6_BASE}
        self.threshold = threshold
        self.window_seconds = window_seconds
        self.block_seconds = block_seconds
        self.ipv6_prefix = ipv6_prefix
        self.max_clients = max_clients

    def __len__(self) -> int:
        return len(self._attempts)

    def blocked_until(self, key: int, now: float) -> float | None:
        entry = self._blocks.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._blocks[key]
            return None
        return entry[0]

    def record_unknown(self, key: int, now: float) -> Block | None:
        """Count one unknown-recipient attempt; return the block it starts, if any."""
        stamp = int(now)
        horizon = stamp - self.window_seconds
        previous = self._attempts.pop(key, None)  # pop + insert keeps recency order
        if previous is None:
            recent: tuple[int, ...] = ()
        elif isinstance(previous, int):
            recent = (previous,) if previous > horizon else ()
        else:
            recent = tuple(t for t in previous if t > horizon)
        recent = (*recent[-(self.threshold - 1) :], stamp) if self.threshold > 1 else (stamp,)
        if len(recent) >= self.threshold:
            return self._start_block(key, now, len(recent))
        self._attempts[key] = recent[0] if len(recent) == 1 else recent
        if len(self._attempts) > self.max_clients:
            del self._attempts[next(iter(self._attempts))]
        return None

    def _start_block(self, key: int, now: float, attempts: int) -> Block:
        until = now + self.block_seconds
        self._blocks[key] = (until, attempts)
        if len(self._blocks) > self.max_clients:
            self._drop_earliest_blocks()
        return Block(key_text(key, self.ipv6_prefix), until, attempts)

    def _drop_earliest_blocks(self) -> None:
        excess = len(self._blocks) - self.max_clients
        for key, _ in heapq.nsmallest(excess, self._blocks.items(), key=lambda kv: kv[1][0]):
            del self._blocks[key]

    def blocks(self, now: float) -> list[Block]:
        return [
            Block(key_text(k, self.ipv6_prefix), until, attempts)
            for k, (until, attempts) in sorted(self._blocks.items(), key=lambda kv: kv[1][0])
            if until > now
        ]

    def restore(self, blocks: list[Block], now: float) -> None:
        """Load persisted blocks (after a restart); expired or unparsable ones are skipped."""
        for block in blocks:
            key = text_key(block.client, self.ipv6_prefix)
            if key is not None and block.until > now:
                self._blocks[key] = (block.until, block.attempts)
        if len(self._blocks) > self.max_clients:
            self._drop_earliest_blocks()

    def clear(self, client: str | None = None) -> int:
        """Lift one client's block and counts (or all); return how many blocks were lifted."""
        if client is None:
            lifted = len(self._blocks)
            self._blocks.clear()
            self._attempts.clear()
            return lifted
        key = text_key(client, self.ipv6_prefix)
        if key is None:
            return 0
        self._attempts.pop(key, None)
        return 1 if self._blocks.pop(key, None) is not None else 0
