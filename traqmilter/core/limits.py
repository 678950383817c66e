"""Rate limits of the accept-time actions that create things: DSNs per sender and per
client (backscatter), mailboxes per hour and in all.

The twin of attack.py: pure (time is passed in), bounded in memory, not thread-safe (the
milter's service serialises every call). End-of-message planning (plan.py) and the RCPT-time
fall-back read the limits; the service records what was done.

BUGS: the limits are per process and forgotten on restart; a restart can let one more
window's worth of DSNs or mailboxes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from traqmilter.core.address import bare_address
from traqmilter.core.attack import client_key
from traqmilter.core.settings import Config


class SlidingWindowCounter:
    """Events per key within a sliding window, for at most max_keys keys: the least
    recently counted key is forgotten first, so memory stays bounded. Pure (time is passed
    in) and not thread-safe, like AttackTable."""

    def __init__(self, limit: int, window_seconds: float, max_keys: int) -> None:
        self._events: dict[Any, tuple[float, ...]] = {}
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_keys = max_keys

    def __len__(self) -> int:
        return len(self._events)

    def count(self, key: Any, now: float) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        horizon = now - self.window_seconds
        return sum(1 for t in events if t > horizon)

    def allows(self, key: Any, now: float) -> bool:
        return self.count(key, now) < self.limit

    def record(self, key: Any, now: float) -> None:
        horizon = now - self.window_seconds
        recent = tuple(t for t in self._events.pop(key, ()) if t > horizon)
        # Only the newest `limit` events can ever matter for allows().
        self._events[key] = (*recent[-(self.limit - 1) :], now) if self.limit > 1 else (now,)
        while len(self._events) > self.max_keys:
            del self._events[next(iter(self._events))]

    def adopt(self, key: Any, stamps: Sequence[float], now: float) -> None:
        """Take `stamps` as the key's events: the window a shared store holds for every
        host (this host's own events included)."""
        horizon = now - self.window_seconds
        recent = sorted(t for t in stamps if t > horizon)[-self.limit :]
        self._events.pop(key, None)
        if recent:
            self._events[key] = tuple(recent)
            while len(self._events) > self.max_keys:
                del self._events[next(iter(self._events))]


class ActionLimits:
    """Rates and totals of the actions that create things: DSNs per sender and per client
    (backscatter), mailboxes per hour and in all. Counts survive reconfigure().

    Shared by several hosts (traqmilter.state_redis): `journal` lists every event recorded
    here as (counter name, key, time) for the store to forward, and the store hands back
    the shared windows (SlidingWindowCounter.adopt) and total (adopt_total)."""

    CREATE_WINDOW_SECONDS = 3600.0
    CREATE_KEY = "create"

    def __init__(self, config: Config, *, created_total: int = 0) -> None:
        self.dsn_by_sender = SlidingWindowCounter(1, 1, 1)
        self.dsn_by_client = SlidingWindowCounter(1, 1, 1)
        self.creates = SlidingWindowCounter(1, self.CREATE_WINDOW_SECONDS, 1)
        self.created_total = created_total
        # (counter name, the counter's key, time); the client's key is AttackTable's int
        self.journal: list[tuple[str, str | int, float]] | None = None
        self.reconfigure(config)

    def counters(self) -> dict[str, SlidingWindowCounter]:
        """The counters by the names journal entries carry."""
        return {
            "dsn-sender": self.dsn_by_sender,
            "dsn-client": self.dsn_by_client,
            "create": self.creates,
        }

    def adopt_total(self, shared_total: int) -> None:
        """The mailboxes created by every host (never lowers this host's own count)."""
        self.created_total = max(self.created_total, shared_total)

    def reconfigure(self, config: Config) -> None:
        bounce, create = config.bounce, config.create
        for counter, limit in (
            (self.dsn_by_sender, bounce.rate_per_sender),
            (self.dsn_by_client, bounce.rate_per_client),
        ):
            counter.limit, counter.window_seconds = limit, bounce.rate_window
            counter.max_keys = bounce.max_tracked
        self.creates.limit = create.rate_per_hour
        self.ipv6_prefix = config.dictionary_attack.ipv6_prefix
        self.max_total = create.max_total

    def _keys(self, sender: str, client_address: str) -> tuple[str, int | None]:
        return bare_address(sender).lower(), client_key(client_address, self.ipv6_prefix)

    def dsn_allowed(self, sender: str, client_address: str, now: float) -> bool:
        sender_key, client = self._keys(sender, client_address)
        if not self.dsn_by_sender.allows(sender_key, now):
            return False
        return client is None or self.dsn_by_client.allows(client, now)

    def record_dsn(self, sender: str, client_address: str, now: float) -> None:
        sender_key, client = self._keys(sender, client_address)
        self.dsn_by_sender.record(sender_key, now)
        if client is not None:
            self.dsn_by_client.record(client, now)
        if self.journal is not None:
            self.journal.append(("dsn-sender", sender_key, now))
            if client is not None:
                self.journal.append(("dsn-client", client, now))

    def create_allowed(self, now: float) -> bool:
        return self.creates.allows(self.CREATE_KEY, now)

    def creates_in_window(self, now: float) -> int:
        return self.creates.count(self.CREATE_KEY, now)

    def total_reached(self) -> bool:
        return self.created_total >= self.max_total

    def record_create(self, now: float) -> None:
        self.creates.record(self.CREATE_KEY, now)
        self.created_total += 1
        if self.journal is not None:
            self.journal.append(("create", self.CREATE_KEY, now))
