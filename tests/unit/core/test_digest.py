"""The pure digest: which events a message makes, bounded tallies, the message itself."""

from __future__ import annotations

import email
import email.policy

import pytest

from traqmilter.core.address import parse_address
from traqmilter.core.digest import (
    DigestBook,
    DigestError,
    DigestEvent,
    Ranked,
    build_digest,
    digest_text,
    events_of,
    pending_digests,
)
from traqmilter.core.digest_counts import DROPPED, OTHERS, DigestRow, period_start
from traqmilter.core.engine import RcptDecision
from traqmilter.core.plan import (
    AcceptedRecipient,
    Fate,
    MessageFacts,
    MessagePlan,
    RecipientFate,
)
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import Action, DomainPolicy

NOTIFY = "admin@example.com"


def accepted(address: str, action: Action, policy: DomainPolicy) -> AcceptedRecipient:
    rule = RuleName.UNKNOWN_CREATE if action is Action.CREATE else RuleName.UNKNOWN_FORWARD
    decision = RcptDecision(rule, None, action, parse_address(address), policy)
    return AcceptedRecipient(f"<{address}>", (), decision)


def facts(*recipients: AcceptedRecipient) -> MessageFacts:
    return MessageFacts(
        sender="<spam@remote.example>", recipients=recipients, client_address="127.0.0.9"
    )


def test_events_name_created_mailboxes_once_with_sender_client_and_hook() -> None:
    policy = DomainPolicy(action=Action.CREATE, notify=NOTIFY, on_create=("/bin/true",))
    message = facts(
        accepted("new+a@shop.example", Action.CREATE, policy),
        accepted("new+b@shop.example", Action.CREATE, policy),
        accepted("raced@shop.example", Action.CREATE, policy),
    )
    plan = MessagePlan(RuleName.ACTIONS)
    # raced@ was made by a concurrent message: not this message's news.
    (event,) = events_of(message, plan, ["new@shop.example"])
    assert event == DigestEvent(
        NOTIFY,
        "shop.example",
        Action.CREATE,
        "new@shop.example",
        "spam@remote.example",
        "127.0.0.9",
        ("/bin/true",),
    )


def test_events_of_forward_and_bounce_follow_the_fates() -> None:
    policy = DomainPolicy(action=Action.FORWARD, notify=NOTIFY)
    silent = DomainPolicy(action=Action.FORWARD)
    message = facts(
        accepted("x@fwd.example", Action.FORWARD, policy),
        accepted("y@bounce.example", Action.BOUNCE, policy),
        accepted("z@quiet.example", Action.FORWARD, silent),
        accepted("kept@fwd.example", Action.FORWARD, policy),
        accepted("w@bounce.example", Action.BOUNCE, policy),
    )
    plan = MessagePlan(
        RuleName.ACTIONS,
        fates=(
            RecipientFate("<x@fwd.example>", RuleName.UNKNOWN_FORWARD, Fate.FORWARDED),
            RecipientFate("<y@bounce.example>", RuleName.UNKNOWN_BOUNCE, Fate.DROPPED_NO_DSN),
            RecipientFate("<z@quiet.example>", RuleName.UNKNOWN_FORWARD, Fate.FORWARDED),
            # unverified: discard drops it without a DSN; its address was used all the same
            RecipientFate(
                "<w@bounce.example>", RuleName.UNVERIFIED_DISCARD, Fate.DROPPED_UNVERIFIED
            ),
        ),
    )
    events = events_of(message, plan, [])
    assert [(e.action, e.address) for e in events] == [
        (Action.FORWARD, "x@fwd.example"),
        (Action.BOUNCE, "y@bounce.example"),
        (Action.BOUNCE, "w@bounce.example"),
    ]
    assert all(e.on_create == () for e in events)


def event(
    address: str, *, action: Action = Action.FORWARD, sender: str = "s@r.example"
) -> DigestEvent:
    return DigestEvent(NOTIFY, "fwd.example", action, address, sender, "127.0.0.1")


def test_book_ranks_most_used_first_and_stays_bounded() -> None:
    book = DigestBook(max_tracked=3)
    for address, times in (("a@fwd.example", 1), ("b@fwd.example", 5), ("c@fwd.example", 3)):
        for _ in range(times):
            book.add(event(address))
    for n in range(100):  # beyond max_tracked: counted, never remembered
        book.add(event(f"extra{n}@fwd.example"))
    book.add(DigestEvent("", "x.example", Action.FORWARD, "q@x.example", "s", "c"))
    (summary,) = book.summaries(top=2)[NOTIFY]
    assert summary.forwarded.top == (("b@fwd.example", 5), ("c@fwd.example", 3))
    assert summary.forwarded.others == 1 + 100
    assert len(book.books[NOTIFY].domains["fwd.example"].forwarded.counts) == 3
    assert summary.senders.top == (("s@r.example", 109),)
    assert summary.created.top == () and summary.bounced.top == ()
    assert list(book.books) == [NOTIFY]  # an event with no notify address is not kept


def test_book_bounds_domains_per_address() -> None:
    book = DigestBook(max_tracked=10, max_domains=2)
    for domain in ("a.example", "b.example", "c.example"):
        book.add(DigestEvent(NOTIFY, domain, Action.BOUNCE, f"x@{domain}", "s", "c"))
    assert [s.domain for s in book.summaries(5)[NOTIFY]] == ["a.example", "b.example"]
    assert book.dropped == 1


def test_digest_is_a_normal_auto_generated_message() -> None:
    book = DigestBook(max_tracked=10)
    book.add(event("newbie@shop.example", action=Action.CREATE))
    book.add(event("x@fwd.example"))
    book.add(event("x@fwd.example"))
    (summaries,) = book.summaries(top=5).values()
    digest = build_digest(
        f"<{NOTIFY}>", summaries, since=0, until=3600, hostname="mx.example", token="t1"
    )
    assert digest.envelope_recipient == NOTIFY
    assert digest.message_id == "<t1.digest@mx.example>"
    assert not digest.smtputf8 and not digest.body_8bitmime
    assert b"\r\n" in digest.data and b"\n" not in digest.data.replace(b"\r\n", b"")
    message = email.message_from_bytes(digest.data, policy=email.policy.default)
    assert message["From"] == "traqmilter <MAILER-DAEMON@mx.example>"
    assert message["To"] == NOTIFY
    assert message["Date"] == "Thu, 01 Jan 1970 01:00:00 +0000"
    assert message["Message-ID"] == "<t1.digest@mx.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Subject"] == "traqmilter digest: fwd.example"
    body = message.get_content().replace("\r\n", "\n")
    assert "New mailboxes (create):\n    newbie@shop.example\n" in body
    assert "     2  x@fwd.example" in body
    assert "Senders:\n         3  s@r.example" in body


def test_digest_with_an_international_address_asks_for_smtputf8() -> None:
    book = DigestBook(max_tracked=10)
    book.add(
        DigestEvent("ädmin@example.com", "fwd.example", Action.FORWARD, "ü@fwd.example", "s", "c")
    )
    (summaries,) = book.summaries(top=5).values()
    digest = build_digest(
        "ädmin@example.com", summaries, since=0, until=1, hostname="mx.example", token="t"
    )
    assert digest.smtputf8 and digest.body_8bitmime
    assert "ü@fwd.example".encode() in digest.data


@pytest.mark.parametrize("target", ["", "<>", "not an address", "@example.com"])
def test_digest_is_never_sent_to_a_null_or_broken_target(target: str) -> None:
    with pytest.raises(DigestError):
        build_digest(target, (), since=0, until=1, hostname="mx.example", token="t")


def test_digest_refuses_an_unusable_host_name() -> None:
    with pytest.raises(DigestError):
        build_digest(NOTIFY, (), since=0, until=1, hostname="a b", token="t")


def test_text_counts_the_unnamed_rest() -> None:
    book = DigestBook(max_tracked=10)
    for n in range(4):
        book.add(event(f"u{n}@fwd.example"))
    text = digest_text(book.summaries(top=2)[NOTIFY], since="S", until="U")
    assert text.startswith("What traqmilter did for unknown recipients from S to U:")
    assert "     2  (others, not listed)" in text


def test_periods_are_aligned_to_the_epoch_so_hosts_agree() -> None:
    assert period_start(7199.9, 3600) == 3600
    assert period_start(7200.0, 3600) == 7200
    assert period_start(59.0, 30) == 30


def test_rows_carry_the_counts_and_the_untracked_rest_to_the_store() -> None:
    book = DigestBook(max_tracked=2)
    for address in ("a@fwd.example", "a@fwd.example", "b@fwd.example", "c@fwd.example"):
        book.add(event(address))
    rows = book.rows(3600)
    forwarded = {r.key: r.count for r in rows if r.list == "forwarded"}
    assert forwarded == {"a@fwd.example": 2, "b@fwd.example": 1, OTHERS: 1}
    assert {r.period for r in rows} == {3600} and {r.notify for r in rows} == {NOTIFY}
    again = DigestBook(max_tracked=2)
    again.add_rows(rows)  # what the store reads back is what was written
    assert again.summaries(5) == book.summaries(5)


def test_pending_digests_join_the_closed_periods_per_address() -> None:
    rows = [
        DigestRow(3600, NOTIFY, "fwd.example", "forwarded", "a@fwd.example", 2),
        DigestRow(0, NOTIFY, "fwd.example", "forwarded", "a@fwd.example", 1),
        DigestRow(0, NOTIFY, "fwd.example", "forwarded", OTHERS, 4),
        DigestRow(0, "other@example.com", "x.example", "bounced", "q@x.example", 1),
        DigestRow(0, NOTIFY, "", DROPPED, OTHERS, 3),
    ]
    mine, other = pending_digests(rows, max_tracked=10)
    assert (mine.notify, mine.periods, mine.since) == (NOTIFY, (0, 3600), 0)
    assert other.notify == "other@example.com" and other.periods == (0,)
    (summary,) = mine.tallies.summaries(top=5)
    assert summary.forwarded == Ranked((("a@fwd.example", 3),), others=4, untracked=4)
    assert mine.tallies.dropped == 3
    text = digest_text(mine.tallies.summaries(5), since="S", until="U", max_tracked=10, dropped=3)
    assert "     4  (others, not listed)\n" in text
    assert (
        "(4 of them beyond the 10 distinct entries kept per period: counted, never named)" in text
    )
    assert "3 events of further domains were counted but not listed." in text
