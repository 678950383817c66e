"""The administrator's digest: what `create`, `forward` and `bounce` did, per domain.

Pure: the milter hands each accepted message's outcome to events_of(), a DigestBook
accumulates the events in bounded memory, book_rows() turns a book into the counts the
state store adds up (DigestRow), pending_digests() turns the stored rows of the closed
periods back into one summary per notify address, and build_digest() makes the message.
Collecting across threads, the store, the timer and the submission are effects
(traqmilter.milter.notify, traqmilter.state, traqmilter.state_redis).

Periods are aligned to the epoch (an hourly digest covers 10:00 to 11:00 on every host),
so the hosts that share a state store put the same period's events together.

Why a digest and not one message per mailbox: `create` and the catch-alls grow silently
(issue 10); one message per event would flood the administrator under a dictionary attack,
exactly when the rates are reached. One message per notify address and period, with
top-N lists and counts, stays readable and bounded whatever the traffic.
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage

from traqmilter.core.address import AddressError, parse_address
from traqmilter.core.digest_counts import DROPPED, LISTS, OTHERS, DigestRow
from traqmilter.core.plan import Fate, MessageFacts, MessagePlan
from traqmilter.core.settings import Action

SUBJECT_PREFIX = "traqmilter digest"


@dataclass(frozen=True, slots=True)
class DigestEvent:
    """One recipient a notified action handled.

    notify: the digest's recipient ("" none); action: create, forward or bounce;
    address: the mailbox created or the unknown address used (its base key);
    on_create: the hook to run for a new mailbox (create only)."""

    notify: str
    domain: str
    action: Action
    address: str
    sender: str
    client: str
    on_create: tuple[str, ...] = ()


# The fates a forward or bounce digest counts (traqmilter.report reads them from the log).
NOTIFIED_FATES = {
    Fate.FORWARDED: Action.FORWARD,
    Fate.BOUNCED: Action.BOUNCE,
    Fate.DROPPED_NO_DSN: Action.BOUNCE,
    Fate.DROPPED_UNVERIFIED: Action.BOUNCE,  # bounce_to: verified, unverified: discard
}


def events_of(facts: MessageFacts, plan: MessagePlan, created: Sequence[str]) -> list[DigestEvent]:
    """The digest events of one accepted message: its new mailboxes (created: the keys the
    store really made) and its forwarded or bounced unknown recipients."""
    fates = {f.recipient: f.fate for f in plan.fates}
    made = set(created)
    sender = facts.sender.strip("<>") or "<>"
    client = facts.client_address or "local"
    events = []
    for r in facts.recipients:
        policy, address = r.decision.policy, r.decision.recipient
        if policy is None or address is None:
            continue
        if r.action is Action.CREATE and address.key in made:
            made.discard(address.key)  # two recipients of one mailbox: one event
            action = Action.CREATE
        else:
            notified = NOTIFIED_FATES.get(fates.get(r.address, Fate.KEPT))
            if notified is None:
                continue
            action = notified
        if not policy.notify and not (action is Action.CREATE and policy.on_create):
            continue
        events.append(
            DigestEvent(
                policy.notify,
                address.domain,
                action,
                address.key,
                sender,
                client,
                policy.on_create if action is Action.CREATE else (),
            )
        )
    return events


class _Tally:
    """Counts per key, bounded: at most `limit` distinct keys; later keys count as others."""

    __slots__ = ("counts", "limit", "others")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.others = 0

    def add(self, key: str, count: int = 1) -> None:
        if key == OTHERS:
            self.others += count
        elif key in self.counts or len(self.counts) < self.limit:
            self.counts[key] = self.counts.get(key, 0) + count
        else:
            self.others += count

    def ranked(self, n: int) -> Ranked:
        """The n most counted (ties by key); the rest counted, the untracked ones apart."""
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        rest = sum(c for _, c in ranked[n:]) + self.others
        return Ranked(tuple(ranked[:n]), rest, self.others)


@dataclass(frozen=True, slots=True)
class Ranked:
    """A top-N list: (key, count) pairs, most counted first, and the count not named;
    untracked: how much of `others` came beyond max_tracked distinct keys (never named)."""

    top: tuple[tuple[str, int], ...]
    others: int = 0
    untracked: int = 0


@dataclass(frozen=True, slots=True)
class DomainSummary:
    domain: str
    created: Ranked  # new mailboxes (count 1 each)
    forwarded: Ranked  # unknown addresses forwarded to the catch-all
    bounced: Ranked  # unknown addresses bounced
    senders: Ranked
    clients: Ranked


@dataclass
class _DomainBook:
    limit: int
    created: _Tally = field(init=False)
    forwarded: _Tally = field(init=False)
    bounced: _Tally = field(init=False)
    senders: _Tally = field(init=False)
    clients: _Tally = field(init=False)

    def __post_init__(self) -> None:
        for name in LISTS:
            setattr(self, name, _Tally(self.limit))


class DomainTallies:
    """Per domain, bounded: each list keeps at most max_tracked keys, at most max_domains
    domains (events of later domains are only counted in `dropped`). One notify address's
    digest keeps one; `traqmilter report` keeps one for everything the log says."""

    def __init__(self, *, max_tracked: int, max_domains: int = 1000) -> None:
        self.max_tracked = max_tracked
        self.max_domains = max_domains
        self.domains: dict[str, _DomainBook] = {}
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self.domains)

    def add(self, event: DigestEvent) -> None:
        book = self._book(event.domain)
        if book is None:
            self.dropped += 1
            return
        tally = {
            Action.CREATE: book.created,
            Action.FORWARD: book.forwarded,
            Action.BOUNCE: book.bounced,
        }[event.action]
        tally.add(event.address)
        book.senders.add(event.sender)
        book.clients.add(event.client)

    def _book(self, domain: str) -> _DomainBook | None:
        book = self.domains.get(domain)
        if book is None and len(self.domains) < self.max_domains:
            book = self.domains[domain] = _DomainBook(self.max_tracked)
        return book

    def add_count(self, domain: str, name: str, key: str, count: int) -> None:
        """Add a stored count (a DigestRow's fields); unknown lists are ignored."""
        if name == DROPPED:
            self.dropped += count
        elif name in LISTS:
            book = self._book(domain)
            if book is None:
                if name in _EVENT_LISTS:  # senders and clients count the same events again
                    self.dropped += count
                return
            getattr(book, name).add(key, count)

    def rows(self, period: int, notify: str) -> list[DigestRow]:
        """These tallies as counts to store (traqmilter.state adds them up)."""
        rows = [
            DigestRow(period, notify, domain, name, key, count)
            for domain, book in self.domains.items()
            for name in LISTS
            for key, count in (
                *getattr(book, name).counts.items(),
                (OTHERS, getattr(book, name).others),
            )
            if count
        ]
        if self.dropped:
            rows.append(DigestRow(period, notify, "", DROPPED, OTHERS, self.dropped))
        return rows

    def summaries(self, top: int) -> tuple[DomainSummary, ...]:
        """Each domain's top-N lists, domains in name order."""
        return tuple(
            DomainSummary(domain, *(getattr(book, name).ranked(top) for name in LISTS))
            for domain, book in sorted(self.domains.items())
        )


class DigestBook:
    """One period's events per notify address (events without one are not kept)."""

    def __init__(self, *, max_tracked: int, max_domains: int = 1000) -> None:
        self.max_tracked = max_tracked
        self.max_domains = max_domains
        self.books: dict[str, DomainTallies] = {}

    def __bool__(self) -> bool:
        return bool(self.books)

    @property
    def dropped(self) -> int:
        """Events of domains beyond max_domains, over every notify address."""
        return sum(tallies.dropped for tallies in self.books.values())

    def add(self, event: DigestEvent) -> None:
        if not event.notify:
            return
        tallies = self.books.get(event.notify)
        if tallies is None:
            tallies = self.books[event.notify] = DomainTallies(
                max_tracked=self.max_tracked, max_domains=self.max_domains
            )
        tallies.add(event)

    def summaries(self, top: int) -> dict[str, tuple[DomainSummary, ...]]:
        """Per notify address, each domain's top-N lists (domains in name order)."""
        return {notify: tallies.summaries(top) for notify, tallies in self.books.items()}

    def rows(self, period: int) -> list[DigestRow]:
        """The book as counts of `period` (its start) for the state store."""
        return [row for notify, t in self.books.items() for row in t.rows(period, notify)]

    def add_rows(self, rows: Iterable[DigestRow]) -> None:
        """Add counts (another book's rows: what could not be stored yet)."""
        for row in rows:
            tallies = self.books.get(row.notify)
            if tallies is None:
                tallies = self.books[row.notify] = DomainTallies(
                    max_tracked=self.max_tracked, max_domains=self.max_domains
                )
            tallies.add_count(row.domain, row.list, row.key, row.count)


_EVENT_LISTS = ("created", "forwarded", "bounced")


@dataclass(frozen=True, slots=True)
class PendingDigest:
    """What one notify address has not been sent yet: the closed periods (their starts)
    and their counts added up."""

    notify: str
    periods: tuple[int, ...]
    tallies: DomainTallies

    @property
    def since(self) -> int:
        return self.periods[0]


def pending_digests(
    rows: Iterable[DigestRow], *, max_tracked: int, max_domains: int = 1000
) -> list[PendingDigest]:
    """The stored rows of closed periods as one pending digest per notify address (in
    address order): a digest the MTA refused is sent with the next one, never twice."""
    rows = list(rows)
    book = DigestBook(max_tracked=max_tracked, max_domains=max_domains)
    book.add_rows(rows)
    periods: dict[str, set[int]] = {}
    for row in rows:
        periods.setdefault(row.notify, set()).add(row.period)
    return [
        PendingDigest(notify, tuple(sorted(periods[notify])), book.books[notify])
        for notify in sorted(book.books)
    ]


@dataclass(frozen=True, slots=True)
class DigestMessage:
    """A digest ready for submission: MAIL FROM:<> RCPT TO:<envelope_recipient> (the
    fields a DSN submitter reads)."""

    envelope_recipient: str
    data: bytes
    message_id: str
    smtputf8: bool
    body_8bitmime: bool


class DigestError(ValueError):
    """The digest cannot be built (its recipient or host name is unusable)."""


def digest_text(
    summaries: Iterable[DomainSummary],
    *,
    since: str,
    until: str,
    max_tracked: int = 0,
    dropped: int = 0,
) -> str:
    """The human-readable summary (the digest's body and `traqmilter report`'s output).
    max_tracked: the bound the untracked counts passed (named in the text); dropped: the
    events of domains beyond the bound on domains."""
    lines = [f"What traqmilter did for unknown recipients from {since} to {until}:", ""]
    for s in summaries:
        lines.append(f"Domain {s.domain}")
        for title, ranked, counted in (
            ("New mailboxes (create)", s.created, False),
            (
                "Unknown addresses forwarded to the catch-all (forward), most used first",
                s.forwarded,
                True,
            ),
            ("Unknown addresses bounced (bounce), most used first", s.bounced, True),
            ("Senders", s.senders, True),
            ("Clients", s.clients, True),
        ):
            if not ranked.top:
                continue
            lines.append(f"  {title}:")
            for key, count in ranked.top:
                lines.append(f"    {count:6d}  {key}" if counted else f"    {key}")
            if ranked.others:
                lines.append(f"    {ranked.others:6d}  (others, not listed)")
            if ranked.untracked:
                bound = f"the {max_tracked}" if max_tracked else "the"
                lines.append(
                    f"            ({ranked.untracked} of them beyond {bound} distinct "
                    "entries kept per period: counted, never named)"
                )
        lines.append("")
    if dropped:
        lines.append(f"{dropped} events of further domains were counted but not listed.")
        lines.append("")
    return "\n".join(lines)


def build_digest(
    notify: str,
    summaries: Sequence[DomainSummary],
    *,
    since: float,
    until: float,
    hostname: str,
    token: str,
    max_tracked: int = 0,
    dropped: int = 0,
) -> DigestMessage:
    """The digest message for one notify address. since/until: the period, seconds since
    the epoch; token: a unique string for the Message-ID (the caller's randomness);
    max_tracked, dropped: as digest_text() says."""
    try:
        target = parse_address(notify)
    except AddressError as exc:
        raise DigestError(f"notify address {notify!r}: {exc}") from exc
    if not target.local or not target.domain:  # never the null address
        raise DigestError(f"notify address {notify!r} is not a mailbox")
    if not hostname or any(c.isspace() or c in "<>@" for c in hostname):
        raise DigestError(f"host name {hostname!r} is unusable")
    recipient = notify.strip().strip("<>")
    start, end = mail_date(since), mail_date(until)
    domains = ", ".join(s.domain for s in summaries)
    message = EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = f"traqmilter <MAILER-DAEMON@{hostname}>"
    message["To"] = recipient
    message["Date"] = end
    message_id = f"<{token}.digest@{hostname}>"
    message["Message-ID"] = message_id
    message["Subject"] = f"{SUBJECT_PREFIX}: {domains}"
    # RFC 3834: a machine wrote it; auto-responders must not answer.
    message["Auto-Submitted"] = "auto-generated"
    text = digest_text(summaries, since=start, until=end, max_tracked=max_tracked, dropped=dropped)
    message.set_content(text, cte="7bit" if text.isascii() else "8bit")
    data = message.as_bytes(policy=email.policy.SMTPUTF8.clone(linesep="\r\n"))
    head = data.partition(b"\r\n\r\n")[0]
    return DigestMessage(
        recipient, data, message_id, smtputf8=not head.isascii(), body_8bitmime=not text.isascii()
    )


def mail_date(seconds: float) -> str:
    """A time as a Date: header writes it (UTC)."""
    return email.utils.format_datetime(datetime.fromtimestamp(seconds, tz=UTC))
