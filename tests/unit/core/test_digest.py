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
    build_digest,
    digest_text,
    events_of,
)
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
