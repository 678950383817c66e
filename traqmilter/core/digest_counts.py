"""The digest's counts as the state store keeps them (traqmilter.state, state_redis): the
rows, their markers and the periods. Apart from core.digest so that the stores, which
policyd loads too, load none of the milter's message code.
"""

from __future__ import annotations

from dataclasses import dataclass

OTHERS = ""
"""A stored count's key for the events beyond max_tracked distinct keys (never a key:
addresses, senders ("<>" for the null one) and clients ("local") are never empty)."""
LISTS = ("created", "forwarded", "bounced", "senders", "clients")
"""The lists a domain's digest counts, in the order the digest prints them."""
DROPPED = "dropped"
"""A stored count's list for the events of domains beyond max_domains (domain "")."""


@dataclass(frozen=True, slots=True, order=True)
class DigestRow:
    """One stored count: in the period starting at `period` (seconds since the epoch),
    for `notify`, in `domain`, `list` (one of LISTS, or DROPPED) counted `key` `count`
    times (key OTHERS: the events beyond max_tracked distinct keys). The state store adds
    rows up and keeps at most max_tracked distinct keys per period, notify, domain and
    list: a key beyond them is added to that list's OTHERS row instead."""

    period: int
    notify: str
    domain: str
    list: str
    key: str
    count: int


def period_start(now: float, period: float) -> int:
    """The start of the period `now` falls in, aligned to the epoch (so every host that
    shares a store agrees), in whole seconds."""
    step = max(1, round(period))
    return int(now // step) * step
