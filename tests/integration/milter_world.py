"""A private Postfix with traqmilter's milter (and socketmap) in front, for e2e tests.

World starts, below one fresh directory:
- the SQLite recipient directory (traqmilter's own store) with a few mailboxes;
- two capture servers: `outside` (everything Postfix relays: DSNs, re-addressed mail) and
  `mx2` (the outbox relay of split.example);
- `traqmilter milter` and `traqmilter policyd` (which also answers Postfix's transport
  socketmap) as their own processes on loopback TCP ports, as deployed;
- Postfix from contrib/postfix/: the milter, the transport socketmap and the DSN
  submission smtpd that skips the milter, as shipped (`smtpd_reject_unlisted_recipient = no`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import (
    PostfixInstance,
    free_loopback_port,
    prepare_sqlite_directory,
)
from traqmilter.directory.sqlite import SqliteDirectory

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 20.0
QUEUE_SECONDS = 20.0
MAILBOXES = ("alice@example.com", "admin@fwd.example", "postmaster@example.com", "bob@shop.example")

# contrib/postfix/master.cf.fragment's DSN service answers so; a test that needs another
# answer replaces the service with this line.
CONTRIB_DSN_RESTRICTIONS = "permit_mynetworks,reject"
DSN_SERVICE = (
    "127.0.0.1:{port} inet n - n - - smtpd"
    " -o syslog_name=postfix/traqmilter-dsn"
    " -o smtpd_milters="
    " -o mynetworks=127.0.0.0/8"
    " -o smtpd_client_restrictions="
    " -o smtpd_helo_restrictions="
    " -o smtpd_sender_restrictions="
    " -o smtpd_relay_restrictions=permit_mynetworks,reject"
    " -o smtpd_recipient_restrictions={restrictions}"
    " -o smtpd_data_restrictions="
    " -o smtpd_reject_unlisted_recipient=no"
)


def config_yaml(root: Path, *, milter_port: int, mx2_port: int, bounce: str, extra: str) -> str:
    return f"""\
state_dir: {root}/state
directory: {{sqlite: {root}/db/directory.sqlite}}
domains:
  example.com: {{}}
  fwd.example: {{action: forward, forward_to: admin}}
  bounce.example: {{action: bounce}}
  old.example: {{action: readdress, readdress_to: example.net}}
  shop.example: {{action: create, template: bob}}
  split.example: {{action: outbox, outbox_relay: "[127.0.0.1]:{mx2_port}"}}
postmaster: postmaster@example.com
milter: {{listen: "inet:127.0.0.1:{milter_port}"}}
bounce: {bounce}
queue: {{directory: {root}/postfix/queue}}
{extra}"""


@dataclass
class World:
    root: Path
    postfix: PostfixInstance
    milter: DaemonProcess
    policyd: DaemonProcess
    outside: CaptureServer
    mx2: CaptureServer
    store: SqliteDirectory
    config_path: Path
    stack: contextlib.ExitStack = field(repr=False)

    def clear(self) -> None:
        self.outside.clear()
        self.mx2.clear()

    def settle(self) -> None:
        """Wait until Postfix has delivered or relayed everything it accepted."""
        self.postfix.wait_queue_empty(QUEUE_SECONDS)


@contextlib.contextmanager
def milter_world(
    *,
    extra_config: str = "",
    sendmail_submit: bool = False,
    policyd: bool = False,
    dsn_recipient_restrictions: str = CONTRIB_DSN_RESTRICTIONS,
    bounce_config: str = "",
    milters_before: Sequence[str] = (),
    header_checks: Sequence[str] = (),
) -> Iterator[World]:
    """sendmail_submit: hand DSNs over with Postfix's sendmail instead of SMTP.
    policyd: run traqmilter's policyd in front too (else Postfix runs without a policy
    service and the milter's RCPT callback refuses what policyd would).
    bounce_config: more keys of the `bounce` mapping ("authserv_id: x, spf_check: yes").
    milters_before: milter endpoints Postfix calls before traqmilter's (smtpd_milters).
    header_checks: tables Postfix's cleanup applies after the harness's own."""
    require_postfix()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(postfix_root())
        outside = stack.enter_context(CaptureServer())
        mx2 = stack.enter_context(CaptureServer())
        (root / "state").mkdir()
        db = prepare_sqlite_directory(root / "db")
        store = SqliteDirectory(str(db / "directory.sqlite"))
        stack.callback(store.close)
        store.bulk_add(MAILBOXES)
        milter_port, dsn_port, socketmap_port, policy_port = (
            free_loopback_port() for _ in range(4)
        )
        extra_config += (
            f'policyd: {{listen: "inet:127.0.0.1:{policy_port}", '
            f'socketmap_listen: "inet:127.0.0.1:{socketmap_port}"}}\n'
        )

        config_path = root / "traqmilter.yaml"
        if sendmail_submit:
            command = f"[/usr/sbin/sendmail, -C, {root}/postfix/config, -i, -f, '']"
            bounce = f"submit: sendmail, sendmail_command: {command}"
        else:
            bounce = f'smtp_submit: "inet:127.0.0.1:{dsn_port}"'
        bounce = "{" + ", ".join(filter(None, (bounce, bounce_config))) + "}"
        config_path.write_text(
            config_yaml(
                root, milter_port=milter_port, mx2_port=mx2.port, bounce=bounce, extra=extra_config
            )
        )
        # policyd always runs: it answers the transport socketmap (outbox); Postfix asks it
        # at RCPT time only when `policyd` is set.
        policy = stack.enter_context(DaemonProcess(config_path, "policyd", policy_port))
        milter = stack.enter_context(DaemonProcess(config_path, "milter", milter_port))
        contrib_dsn_service = dsn_recipient_restrictions == CONTRIB_DSN_RESTRICTIONS
        postfix = PostfixInstance(
            root / "postfix",
            sqlite_path=db / "directory.sqlite",
            relay_port=outside.port,
            milter_port=milter_port,
            policy_port=policy_port if policyd else None,
            socketmap_port=socketmap_port,
            dsn_port=dsn_port if contrib_dsn_service else None,
            extra_master_cf=[]
            if contrib_dsn_service
            else [DSN_SERVICE.format(port=dsn_port, restrictions=dsn_recipient_restrictions)],
        )
        if milters_before:
            ours = postfix.main_cf()["smtpd_milters"]
            postfix.extra_main_cf["smtpd_milters"] = ", ".join([*milters_before, ours])
        if header_checks:
            own = postfix.main_cf()["header_checks"]
            postfix.extra_main_cf["header_checks"] = ", ".join([own, *header_checks])
        stack.enter_context(postfix)
        yield World(root, postfix, milter, policy, outside, mx2, store, config_path, stack)


def rcpt_each(
    port: int,
    sender: str,
    recipients: Sequence[tuple[str, Sequence[str]]],
    message: bytes,
    *,
    mail_options: Sequence[str] = (),
) -> dict[str, Any]:
    """One SMTP transaction with ESMTP parameters per recipient; every reply returned."""
    import smtplib

    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
    try:
        client.ehlo()
        replies: dict[str, Any] = {"mail": client.mail(sender, list(mail_options))}
        for address, options in recipients:
            replies[address] = client.rcpt(address, list(options))
        try:
            replies["data"] = client.data(message)
        except smtplib.SMTPDataError as refused:
            replies["data"] = (refused.smtp_code, refused.smtp_error)
        return replies
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
