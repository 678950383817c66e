"""SMTP replies decided by the engine: code, enhanced status code (RFC 3463), text.

Every front end (policy protocol, milter, explain) renders these; none invents its own.
A reply's class always matches its enhanced code's class (5xx <-> 5.x.x, 4xx <-> 4.x.x),
and its text never holds a control character, so it is safe on any wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The reply codes Sendmail prefixes with "<recipient>... " itself.
SENDMAIL_NAMES_RECIPIENT = frozenset({450, 550, 553})
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f]")
MAX_TEXT = 400


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced_code: str
    text: str

    def __post_init__(self) -> None:
        if not 400 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} is not a refusal")
        if not _ENHANCED.fullmatch(self.enhanced_code):
            raise ValueError(f"bad enhanced status code {self.enhanced_code!r}")
        if self.enhanced_code[0] != str(self.code)[0]:
            raise ValueError(f"{self.code} does not match class of {self.enhanced_code}")
        if _UNSAFE_TEXT.search(self.text) or not self.text or len(self.text) > MAX_TEXT:
            raise ValueError("reply text must be 1..400 printable characters")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ends_session(self) -> bool:
        return self.code == 421

    def format(self) -> str:
        """As a policy action: Postfix itself prefixes the text with
        "<recipient>: Recipient address rejected: "."""
        return f"{self.code} {self.enhanced_code} {self.text}"

    def rcpt_text(self, recipient: str, *, mta: str = "postfix") -> str:
        """The text as Postfix shows a recipient rejection, for front ends that answer RCPT
        themselves (the milter, explain), so every MTA shows the same line:
        "<a@b>: Recipient address rejected: User unknown". Sendmail (`mta="sendmail"`)
        puts "<a@b>... " before a 450, 550 or 553 reply itself (fmtmsg() in its err.c),
        so the address is left out of those there: the client reads "<a@b>... Recipient
        address rejected: User unknown"; 452, 421, ... keep the address."""
        if mta == "sendmail" and self.code in SENDMAIL_NAMES_RECIPIENT:
            return safe_text(f"Recipient address rejected: {self.text}")
        return safe_text(f"<{recipient}>: Recipient address rejected: {self.text}")

    def __str__(self) -> str:
        return self.format()


def safe_text(text: str) -> str:
    """Make arbitrary text (an address, a config string) safe inside a reply."""
    return _UNSAFE_TEXT.sub("?", text)[:MAX_TEXT]


def user_unknown(recipient: str, template: str) -> Reply:
    """550 5.1.1 with the configured reason ({recipient} is the address)."""
    return Reply(550, "5.1.1", safe_text(template.replace("{recipient}", recipient)))


S452_QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
S450_CLIENT_BLOCKED = Reply(
    450, "4.7.1", "Too many unknown recipients from your address, try again later"
)
S421_CLIENT_BLOCKED = Reply(
    421, "4.7.1", "Too many unknown recipients from your address, closing connection"
)
S451_LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary recipient lookup failure, try again later")
S451_LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
S501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
S554_LOOP = Reply(554, "5.4.6", "Mail loop detected: too many hops")
# Fall-backs of the accept-time actions (core.plan): a limit reached since RCPT time.
S451_DSN_RATE = Reply(451, "4.7.1", "Too many delivery status notifications, try again later")
S450_CREATE_RATE = Reply(450, "4.7.1", "Too many new mailboxes, try again later")
S451_CREATE_RATE = Reply(451, "4.7.1", "Too many new mailboxes, try again later")
S451_UNVERIFIED = Reply(
    451, "4.7.1", "Sender not verified for a bounce; send to the other recipients alone"
)
# RFC 5321 4.5.3.1.10 and RFC 3463 X.5.3: this recipient belongs in another transaction
# (core.plan.transaction_split); the client sends it again in a new one.
S452_SEPARATE_TRANSACTION = Reply(
    452, "4.5.3", "Too many recipients; send this one again in a separate transaction"
)

ALL_CONSTANTS: tuple[Reply, ...] = (
    S452_QUEUE_FULL,
    S450_CLIENT_BLOCKED,
    S421_CLIENT_BLOCKED,
    S451_LOOKUP_FAILED,
    S451_LOCAL_ERROR,
    S501_BAD_RECIPIENT,
    S554_LOOP,
    S451_DSN_RATE,
    S450_CREATE_RATE,
    S451_CREATE_RATE,
    S451_UNVERIFIED,
    S452_SEPARATE_TRANSACTION,
)
