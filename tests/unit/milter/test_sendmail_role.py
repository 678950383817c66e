"""The milter in the sendmail role: with no policy service in front, its RCPT callback makes
the RCPT-time decisions itself (SPEC 2, 5), and words them as Postfix would.

Driven through pymilter's TestCtx, one RCPT at a time, so every reply the MTA would send
is seen. The role comes from the config (milter.role) through runtime.counts_unknown, the
same function `traqmilter milter` uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import Milter
import pytest
from milter_support import NOW, Conversation, EngineRuntime, RecordingSubmitter, make_config

from traqmilter.config import load_config
from traqmilter.core.attack import AttackTable, Block
from traqmilter.core.engine import Engine
from traqmilter.core.settings import (
    BounceSettings,
    Config,
    DictionaryAttackSettings,
    DirectorySettings,
    MilterSettings,
    QueueSettings,
)
from traqmilter.directory.sqlite import SqliteDirectory
from traqmilter.milter.server import libmilter_address
from traqmilter.milter.service import MilterService
from traqmilter.queue_gauge import FixedQueueGauge, PostfixQueueGauge, SendmailQueueGauge
from traqmilter.runtime import configure_attacks, counts_unknown, open_runtime

HARVESTER = "198.51.100.66"
SENDER = "sender@remote.example"
THRESHOLD = 3


@dataclass
class Milt:
    """A milter process of one role: engine, queue gauge, and the blocks it persisted."""

    service: MilterService
    queue: FixedQueueGauge
    attacks: AttackTable
    persisted: list[Block] = field(default_factory=list)

    def rcpt(
        self, recipient: str, *, sender: str = SENDER, client: str = HARVESTER
    ) -> tuple[int, tuple[str, ...] | None]:
        """One message with one RCPT from `client`: the milter's status and reply."""
        conversation = Conversation(self.service, client=client)
        ctx = conversation.ctx
        ctx._reply = None
        ctx._envfrom(f"<{sender}>" if sender else "<>")
        ctx._stage = Milter.M_ENVRCPT
        try:
            status: int = conversation.milter.envrcpt_bytes(f"<{recipient}>".encode())
        finally:
            ctx._stage = None
        reply: tuple[str, ...] | None = ctx._reply
        conversation.close()
        return status, reply


def make_milter(tmp_path: Path, role: str, **overrides: object) -> Milt:
    config = make_config(
        milter=MilterSettings(role=role),
        dictionary_attack=DictionaryAttackSettings(threshold=THRESHOLD, exempt=()),
        **overrides,
    )
    store = SqliteDirectory(str(tmp_path / "directory.sqlite"))
    store.bulk_add(["alice@example.com", "admin@fwd.example"])
    attacks = configure_attacks(AttackTable(), config)
    queue = FixedQueueGauge()
    engine = Engine(config, store, attacks, queue, clock=lambda: NOW)
    persisted: list[Block] = []
    service = MilterService(
        EngineRuntime(engine),
        mailboxes=lambda: store,
        submitter=RecordingSubmitter(),
        count_unknown=counts_unknown(config),
        role=role,
        on_block=persisted.append,
        clock=lambda: NOW,
    )
    return Milt(service, queue, attacks, persisted)


@pytest.fixture
def sendmail(tmp_path: Path) -> Milt:
    return make_milter(tmp_path, "sendmail")


# Sendmail itself puts "<nobody@example.com>... " before the text.
USER_UNKNOWN = ("550", "5.1.1", "Recipient address rejected: User unknown")
BLOCKED_TEXT = "Too many unknown recipients from your address, try again later"


def test_unknown_recipient_is_rejected_in_postfixs_words(sendmail: Milt) -> None:
    assert sendmail.rcpt("nobody@example.com") == (Milter.REJECT, USER_UNKNOWN)


def test_known_recipient_is_accepted_without_a_reply(sendmail: Milt) -> None:
    assert sendmail.rcpt("alice@example.com") == (Milter.CONTINUE, None)


def test_harvester_is_blocked_after_the_threshold_for_known_recipients_too(
    sendmail: Milt,
) -> None:
    for n in range(THRESHOLD):  # threshold unknown recipients get their honest answer
        assert sendmail.rcpt(f"guess{n}@example.com")[1] == (
            "550",
            "5.1.1",
            "Recipient address rejected: User unknown",
        )
    assert sendmail.persisted == []
    status, reply = sendmail.rcpt("guess-last@example.com")  # the one past the threshold
    assert status == Milter.TEMPFAIL
    assert reply == (
        "450",
        "4.7.1",
        f"Recipient address rejected: {BLOCKED_TEXT}",
    )
    assert [b.client for b in sendmail.persisted] == [HARVESTER]
    # Blocked: a known recipient gets the same answer, so the harvester learns nothing.
    assert sendmail.rcpt("alice@example.com") == (
        Milter.TEMPFAIL,
        ("450", "4.7.1", f"Recipient address rejected: {BLOCKED_TEXT}"),
    )
    # Another client is not affected.
    assert sendmail.rcpt("alice@example.com", client="192.0.2.1") == (Milter.CONTINUE, None)


def test_postmaster_is_always_accepted_even_from_a_blocked_client(sendmail: Milt) -> None:
    for n in range(THRESHOLD + 1):
        sendmail.rcpt(f"guess{n}@example.com")
    assert sendmail.rcpt("alice@example.com")[0] == Milter.TEMPFAIL  # blocked
    assert sendmail.rcpt("postmaster@example.com") == (Milter.CONTINUE, None)
    assert sendmail.rcpt("Postmaster@fwd.example") == (Milter.CONTINUE, None)


def test_queue_above_defer_water_defers_every_recipient(tmp_path: Path) -> None:
    milt = make_milter(tmp_path, "sendmail", queue=QueueSettings(high_water=10, defer_water=20))
    milt.queue.size = 21
    full = "Insufficient system storage, try again later"
    for recipient in ("alice@example.com", "nobody@example.com"):
        assert milt.rcpt(recipient) == (
            Milter.TEMPFAIL,
            ("452", "4.3.1", f"<{recipient}>: Recipient address rejected: {full}"),
        )
    assert milt.rcpt("postmaster@example.com") == (Milter.CONTINUE, None)
    milt.queue.size = 20  # at the limit, not above it
    assert milt.rcpt("alice@example.com") == (Milter.CONTINUE, None)


def test_null_sender_to_unknown_is_rejected_but_not_counted(sendmail: Milt) -> None:
    for n in range(THRESHOLD * 2):
        assert sendmail.rcpt(f"gone{n}@example.com", sender="") == (
            Milter.REJECT,
            ("550", "5.1.1", "Recipient address rejected: User unknown"),
        )
    assert sendmail.persisted == []
    assert sendmail.rcpt("alice@example.com") == (Milter.CONTINUE, None)
    # Not a single count: the threshold still takes THRESHOLD unknowns from a real sender.
    for n in range(THRESHOLD):
        assert sendmail.rcpt(f"guess{n}@example.com")[0] == Milter.REJECT
    assert sendmail.persisted == []


def test_unknown_of_a_forward_domain_is_accepted_and_counted(sendmail: Milt) -> None:
    for n in range(THRESHOLD):
        assert sendmail.rcpt(f"x{n}@fwd.example") == (Milter.CONTINUE, None)
    assert sendmail.rcpt("x-last@fwd.example")[0] == Milter.TEMPFAIL
    assert [b.client for b in sendmail.persisted] == [HARVESTER]


def test_postfix_role_never_counts(tmp_path: Path) -> None:
    postfix = make_milter(tmp_path, "postfix")
    for n in range(THRESHOLD * 3):
        # The engine's own reply still stands (policyd has refused these already).
        assert postfix.rcpt(f"guess{n}@example.com")[0] == Milter.REJECT
        assert postfix.rcpt(f"x{n}@fwd.example") == (Milter.CONTINUE, None)
    assert postfix.persisted == []
    assert postfix.rcpt("alice@example.com") == (Milter.CONTINUE, None)
    assert postfix.attacks.blocks(NOW) == []


def test_role_defaults_to_postfix() -> None:
    # An unknown role is refused when the config is loaded (tests/unit/test_config.py).
    assert Config().milter.role == "postfix"
    assert counts_unknown(Config()) is False
    assert counts_unknown(Config(milter=MilterSettings(role="sendmail"))) is True


@pytest.mark.parametrize(
    ("role", "gauge_class", "counted"),
    [("sendmail", SendmailQueueGauge, 3), ("postfix", PostfixQueueGauge, 0)],
)
def test_runtime_counts_the_queue_of_its_role(
    tmp_path: Path, role: str, gauge_class: type, counted: int
) -> None:
    # A Sendmail queue: three messages (qf), their bodies (df) not counted.
    mqueue = tmp_path / "mqueue"
    (mqueue / "q1").mkdir(parents=True)
    for name in ("qfAB1", "dfAB1", "qfAB2", "dfAB2", "q1/qfAB3", "q1/dfAB3"):
        (mqueue / name).write_bytes(b"")
    config = Config(  # no local domains: nothing else for open_runtime's checks to refuse
        milter=MilterSettings(role=role),
        queue=QueueSettings(directory=str(mqueue), defer_water=2),
        state_dir=str(tmp_path / "state"),
        directory=DirectorySettings(sqlite=str(tmp_path / "directory.sqlite")),
    )
    runtime = open_runtime(config)
    try:
        assert type(runtime.queue) is gauge_class
        assert runtime.engine.queue is runtime.queue  # what RCPT reads, defer_water included
        assert runtime.queue.sample() == counted
    finally:
        runtime.close()


# --------------------------------------------------------------------------- contrib

CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "sendmail"
SENDMAIL_DEFAULT_TIMEOUTS = {"C": 300, "S": 10, "R": 10, "E": 300}  # Sendmail's cf/README


def _listing(readme: str, heading: str) -> list[str]:
    """The numbered lines of the code block under `heading`, numbers removed."""
    block = readme.split(f"## {heading}\n", 1)[1].split("```\n", 2)[1]
    return [re.sub(r"^ *\d+ ", "", line) for line in block.splitlines()]


def test_contrib_mc_lines_are_the_documented_ones_and_match_the_defaults(tmp_path: Path) -> None:
    mc_lines = [
        line
        for line in (CONTRIB / "traqmilter.mc").read_text().splitlines()
        if not line.startswith("dnl")
    ]
    readme = (CONTRIB / "README.md").read_text()
    assert mc_lines == _listing(readme, "sendmail.mc")
    line, routing = mc_lines
    # The outbox action's routing asks the socket map the README's traqmilter.yaml serves
    # (libmilter and Sendmail's socket maps spell inet sockets alike).
    yaml_path = tmp_path / "traqmilter.yaml"
    yaml_path.write_text("\n".join(_listing(readme, "traqmilter.yaml")) + "\n")
    served = load_config(str(yaml_path)).milter.socketmap_listen
    assert routing == (
        f"FEATURE(`ldap_routing', `socket {libmilter_address(served)}', `null', `passthru', "
        "`', `nodomain')dnl"
    )
    match = re.fullmatch(r"INPUT_MAIL_FILTER\(`traqmilter', `S=(\S+), F=T, T=(\S+)'\)dnl", line)
    assert match is not None
    assert match.group(1) == libmilter_address(MilterSettings().listen)
    units = {"s": 1, "m": 60}
    timeouts = {
        key: int(value[:-1]) * units[value[-1]]
        for key, value in (item.split(":") for item in match.group(2).split(";"))
    }
    assert timeouts.keys() == SENDMAIL_DEFAULT_TIMEOUTS.keys()
    assert all(timeouts[k] <= SENDMAIL_DEFAULT_TIMEOUTS[k] for k in timeouts)
    # End of message may hand a DSN over: Sendmail must wait longer than that may take.
    assert timeouts["E"] > BounceSettings().submit_timeout


def test_contrib_yaml_loads_with_the_sendmail_role(tmp_path: Path) -> None:
    readme = (CONTRIB / "README.md").read_text()
    path = tmp_path / "traqmilter.yaml"
    path.write_text("\n".join(_listing(readme, "traqmilter.yaml")) + "\n")
    config = load_config(str(path))
    assert config.milter.role == "sendmail" and counts_unknown(config)
    assert config.bounce.submit == "sendmail"
