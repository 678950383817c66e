"""What an administrator installs, run as installed: the example configuration of
docs/configuration.md and the Postfix lines of contrib/postfix/, exactly as shipped but
for the placeholders (paths, ports, the mail user), each action through real SMTP.

The private Postfix is built by tests/support/postfix.py from main.cf.fragment and
master.cf.fragment with every traqmilter line in (policy service, milter, transport
socketmap, DSN smtpd) and no extra setting; traqmilter's policyd and milter run as their
own processes on the example file with its endpoints moved to free loopback ports.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess
from tests.support.docs_pages import (
    SHIPPED_BOUNCE_TEMPLATE,
    documented_dsn_from,
    example_mailboxes,
    private_example,
)
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import (
    CONTRIB_DIR,
    CONTRIB_DSN_SERVICE,
    CONTRIB_MAP_DIRECTORY,
    CONTRIB_MILTER_ENDPOINT,
    CONTRIB_POLICY_ENDPOINT,
    CONTRIB_SETTINGS_REPLACED,
    CONTRIB_SOCKETMAP_ENDPOINT,
    LOOPBACK,
    MYHOSTNAME,
    PostfixInstance,
    free_loopback_port,
    parse_main_cf,
    parse_master_cf,
    prepare_sqlite_directory,
)
from tests.support.smtp import SendResult, make_message, send_message
from traqmilter.core.plan import HOP_HEADER, ORIGINAL_TO_HEADER
from traqmilter.directory.sqlite import SqliteDirectory

pytestmark = pytest.mark.postfix

SENDER = "sender@remote.example"
QUEUE_SECONDS = 20.0
# A mailbox of the site besides those the example names (readdress example.net reaches it).
SITE_MAILBOX = "alice@example.com"
CONTRIB_BOUNCE_SUBMIT = f"inet:{CONTRIB_DSN_SERVICE}"


@dataclass
class Site:
    root: Path
    postfix: PostfixInstance
    milter: DaemonProcess
    outside: CaptureServer
    mx2: CaptureServer
    sqlite_path: Path
    ports: dict[str, int]

    def send(self, recipient: str, **options: object) -> SendResult:
        self.postfix.wait_queue_empty(QUEUE_SECONDS)
        self.outside.clear()
        self.mx2.clear()
        return send_message(
            self.postfix.host,
            self.postfix.smtp_port,
            sender=SENDER,
            recipients=[recipient],
            **options,  # type: ignore[arg-type]
        )

    def delivered(self, address: str) -> list[EmailMessage]:
        self.postfix.wait_queue_empty(QUEUE_SECONDS)
        return self.postfix.maildir_messages(address)


def add_mailbox(config: Path, address: str) -> None:
    """As the docs say: `traqmilter mailbox add ADDRESS`."""
    subprocess.run(
        [sys.executable, "-m", "traqmilter", "-c", str(config), "mailbox", "add", address],
        capture_output=True,
        timeout=60,
        check=True,
    )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_postfix()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(postfix_root())
        outside = stack.enter_context(CaptureServer())
        mx2 = stack.enter_context(CaptureServer())
        db = prepare_sqlite_directory(root / "db")
        template = root / "bounce.txt.j2"
        shutil.copyfile(SHIPPED_BOUNCE_TEMPLATE, template)
        ports = {name: free_loopback_port() for name in ("policy", "socketmap", "milter", "dsn")}
        postfix = PostfixInstance(
            root / "postfix",
            sqlite_path=db / "directory.sqlite",
            relay_port=outside.port,
            policy_port=ports["policy"],
            socketmap_port=ports["socketmap"],
            milter_port=ports["milter"],
            dsn_port=ports["dsn"],
        )
        config = root / "traqmilter.yaml"
        config.write_text(
            private_example(
                {
                    "/var/lib/traqmilter": str(db),
                    "/etc/traqmilter/bounce.txt.j2": str(template),
                    "/var/spool/postfix": str(postfix.queue_directory),
                    CONTRIB_POLICY_ENDPOINT: f"inet:{LOOPBACK}:{ports['policy']}",
                    CONTRIB_SOCKETMAP_ENDPOINT: f"inet:{LOOPBACK}:{ports['socketmap']}",
                    CONTRIB_MILTER_ENDPOINT: f"inet:{LOOPBACK}:{ports['milter']}",
                    CONTRIB_BOUNCE_SUBMIT: f"inet:{LOOPBACK}:{ports['dsn']}",
                    "[mx2.example.com]:25": f"[{LOOPBACK}]:{mx2.port}",
                }
            )
        )
        for address in [*example_mailboxes(), SITE_MAILBOX]:
            add_mailbox(config, address)
        # policyd first: it copies the example's domains into the directory Postfix reads.
        stack.enter_context(DaemonProcess(config, "policyd", ports["policy"]))
        milter = stack.enter_context(DaemonProcess(config, "milter", ports["milter"]))
        stack.enter_context(postfix)
        yield Site(root, postfix, milter, outside, mx2, db / "directory.sqlite", ports)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_postfix_runs_the_fragments_as_shipped(site: Site) -> None:
    """Every line of both fragments is in the running configuration, changed only where
    a placeholder was replaced (for master.cf: the services' addresses)."""
    ports = site.ports
    substituted = {
        f"{site.postfix.config_directory}/": CONTRIB_MAP_DIRECTORY,
        f"inet:{LOOPBACK}:{ports['policy']}": CONTRIB_POLICY_ENDPOINT,
        f"inet:{LOOPBACK}:{ports['socketmap']}": CONTRIB_SOCKETMAP_ENDPOINT,
        f"inet:{LOOPBACK}:{ports['milter']}": CONTRIB_MILTER_ENDPOINT,
        f"{LOOPBACK}:{ports['dsn']}": CONTRIB_DSN_SERVICE,
    }

    def as_shipped(value: str) -> str:
        for ours, placeholder in substituted.items():
            value = value.replace(ours, placeholder)
        return value

    running = parse_main_cf((site.postfix.config_directory / "main.cf").read_text())
    shipped = parse_main_cf((CONTRIB_DIR / "main.cf.fragment").read_text())
    for name, value in shipped.items():
        if name in CONTRIB_SETTINGS_REPLACED:
            assert running[name] != value  # this machine's mail root and user
        else:
            assert as_shipped(running[name]) == value, name
    assert shipped["smtpd_reject_unlisted_recipient"] == "no"

    running_services = parse_master_cf((site.postfix.config_directory / "master.cf").read_text())
    for service in parse_master_cf((CONTRIB_DIR / "master.cf.fragment").read_text()):
        name = f"{LOOPBACK}:{site.postfix.smtp_port}" if service[0] == "smtp" else service[0]
        (ran,) = [s for s in running_services if as_shipped(s[0]) == name]
        assert ran[1:] == service[1:]


def test_reject_domain_unknown_recipient_is_refused_by_policyd(site: Site) -> None:
    result = site.send("nobody@example.com")

    reply = result.rcpts["nobody@example.com"]
    assert reply.code == 550
    # policyd's text: Postfix's own ends "User unknown in virtual mailbox table".
    assert reply.text == "5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
    assert result.data is None


def test_known_recipient_is_delivered(site: Site) -> None:
    result = site.send(SITE_MAILBOX, message=make_message(SENDER, [SITE_MAILBOX], "known"))

    assert result.data is not None and result.data.code == 250
    assert "known" in [m["Subject"] for m in site.delivered(SITE_MAILBOX)]


def test_forward_domain_catch_all_gets_the_mail(site: Site) -> None:
    result = site.send("x@example.org", message=make_message(SENDER, ["x@example.org"], "fwd"))

    assert result.data is not None and result.data.code == 250
    (copy,) = [m for m in site.delivered("admin@example.org") if m["Subject"] == "fwd"]
    assert copy[ORIGINAL_TO_HEADER] == "<x@example.org>"
    assert copy[HOP_HEADER] == f"{MYHOSTNAME} (forward)"


def test_exception_forwards_to_its_own_target(site: Site) -> None:
    recipient = "sales-2019@example.com"
    result = site.send(recipient, message=make_message(SENDER, [recipient], "campaign"))

    assert result.data is not None and result.data.code == 250
    (copy,) = [m for m in site.delivered("sales@example.com") if m["Subject"] == "campaign"]
    assert copy[ORIGINAL_TO_HEADER] == f"<{recipient}>"


def test_readdress_domain_delivers_to_the_new_domain(site: Site) -> None:
    message = make_message(SENDER, ["alice@example.net"], "old name")
    result = site.send("alice@example.net", message=message)

    assert result.data is not None and result.data.code == 250
    (copy,) = [m for m in site.delivered(SITE_MAILBOX) if m["Subject"] == "old name"]
    assert copy["Delivered-To"] == SITE_MAILBOX
    assert copy[HOP_HEADER] == f"{MYHOSTNAME} (readdress)"


def test_create_domain_makes_the_mailbox_and_delivers(site: Site) -> None:
    result = site.send("newbie@shop.example")

    assert result.data is not None and result.data.code == 250
    assert [m["Subject"] for m in site.delivered("newbie@shop.example")] == ["test"]
    store = SqliteDirectory(str(site.sqlite_path))
    try:
        box = store.get_mailbox("newbie@shop.example")
    finally:
        store.close()
    assert box is not None and box.created_by == "create"


def test_outbox_domain_relays_unaltered_to_the_other_server(site: Site) -> None:
    message = make_message(SENDER, ["far@split.example"], "split")
    result = site.send("far@split.example", message=message)

    assert result.data is not None and result.data.code == 250
    (relayed,) = site.mx2.wait_for(1, QUEUE_SECONDS)
    assert relayed.mail_from == SENDER and relayed.rcpt_tos == ["far@split.example"]
    assert parse(relayed.data)["Message-ID"] == parse(message)["Message-ID"]


def test_bounce_domain_reports_to_the_sender_through_the_dsn_smtpd(site: Site) -> None:
    mark = site.postfix.log_mark()
    result = site.send("zed@old.example")

    assert result.data is not None and result.data.code == 250
    (dsn,) = site.outside.wait_for(1, QUEUE_SECONDS)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    report = parse(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; zed@old.example" in report.as_string()
    # The From docs/bounce-template.md promises, for this host.
    assert report["From"] == documented_dsn_from().replace("mx.example.com", MYHOSTNAME)
    # Handed to master.cf's DSN smtpd, which runs no milter.
    site.postfix.wait_for_log(r"postfix/traqmilter-dsn/smtpd\[\d+\]: connect from", since=mark)
    site.postfix.wait_queue_empty(QUEUE_SECONDS)
    assert len(site.outside.transactions) == 1  # the original went nowhere


# --- The other value of smtpd_reject_unlisted_recipient, and what `no` costs -----------
# (main.cf.fragment and README.md, line 9): each test changes Postfix and restores it.


@contextlib.contextmanager
def postfix_settings(site: Site, **settings: str) -> Iterator[None]:
    site.postfix.wait_queue_empty(QUEUE_SECONDS)
    site.postfix.reload(settings)
    try:
        yield
    finally:
        for name in settings:
            del site.postfix.extra_main_cf[name]
        site.postfix.reload()


def test_yes_silently_turns_the_accept_time_actions_off(site: Site) -> None:
    with postfix_settings(site, smtpd_reject_unlisted_recipient="yes"):
        result = site.send("x@example.org")

    reply = result.rcpts["x@example.org"]
    assert reply.code == 550  # policyd answered DUNNO; Postfix refused it anyway
    assert reply.text.endswith("User unknown in virtual mailbox table")


def test_no_accepts_unknown_recipients_of_a_domain_traqmilter_does_not_list(site: Site) -> None:
    with postfix_settings(site, mydestination="$myhostname"):
        result = site.send(f"nosuch@{MYHOSTNAME}")
        # Accepted, then bounced to the (possibly forged) sender: list such domains in
        # traqmilter's `domains:`, or keep mydestination to localhost.
        assert result.rcpts[f"nosuch@{MYHOSTNAME}"].code == 250
        (report,) = site.outside.wait_for(1, QUEUE_SECONDS)
        assert report.mail_from == "" and report.rcpt_tos == [SENDER]
