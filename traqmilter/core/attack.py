"""Dictionary-attack arithmetic: unknown-recipient attempts per client over a sliding window.

Like Postfix's anvil(8) this only counts; it trusts nothing but the client address the MTA
reports, and keeps its state in memory with a hard bound. Time is passed in (seconds since
the epoch, so blocks can be persisted and survive a restart); nothing here reads a clock.

Memory: a client is keyed by an int (IPv4 address, or the IPv6 /prefix network shifted
into a disjoint range) and holds one int: its newest attempt in seconds (40 bits), then
each older attempt as its age relative to the newest (20 bits each, stored plus one so
that a zero slot ends the list). A tuple of 4 timestamps cost about 220 bytes per client;
the packed int costs 32-40. Measured (bench/policyd_bench.py, fresh process): 1,000,000
clients with 4 attempts each grow the process by 159 MB, the dict included (310 MB with
tuples). When the table is full, the least recently counted clients are forgotten first;
blocked clients live in a separate table so that forgetting never lifts a block. That
table is bounded too: beyond max_clients blocks, those that end first are dropped (an
attacker cannot exhaust memory by being blocked). Both tables shed 1% of max_clients
beyond the excess at once, so that a full table costs no more per new client than an
empty one.

A client may make `threshold` unknown-recipient attempts within the window; the attempt
past it starts the block (and is answered with it).

BUGS: a client's window holds at most threshold + 1 timestamps (older ones cannot matter).
The window is at most MAX_WINDOW_SECONDS (about 12 days; the config allows 7), since an
attempt's age must fit its 20 bits. Attempt times are whole seconds from 0 to 2**40.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
from dataclasses import dataclass
from itertools import islice
from typing import Final, Protocol

_V6_BASE: Final = 1 << 32  # IPv6 keys start above every IPv4 key
EVICTION_BATCH_DIVISOR: Final = 100
"""A full table forgets max_clients // this many clients at once, beyond the excess."""
_STAMP_BITS: Final = 40
_STAMP_MASK: Final = (1 << _STAMP_BITS) - 1
_AGE_BITS: Final = 20
_AGE_MASK: Final = (1 << _AGE_BITS) - 1
MAX_WINDOW_SECONDS: Final = _AGE_MASK - 1
"""Longest window: an attempt's age (plus one) must fit in _AGE_BITS."""


def _unpack(packed: int) -> list[int]:
    """The attempt times of a packed entry, newest first."""
    newest = packed & _STAMP_MASK
    stamps = [newest]
    ages = packed >> _STAMP_BITS
    while ages:
        stamps.append(newest - (ages & _AGE_MASK) + 1)
        ages >>= _AGE_BITS
    return stamps


def _pack(stamps: list[int]) -> int:
    """Pack attempt times given newest first (each within MAX_WINDOW_SECONDS of the first)."""
    newest = stamps[0]
    packed = newest
    shift = _STAMP_BITS
    for stamp in stamps[1:]:
        packed |= (min(newest - stamp, MAX_WINDOW_SECONDS) + 1) << shift
        shift += _AGE_BITS
    return packed


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
    return ip_key(ip, ipv6_prefix)


def ip_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ipv6_prefix: int) -> int:
    """Counting key of a parsed client address."""
    if isinstance(ip, ipaddress.IPv6Address):
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


MAX_DEFERRED_RETRIES: Final = 100_000
"""Deferred recipients DeferredRetries remembers at most (about 200 bytes each); beyond, the
oldest are forgotten: their retry then counts again, the safe direction."""


def recipient_token(recipient_key: str) -> str:
    """What a deferral remembers of a recipient (Address.full_key): a digest, so that no
    state store holds recipient addresses."""
    data = recipient_key.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class RetryExcuses(Protocol):
    """Recipients the milter deferred to a separate transaction (452 4.5.3), whose next
    attempt from the same client is not counted again: DeferredRetries in memory, or a
    state store's (traqmilter.state) when policyd and the milter, or several hosts, must
    share them.

    The rule: a (client, recipient) deferral made at `now` excuses one later attempt of
    that recipient from that client before `until` (now + the attack window), and only
    one: a deferral while an earlier one is alive changes nothing, even when that one was
    used. So every excused attempt follows a deferred one that was counted, and a 452 is
    never a free oracle. Keyed by the client's counting key, not the sender: an excuse
    must be spent by the client whose count it spares (another client's retry counts
    towards its own key anyway), and the sender is the client's to choose, so adding it
    would stop nobody. Its lifetime is the attack window: a retry later than that is
    counted, but the deferred attempt has left the window by then, so the two never
    count together."""

    def defer(self, key: int, recipient: str, until: float, now: float) -> None: ...

    def excuse(self, key: int, recipient: str, now: float) -> bool:
        """Whether this attempt is the excused retry of a deferral (and use that up)."""
        ...


class DeferredRetries:
    """RetryExcuses in memory, bounded (MAX_DEFERRED_RETRIES; expired entries go first).
    Not thread-safe, like AttackTable."""

    def __init__(self, max_entries: int = MAX_DEFERRED_RETRIES) -> None:
        self.max_entries = max_entries
        # (client key, recipient token) -> (until, used); insertion order is deferral order
        self._entries: dict[tuple[int, str], tuple[float, bool]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def defer(self, key: int, recipient: str, until: float, now: float) -> None:
        entry = self._entries.get((key, recipient))
        if entry is not None and entry[0] > now:
            return  # one excuse per window, used or not
        self._entries.pop((key, recipient), None)
        self._entries[key, recipient] = (until, False)
        if len(self._entries) > self.max_entries:
            entries = self._entries
            forget = len(entries) - self.max_entries + self.max_entries // EVICTION_BATCH_DIVISOR
            for old in list(islice(entries, forget)):
                del entries[old]

    def excuse(self, key: int, recipient: str, now: float) -> bool:
        entry = self._entries.get((key, recipient))
        if entry is None or entry[1]:
            return False
        if entry[0] <= now:
            del self._entries[key, recipient]
            return False
        self._entries[key, recipient] = (entry[0], True)
        return True


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
        self._attempts: dict[int, int] = {}  # key -> packed attempt times (_pack)
        self._blocks: dict[int, tuple[float, int]] = {}
        # When a shared state store (traqmilter.state_redis) follows this table: every
        # counted attempt as (key, whole-second stamp), for it to forward in batches.
        # None (the default, one host): nothing is kept.
        self.journal: list[tuple[int, int]] | None = None
        # Recipients deferred by the transaction split; a state store may replace this
        # with its own, shared between processes and hosts (RetryExcuses).
        self.retries: RetryExcuses = DeferredRetries()
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
        if not 0 < window_seconds <= MAX_WINDOW_SECONDS:
            raise ValueError(f"window_seconds must be 1..{MAX_WINDOW_SECONDS}")
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

    def note_deferred(self, key: int, recipient: str, now: float) -> None:
        """The milter deferred `recipient` (a recipient_token) of this client to a separate
        transaction: its next attempt within the window is not counted (RetryExcuses)."""
        self.retries.defer(key, recipient, now + self.window_seconds, now)

    def record_unknown(self, key: int, now: float, recipient: str | None = None) -> Block | None:
        """Count one unknown-recipient attempt; return the block it starts, if any: the
        attempt that makes more than `threshold` within the window. recipient (its
        recipient_token): not counted when it is the retry of a deferral (note_deferred)."""
        if recipient is not None and self.retries.excuse(key, recipient, now):
            return None
        stamp = min(max(int(now), 0), _STAMP_MASK)
        if self.journal is not None:
            self.journal.append((key, stamp))
        previous = self._attempts.pop(key, None)  # pop + insert keeps recency order
        if previous is None:
            recent = [stamp]
        else:
            horizon = stamp - self.window_seconds
            recent = [t for t in _unpack(previous) if t > horizon]
            recent.append(stamp)
            recent.sort(reverse=True)  # a clock that stepped back may make stamp not newest
            del recent[self.stamps_kept :]
        if self.blocks_at(len(recent)):
            return self._start_block(key, now, len(recent))
        self._attempts[key] = _pack(recent)
        if len(self._attempts) > self.max_clients:
            self._forget_least_recent()
        return None

    def adopt(self, key: int, stamps: list[int], now: float) -> None:
        """Take a client's shared window (its attempt times on every host) when it holds
        more attempts than this table has of its own, so that the next attempt here is
        judged on the total. A blocked client is left as it is."""
        if key in self._blocks:
            return
        horizon = int(now) - self.window_seconds
        recent = sorted((t for t in stamps if t > horizon), reverse=True)[: self.stamps_kept]
        previous = self._attempts.get(key)
        if not recent or (previous is not None and len(_unpack(previous)) >= len(recent)):
            return
        self._attempts.pop(key, None)
        self._attempts[key] = _pack(recent)
        if len(self._attempts) > self.max_clients:
            self._forget_least_recent()

    def blocks_at(self, attempts: int) -> bool:
        """Whether `attempts` unknown recipients within the window start a block (the one
        rule; a shared store applies it to the count of every host, see stamps_kept).
        threshold attempts are allowed, as Postfix's own limits allow their number of
        errors: the one past it starts the block."""
        return attempts > self.threshold

    @property
    def stamps_kept(self) -> int:
        """How many of a client's newest attempt times can matter to blocks_at()."""
        return self.threshold + 1

    def _forget_least_recent(self) -> None:
        """Forget the least recently counted clients: the excess and 1% more, in one batch.

        One at a time cost 30-200 us per new client once the table was full: a dict keeps
        the slots of deleted entries until it resizes, and every next(iter()) walked them
        all again. A batch walks them once per max_clients / 100 new clients.
        """
        attempts = self._attempts
        forget = len(attempts) - self.max_clients + self.max_clients // EVICTION_BATCH_DIVISOR
        for key in list(islice(attempts, forget)):
            del attempts[key]

    def _start_block(self, key: int, now: float, attempts: int) -> Block:
        until = now + self.block_seconds
        self._blocks[key] = (until, attempts)
        if len(self._blocks) > self.max_clients:
            self._drop_earliest_blocks()
        return Block(key_text(key, self.ipv6_prefix), until, attempts)

    def _drop_earliest_blocks(self) -> None:
        excess = len(self._blocks) - self.max_clients + self.max_clients // EVICTION_BATCH_DIVISOR
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
