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
  test's domains (relay domains) and asking the milter at each RCPT.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess
from tests.support.fixtures import require_sendmail
from tests.support.postfix import free_loopback_port
from tests.support.sendmail import SENDMAIL, SendmailInstance, socket_directory
from traqmilter.directory.sqlite import SqliteDirectory

QUEUE_SECONDS = 20.0
MAILBOXES = ("alice@example.com", "admin@fwd.example", "postmaster@example.com", "bob@shop.example")
DOMAINS = (
    "example.com",
    "fwd.example",
    "bounce.example",
    "old.example",
    "shop.example",
    "split.example",
)
THRESHOLD = 3
# The client the action tests connect from; the tests that count use other loopback ones.
EXEMPT = "127.0.0.1"


def config_yaml(
    root: Path, *, listen: str, mx2_port: int, sendmail_command: list[str], extra: str
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
  split.example: {{action: outbox, outbox_relay: "[127.0.0.1]:{mx2_port}"}}
postmaster: postmaster@example.com
milter: {{listen: "{listen}", role: sendmail}}
dictionary_attack: {{threshold: {THRESHOLD}, exempt: [{EXEMPT}/32]}}
bounce: {{submit: sendmail, sendmail_command: [{command}, -i, -f, '']}}
{extra}"""


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
def sendmail_world(*, unix_socket: bool = False, queue_limits: str = "") -> Iterator[World]:
    """unix_socket: the milter listens on a unix socket (Sendmail's S=local:...).
    queue_limits: more `queue:` settings ("high_water: 1, ...")."""
    require_sendmail()
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="traqmilter-sendmail-"))
        stack.callback(shutil.rmtree, root)
        root.chmod(0o755)  # Sendmail's submission program runs as nobody below it
        outside = stack.enter_context(CaptureServer())
        mx2 = stack.enter_context(CaptureServer())
        (root / "state").mkdir()
        (root / "db").mkdir()
        store = SqliteDirectory(str(root / "db" / "directory.sqlite"))
        stack.callback(store.close)
        store.bulk_add(MAILBOXES)
        milter_port = free_loopback_port()
        socket_path = None
        if unix_socket:
            sockets = socket_directory()
            stack.callback(shutil.rmtree, sockets)
            socket_path = sockets / "milter.sock"
            listen, milter_socket = f"unix:{socket_path}", f"local:{socket_path}"
        else:
            listen = f"inet:127.0.0.1:{milter_port}"
            milter_socket = f"inet:{milter_port}@127.0.0.1"
        sendmail = SendmailInstance(
            root / "sendmail",
            milter_socket=milter_socket,
            relay_port=outside.port,
            relay_domains=DOMAINS,
        )
        config_path = root / "traqmilter.yaml"
        config_path.write_text(
            config_yaml(
                root,
                listen=listen,
                mx2_port=mx2.port,
                sendmail_command=sendmail.namespace_argv(
                    str(SENDMAIL), "-C", str(sendmail.submit_cf_path)
                ),
                extra=f"queue: {{directory: {sendmail.queue_directory}, {queue_limits}}}\n",
            )
        )
        stack.enter_context(sendmail)  # first: the queue gauge finds its queue at start
        milter = stack.enter_context(
            DaemonProcess(
                config_path,
                "milter",
                milter_port,
                unix_path=socket_path,
            )
        )
        yield World(root, sendmail, milter, outside, mx2, store, config_path)
