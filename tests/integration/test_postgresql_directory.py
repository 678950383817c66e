"""Two MX hosts, one PostgreSQL directory, real servers end to end.

Each host is a private Postfix with its own traqmilter policyd and milter; both read and
write the same database of a private PostgreSQL cluster: traqmilter through
directory.postgresql, Postfix's delivery through contrib/postfix/pgsql-*.cf (as a role
that may only SELECT). Proven here: a mailbox the `create` action makes on host A receives
mail through host B at once (B's cached "unknown" is dropped by the change notification);
and a PostgreSQL outage tempfails mail at RCPT time and defers queued mail, which is
delivered when the server is back: nothing accepted and lost.
"""

from __future__ import annotations

import contextlib
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonProcess
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import PostfixInstance, free_loopback_port
from tests.support.postgresql import (
    READER_PASSWORD,
    READER_ROLE,
    PgDatabase,
    new_database,
    private_cluster,
)
from tests.support.smtp import send_message
from traqmilter.directory.postgresql import PostgresDirectory

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

SENDER = "sender@remote.test"
QUEUE_SECONDS = 30.0


@dataclass
class Host:
    name: str
    postfix: PostfixInstance
    policyd: DaemonProcess
    milter: DaemonProcess

    def send(self, recipient: str) -> int:
        """One message to `recipient`; the code of the reply that ended it."""
        result = send_message(
            self.postfix.host, self.postfix.smtp_port, sender=SENDER, recipients=[recipient]
        )
        reply = result.rcpts[recipient]
        if not reply.positive or result.data is None:
            return reply.code
        return result.data.code


def _config(root: Path, conninfo: str, ports: dict[str, int]) -> str:
    return f"""\
state_dir: {root}/state
directory: {{postgresql: "{conninfo}", postgresql_timeout: 5s}}
domains:
  example.com: {{}}
  shop.example: {{action: create, template: default}}
postmaster: postmaster@example.com
policyd: {{listen: "inet:127.0.0.1:{ports["policyd"]}", \
socketmap_listen: "inet:127.0.0.1:{ports["socketmap"]}"}}
milter: {{listen: "inet:127.0.0.1:{ports["milter"]}"}}
queue: {{directory: {root}/postfix/queue}}
"""


@contextlib.contextmanager
def mx_host(
    stack: contextlib.ExitStack, name: str, database: PgDatabase, relay_port: int
) -> Iterator[Host]:
    root = stack.enter_context(postfix_root())
    (root / "state").mkdir()
    ports = {key: free_loopback_port() for key in ("policyd", "socketmap", "milter")}
    config = root / "traqmilter.yaml"
    config.write_text(_config(root, database.conninfo, ports))
    policyd = stack.enter_context(DaemonProcess(config, "policyd", ports["policyd"]))
    milter = stack.enter_context(DaemonProcess(config, "milter", ports["milter"]))
    cluster = database.cluster
    postfix = PostfixInstance(
        root / "postfix",
        pgsql={
            "hosts": f"{cluster.host}:{cluster.port}",
            "user": READER_ROLE,
            "password": READER_PASSWORD,
            "dbname": database.name,
        },
        relay_port=relay_port,
        policy_port=ports["policyd"],
        milter_port=ports["milter"],
    )
    stack.enter_context(postfix)
    yield Host(name, postfix, policyd, milter)


def _seed(database: PgDatabase) -> None:
    store = PostgresDirectory(database.conninfo)
    try:
        store.bulk_add(["postmaster@example.com", "alice@example.com"])
    finally:
        store.close()


def _probe_rcpt(host: Host, recipient: str) -> int:
    """RCPT TO only (no message): both daemons of the host look the recipient up."""
    client = smtplib.SMTP(host.postfix.host, host.postfix.smtp_port, timeout=30)
    try:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, _ = client.rcpt(recipient)
        client.rset()
        return code
    finally:
        client.quit()


def test_mailbox_created_on_one_host_receives_mail_through_the_other(
    pg_database: PgDatabase, capture_server: object
) -> None:
    require_postfix()
    _seed(pg_database)
    relay_port = capture_server.port  # type: ignore[attr-defined]
    with contextlib.ExitStack() as stack:
        host_a = stack.enter_context(mx_host(stack, "a", pg_database, relay_port))
        host_b = stack.enter_context(mx_host(stack, "b", pg_database, relay_port))
        # Host B looks the new address up first: its daemons now cache "unknown".
        assert _probe_rcpt(host_b, "newbie@shop.example") == 250
        # Host A's milter makes the mailbox (the create action) and delivers to it.
        assert host_a.send("newbie@shop.example") == 250
        host_a.postfix.wait_queue_empty(QUEUE_SECONDS)
        assert len(host_a.postfix.maildir_messages("newbie@shop.example")) == 1
        assert "mailbox created: newbie@shop.example" in host_a.milter.log()
        # Host B: Postfix's pgsql: maps and B's daemons know the mailbox at once.
        mark = host_b.milter.log()
        assert host_b.send("newbie@shop.example") == 250
        host_b.postfix.wait_queue_empty(QUEUE_SECONDS)
        assert len(host_b.postfix.maildir_messages("newbie@shop.example")) == 1
        # B delivered it as a known mailbox: no create plan, no second mailbox.
        assert "newbie@shop.example" not in host_b.milter.log()[len(mark) :]
        store = PostgresDirectory(pg_database.conninfo)
        try:
            box = store.get_mailbox("newbie@shop.example")
            assert box is not None and box.created_by == "create"
            assert store.count_created() == 1
        finally:
            store.close()
        # And an unknown address of a reject domain is still refused on both.
        for host in (host_a, host_b):
            assert host.send("nobody@example.com") == 550


def test_postgresql_outage_tempfails_and_loses_nothing(capture_server: object) -> None:
    require_postfix()
    relay_port = capture_server.port  # type: ignore[attr-defined]
    with private_cluster() as cluster, contextlib.ExitStack() as stack:
        database = new_database(cluster)
        _seed(database)
        host = stack.enter_context(mx_host(stack, "a", database, relay_port))
        # A message accepted while the server is up, held in the queue for now.
        host.postfix.hold_messages(1, "alice@example.com")
        cluster.stop()
        mark = host.postfix.log_mark()
        host.postfix.release_held()
        # Delivery needs the directory: the message is deferred, not bounced or dropped.
        host.postfix.wait_for_log(r"to=<alice@example\.com>.*status=deferred", 30, mark)
        assert host.postfix.queue_size() == 1
        assert host.postfix.maildir_messages("alice@example.com") == []
        # New mail: a temporary refusal for known and unknown recipients alike.
        for recipient in ("alice@example.com", "nobody@example.com", "new@shop.example"):
            code = host.send(recipient)
            assert 400 <= code < 500, (recipient, code)
        assert capture_server.transactions == []  # type: ignore[attr-defined]
        cluster.start()
        # Postfix's pgsql client waits 60 s before it tries a server it found down again
        # (dict_pgsql's fixed retry interval, docs/scale-out.md); a reload ends the wait.
        host.postfix.reload()
        host.postfix.flush()
        host.postfix.wait_queue_empty(QUEUE_SECONDS)
        assert len(host.postfix.maildir_messages("alice@example.com")) == 1
        # traqmilter's daemons reconnect by themselves; until they have, the sender is
        # asked to retry (4xx), never refused or accepted for nothing.
        deadline = time.monotonic() + QUEUE_SECONDS
        while (code := host.send("alice@example.com")) != 250:
            assert 400 <= code < 500 and time.monotonic() < deadline, code
            time.sleep(0.2)
        host.postfix.wait_queue_empty(QUEUE_SECONDS)
        assert len(host.postfix.maildir_messages("alice@example.com")) == 2
        assert host.send("nobody@example.com") == 550
