"""Reply constants: class and enhanced code agree, texts are printable (a meta-test)."""

import pytest

from traqmilter.core import replies
from traqmilter.core.replies import Reply


@pytest.mark.parametrize("reply", replies.ALL_CONSTANTS, ids=str)
def test_constants_are_consistent(reply: Reply) -> None:
    assert str(reply.code)[0] == reply.enhanced_code[0]
    assert reply.format().startswith(f"{reply.code} {reply.enhanced_code} ")


def test_every_module_constant_is_listed() -> None:
    named = {v for k, v in vars(replies).items() if k.startswith("S") and isinstance(v, Reply)}
    assert named == set(replies.ALL_CONSTANTS)


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (550, "4.1.1", "x"),
        (250, "2.0.0", "ok"),
        (550, "5.1", "x"),
        (550, "5.1.1", "a\r\nb"),
        (550, "5.1.1", ""),
    ],
)
def test_inconsistent_replies_refused(code: int, enhanced: str, text: str) -> None:
    with pytest.raises(ValueError):
        Reply(code, enhanced, text)


def test_user_unknown_template_is_sanitised() -> None:
    reply = replies.user_unknown("a@b\r\n", "<{recipient}>: gone")
    assert reply.format() == "550 5.1.1 <a@b??>: gone"


def test_rcpt_text_has_postfix_shape() -> None:
    reply = replies.user_unknown("zed@example.com", "User unknown")
    assert reply.rcpt_text("zed@example.com") == (
        "<zed@example.com>: Recipient address rejected: User unknown"
    )


def test_rcpt_text_under_sendmails_own_prefix() -> None:
    # Sendmail shows "550 5.1.1 <zed@example.com>... " + the text: the address once.
    unknown = replies.user_unknown("zed@example.com", "User unknown")
    assert unknown.rcpt_text("zed@example.com", mta="sendmail") == (
        "Recipient address rejected: User unknown"
    )
    blocked = replies.S450_CLIENT_BLOCKED.rcpt_text("zed@example.com", mta="sendmail")
    assert blocked.startswith("Recipient address rejected: Too many unknown")
    # It names the recipient in 450, 550 and 553 replies only: the others keep it.
    assert replies.S452_QUEUE_FULL.rcpt_text("zed@example.com", mta="sendmail") == (
        replies.S452_QUEUE_FULL.rcpt_text("zed@example.com")
    )
