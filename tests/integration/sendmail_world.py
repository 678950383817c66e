"""A private Sendmail with traqmilter's milter in the sendmail role, for e2e tests.

World starts, below one fresh directory:
- the SQLite recipient directory (traqmilter's own store) with a few mailboxes;
- `outside`, a capture server: the mailbox server and the Internet, where Sendmail relays
  everything it accepts (tests/support/sendmail.py);
- `traqmilter milter` with `role: sendmail` as its own process, on a loopback TCP port
  (or a unix socket), as docs/sendmail.md sets it up: DSNs handed to Sendmail's own
  submission program (submit.cf, FEATURE(msp): what Debian's /usr/sbin/sendmail runs),
  which passes them over SMTP to the daemon, so through the milter again; the queue
  gauge reading Sendmail's queue;
- Sendmail built from contrib/sendmail/traqmilter.mc, accepting every recipient of the
  test's domains (relay domains) and asking the milter at each RCPT;
- `mx2`, the other server of the split (outbox) domain: a capture server on MX2_HOST, on
  the same port as `outside` (Sendmail's relay mailer has one port), where Sendmail relays
  the outbox domain's unknown recipients as the milter's socket map says.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer, RcptReply, accept_every_recipient
from tests.support.daemon_process import DaemonProcess
from tests.support.fixtures import require_sendmail
from tests.support.postfix import free_loopback_port
from tests.support.sendmail import SENDMAIL, SendmailInstance, socket_directory
from tests.support.smtp import SendResult, send_message
from traqmilter.directory.sqlite import SqliteDirectory

QUEUE_SECONDS = 20.0
MAILBOXES = (
    "alice@example.com",
    "hostmaster@example.com",
    "admin@fwd.example",
    "postmaster@example.com",
    "bob@shop.example",
    "carol@split.example",
)
DOMAINS = (
    "example.com",
    "fwd.example",
    "bounce.example",
    "old.example",
    "shop.example",
    "split.example",
)
THRESHOLD = 3
MX2_HOST = "127.0.0.2"
OUTBOX_DOMAINS = ("split.example",)
# The client the action tests connect from; the tests that count use other loopback ones.
EXEMPT = "127.0.0.1"
# How the milter may run: as root (the default), or as `nobody` from the start, the way
# systemd's User= runs it, with CAP_DAC_READ_SEARCH as systemd's AmbientCapabilities=
# gives it ("capability"), with read access to the queue through its group ("group"), or
# with neither ("unprivileged").
IDENTITIES = ("root", "capability", "group", "unprivileged")
UNPRIVILEGED_USER, UNPRIVILEGED_GROUP = "nobody", "nogroup"


def unprivileged_prefix(root: Path, identity: str) -> tuple[str, ...]:
    """The command that runs the milter as UNPRIVILEGED_USER with the given identity.
    This machine's Python may live below /root (mode 0700), where `nobody` cannot reach
    it: a private mount namespace shows /root as a 0755 directory that holds only
    .pyenv (the interpreter), so nothing else of root's becomes readable."""
    home = root / "root-view"
    (home / ".pyenv").mkdir(parents=True)
    (root / "pyenv").mkdir()
    home.chmod(0o755)
    capabilities = (
        [
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--bounding-set=-all,+dac_read_search",
        ]
        if identity == "capability"
        else ["--inh-caps=-all", "--bounding-set=-all"]
    )
    script = " && ".join(
        [
            f"mount --bind /root/.pyenv {root}/pyenv",
            f"mount --bind {home} /root",
            f"mount --bind {root}/pyenv /root/.pyenv",
            'exec "$@"',
        ]
    )
    return (
        "/usr/bin/unshare",
        "--mount",
        "/bin/sh",
        "-c",
        script,
        "sh",
        "/usr/bin/setpriv",
        f"--reuid={UNPRIVILEGED_USER}",
        f"--regid={UNPRIVILEGED_GROUP}",
        "--clear-groups",
        *capabilities,
        "--",
    )


def config_yaml(
    root: Path,
    *,
    listen: str,
    socketmap_listen: str,
    sendmail_command: list[str],
    extra: str,
    attack: str = "",
    bounce: str = "",
) -> str:
    command = ", ".join(f"'{word}'" for word in sendmail_command)
    return f"""\
state_dir: {root}/state
directory: {{sqlite: {root}/db/directory.sqlite}}
domains:
  example.com: {{}}
  fwd.example: {{action: forward, forward_to: admin}}
  bounce.example: {{action: bounce}}
  old.example: {{action: readdress, readdress_to: example.net}}
  shop.example: {{action: create, template: bob}}
  split.example: {{action: outbox, outbox_relay: "[{MX2_HOST}]"}}
postmaster: postmaster@example.com
milter: {{listen: "{listen}", role: sendmail, socketmap_listen: "{socketmap_listen}"}}
dictionary_attack: {{threshold: {THRESHOLD}, exempt: [{EXEMPT}/32], {attack}}}
bounce: {{submit: sendmail, sendmail_command: [{command}, -i, -f, ''], {bounce}}}
{extra}"""


SENDER = "sender@remote.example"
# The SMTP replies the tests saw, for docs/sendmail-transcripts.txt (scripts/sendmail-transcripts).
TRANSCRIPTS: list[str] = []


def transcript(title: str, sender: str, result: SendResult) -> None:
    """Keep the replies of one session for TRAQMILTER_SENDMAIL_TRANSCRIPTS."""
    lines = [f"== {title}", f"MAIL FROM:<{sender}>  ->  {result.mail}"]
    lines += [f"RCPT TO:<{rcpt}>  ->  {reply}" for rcpt, reply in result.rcpts.items()]
    if result.data is not None:
        lines.append(f"DATA ... .  ->  {result.data}")
    TRANSCRIPTS.append("\n".join(lines))


def record(title: str, *lines: str) -> None:
    TRANSCRIPTS.append("\n".join([f"== {title}", *lines]))


@pytest.fixture(scope="module", autouse=True)
def write_transcripts_at_end() -> Iterator[None]:
    """At the end of a module that imports this fixture, append what was kept to the file
    TRAQMILTER_SENDMAIL_TRANSCRIPTS names (if any), and forget it."""
    yield
    path = os.environ.get("TRAQMILTER_SENDMAIL_TRANSCRIPTS")
    if path and TRANSCRIPTS:
        with open(path, "a", encoding="utf-8") as out:
            out.write("\n\n".join(TRANSCRIPTS) + "\n\n")
    TRANSCRIPTS.clear()


@dataclass
class World:
    root: Path
    sendmail: SendmailInstance
    milter: DaemonProcess
    outside: CaptureServer
    mx2: CaptureServer
    store: SqliteDirectory
    config_path: Path

    def clear(self) -> None:
        self.outside.clear()
        self.mx2.clear()

    def settle(self) -> None:
        """Wait until Sendmail has relayed everything it accepted."""
        self.sendmail.wait_queue_empty(QUEUE_SECONDS)


@contextlib.contextmanager
def sendmail_world(
    *,
    unix_socket: bool = False,
    queue_limits: str = "",
    identity: str = "root",
    mx2_rcpt_reply: RcptReply = accept_every_recipient,
    dictionary_attack: str = "",
    bounce: str = "",
    extra_config: str = "",
    sasl_users: dict[str, str] | None = None,
    milters_before: tuple[str, ...] = (),
    mailboxes: tuple[str, ...] = (),
) -> Iterator[World]:
    """unix_socket: the milter listens on a unix socket (Sendmail's S=local:...).
    queue_limits: more `queue:` settings ("high_water: 1, ..."). identity: how the milter
    runs (IDENTITIES). mx2_rcpt_reply: the outbox relay's answer to each RCPT.
    dictionary_attack: more `dictionary_attack:` settings ("disconnect: true").
    bounce: more `bounce:` settings ("authserv_id: ..."). extra_config: more top-level
    settings (YAML lines). sasl_users: logins and passwords Sendmail accepts in SMTP AUTH
    (SendmailInstance). milters_before: milters Sendmail runs before traqmilter.
    mailboxes: more mailboxes in the directory, besides MAILBOXES."""
    assert identity in IDENTITIES
    require_sendmail()
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="traqmilter-sendmail-"))
        stack.callback(shutil.rmtree, root)
        root.chmod(0o755)  # Sendmail's submission program runs as nobody below it
        outside = stack.enter_context(CaptureServer())
        mx2 = stack.enter_context(
            CaptureServer(rcpt_reply=mx2_rcpt_reply, host=MX2_HOST, port=outside.port)
        )
        (root / "state").mkdir()
        (root / "db").mkdir()
        store = SqliteDirectory(str(root / "db" / "directory.sqlite"))
        stack.callback(store.close)
        store.bulk_add((*MAILBOXES, *mailboxes))
        milter_port = free_loopback_port()
        socket_path = None
        if unix_socket:
            sockets = socket_directory()
            stack.callback(shutil.rmtree, sockets)
            socket_path = sockets / "milter.sock"
            listen, milter_socket = f"unix:{socket_path}", f"local:{socket_path}"
            map_path = sockets / "socketmap.sock"
            socketmap_listen, socketmap_socket = f"unix:{map_path}", f"local:{map_path}"
        else:
            listen = f"inet:127.0.0.1:{milter_port}"
            milter_socket = f"inet:{milter_port}@127.0.0.1"
            map_port = free_loopback_port()
            socketmap_listen = f"inet:127.0.0.1:{map_port}"
            socketmap_socket = f"inet:{map_port}@127.0.0.1"
        sendmail = SendmailInstance(
            root / "sendmail",
            milter_socket=milter_socket,
            socketmap_socket=socketmap_socket,
            relay_port=outside.port,
            relay_domains=DOMAINS,
            outbox_domains=OUTBOX_DOMAINS,
            queue_group=UNPRIVILEGED_GROUP if identity == "group" else "",
            sasl_users=sasl_users,
            milters_before=milters_before,
        )
        config_path = root / "traqmilter.yaml"
        config_path.write_text(
            config_yaml(
                root,
                listen=listen,
                socketmap_listen=socketmap_listen,
                sendmail_command=sendmail.namespace_argv(
                    str(SENDMAIL), "-C", str(sendmail.submit_cf_path)
                ),
                extra=f"queue: {{directory: {sendmail.queue_directory}, {queue_limits}}}\n"
                + extra_config,
                attack=dictionary_attack,
                bounce=bounce,
            )
        )
        stack.enter_context(sendmail)  # first: the queue gauge finds its queue at start
        prefix: tuple[str, ...] = ()
        if identity != "root":
            prefix = unprivileged_prefix(root, identity)
            # The milter's own state and directory are its user's, as in /var/lib.
            for path in (root / "state", root / "db", *(root / "db").iterdir()):
                shutil.chown(path, UNPRIVILEGED_USER, UNPRIVILEGED_GROUP)
            os.chmod(root / "db", 0o750)
        milter = stack.enter_context(
            DaemonProcess(
                config_path,
                "milter",
                milter_port,
                unix_path=socket_path,
                prefix=prefix,
            )
        )
        yield World(root, sendmail, milter, outside, mx2, store, config_path)


def send(
    world: World,
    title: str,
    recipients: Sequence[str],
    *,
    sender: str = SENDER,
    client: str = EXEMPT,
    **options: object,
) -> SendResult:
    """One SMTP transaction into the world's Sendmail from `client`, its replies kept for
    the transcripts under `title`; `options` as send_message's."""
    result = send_message(
        world.sendmail.host,
        world.sendmail.smtp_port,
        sender=sender,
        recipients=recipients,
        source_address=client,
        **options,  # type: ignore[arg-type]
    )
    transcript(title, sender, result)
    return result
