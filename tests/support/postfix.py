"""PostfixInstance: a private, real Postfix for integration tests (run as root).

Every instance lives in its own directory: configuration, queue, data directory, log
file and Maildir tree. Its main.cf and master.cf are built FROM contrib/postfix/, so the
configuration we ship is the configuration the tests run; the harness only adds what
names this machine (paths, ports, users, short timers) and fails loudly if the contrib
files stop matching what it expects to replace.

Mail routing inside an instance:
- smtpd listens on 127.0.0.1:`smtp_port` only (a free port from 20000-29999: the kernel
  never hands those to client sockets, so it is still free when Postfix binds it).
- Local domains are the virtual domains of the SQLite directory; virtual(8) delivers into
  Maildirs below `mail_directory` as nobody/nogroup.
- Everything else goes to 127.0.0.1:`relay_port` (a CaptureServer); DNS is off.
- mynetworks is TRUSTED_CLIENT (127.0.0.2) only. Tests connect from 127.0.0.1 by default
  and so are an untrusted Internet client; connect from TRUSTED_CLIENT to relay to remote
  domains. Both pass through the policy service, as in contrib.
- Mail with the header HOLD_HEADER is put on hold by cleanup(8) (header_checks); it is
  submitted with sendmail(1), so no smtpd restriction or policy answer can stop it, which
  lets a test fill the queue deterministically (hold_messages, release_held, delete_queued).

SECURITY: root only; every listener is on loopback, every path below `root`.
"""

from __future__ import annotations

import email
import email.policy
import grp
import os
import pwd
import random
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType

from tests.support.children import process_group_members

CONTRIB_DIR = Path(__file__).resolve().parents[2] / "contrib" / "postfix"
SQLITE_MAP_FILES = ("sqlite-domains.cf", "sqlite-mailboxes.cf", "sqlite-aliases.cf")
PGSQL_MAP_FILES = ("pgsql-domains.cf", "pgsql-mailboxes.cf", "pgsql-aliases.cf")
DIRECTORY_MAP_SETTINGS = ("virtual_mailbox_domains", "virtual_mailbox_maps", "virtual_alias_maps")

# The placeholders of the contrib files (main.cf.fragment lists them at its top), each
# replaced with this instance's own value; nothing else of the contrib files is changed.
CONTRIB_SQLITE_PATH = "/var/lib/traqmilter/directory.sqlite"
CONTRIB_MAP_DIRECTORY = "/etc/postfix/traqmilter/"
CONTRIB_POLICY_ENDPOINT = "inet:127.0.0.1:10040"
CONTRIB_MILTER_ENDPOINT = "inet:127.0.0.1:8891"
CONTRIB_SOCKETMAP_ENDPOINT = "inet:127.0.0.1:10041"
CONTRIB_DSN_SERVICE = "127.0.0.1:10026"
# The connection lines of contrib/postfix/pgsql-*.cf.
CONTRIB_PGSQL_SETTINGS = {
    "hosts": "127.0.0.1",
    "user": "postfix_reader",
    "password": "CHANGE-ME",
    "dbname": "traqmilter",
}
CONTRIB_MAIL_ROOT = "/var/mail/vhosts"
CONTRIB_MAIL_IDS = "static:5000"
# main.cf settings whose whole value is a placeholder; the harness supplies its own.
CONTRIB_SETTINGS_REPLACED = {
    "virtual_mailbox_base": CONTRIB_MAIL_ROOT,
    "virtual_uid_maps": CONTRIB_MAIL_IDS,
    "virtual_gid_maps": CONTRIB_MAIL_IDS,
}
CONTRIB_PLACEHOLDERS = (
    CONTRIB_MAP_DIRECTORY,
    CONTRIB_SQLITE_PATH,
    CONTRIB_POLICY_ENDPOINT,
    CONTRIB_MILTER_ENDPOINT,
    CONTRIB_SOCKETMAP_ENDPOINT,
    CONTRIB_DSN_SERVICE,
    CONTRIB_MAIL_ROOT,
    CONTRIB_MAIL_IDS,
)

LOOPBACK = "127.0.0.1"
TRUSTED_CLIENT = "127.0.0.2"
HOLD_SENDER = "hold@hold.invalid"
HOLD_HEADER = "X-Traqmilter-Test-Hold: yes"
MYHOSTNAME = "mx.traqmilter.test"
# The queues traqmilter's queue gauge counts.
COUNTED_QUEUES = ("incoming", "active", "deferred", "hold")

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
SENDMAIL = "/usr/sbin/sendmail"
COMMAND_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10.0
LOG_SECONDS = 30.0  # postlogd writes the log: a line can lag its event on a loaded machine
RELOAD_TIMEOUT_SECONDS = 30.0  # a busy process finishes its delivery first
POLL_SECONDS = 0.02

# Every service Postfix needs besides the contrib smtpd line, all with chroot off.
BASE_MASTER_CF = """\
pickup     unix  n  -  n  60    1  pickup
cleanup    unix  n  -  n  -     0  cleanup
qmgr       unix  n  -  n  300   1  qmgr
rewrite    unix  -  -  n  -     -  trivial-rewrite
bounce     unix  -  -  n  -     0  bounce
defer      unix  -  -  n  -     0  bounce
trace      unix  -  -  n  -     0  bounce
verify     unix  -  -  n  -     1  verify
flush      unix  n  -  n  1000? 0  flush
proxymap   unix  -  -  n  -     -  proxymap
proxywrite unix  -  -  n  -     1  proxymap
smtp       unix  -  -  n  -     -  smtp
relay      unix  -  -  n  -     -  smtp
showq      unix  n  -  n  -     -  showq
error      unix  -  -  n  -     -  error
retry      unix  -  -  n  -     -  error
discard    unix  -  -  n  -     -  discard
local      unix  -  n  n  -     -  local
virtual    unix  -  n  n  -     -  virtual
lmtp       unix  -  -  n  -     -  lmtp
anvil      unix  -  -  n  -     1  anvil
scache     unix  -  -  n  -     1  scache
postlog    unix-dgram n - n - 1 postlogd
"""


class PostfixError(RuntimeError):
    """A Postfix command failed or Postfix did not do what the harness waited for."""


def postfix_unavailable_reason() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    for program in (POSTFIX, POSTQUEUE, POSTSUPER, "/usr/lib/postfix/sbin/master"):
        if not os.access(program, os.X_OK):
            return f"{program} is missing (apt-get install postfix postfix-sqlite)"
    if not Path("/usr/lib/postfix/postfix-sqlite.so").exists():
        return "the sqlite: map type is missing (apt-get install postfix-sqlite)"
    return None


# --- Reading the contrib files -------------------------------------------------------


def parse_main_cf(text: str) -> dict[str, str]:
    """Parse main.cf syntax: `name = value`, whitespace-led continuation lines, # comments.

    Continuation lines are joined with one space; the order of the file is kept.
    """
    settings: dict[str, str] = {}
    name: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if name is None:
                raise ValueError(f"line {number}: continuation before any setting")
            settings[name] = f"{settings[name]} {stripped}".strip()
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not name:
            raise ValueError(f"line {number}: not `name = value`: {line!r}")
        settings[name] = value
    return settings


def parse_master_cf(text: str) -> list[list[str]]:
    """Parse master.cf syntax into entries of whitespace-separated fields."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not entries:
                raise ValueError(f"continuation before any service: {line!r}")
            entries[-1].extend(stripped.split())
        else:
            entries.append(stripped.split())
    return entries


def split_restrictions(value: str) -> list[str]:
    """Split a restriction list as Postfix does: at commas and white space, except inside
    { } groups (`check_policy_service { inet:..., timeout=10s }` is two items)."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == 0 and char in ", \t\n":
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced braces in {value!r}")
    if current:
        items.append("".join(current))
    return items


def without_restriction(value: str, restriction: str) -> str:
    """`value` with `restriction` and its one argument removed."""
    items = split_restrictions(value)
    if restriction not in items:
        raise ValueError(f"{restriction} is not in {value!r}")
    at = items.index(restriction)
    del items[at : at + 2]
    return ", ".join(items)


def _replace_exactly(text: str, old: str, new: str, where: str) -> str:
    if old not in text:
        raise PostfixError(f"{where} no longer contains {old!r}; update tests/support/postfix.py")
    return text.replace(old, new)


# --- Small OS helpers ------------------------------------------------------------------


def free_loopback_port() -> int:
    """A currently free TCP port on 127.0.0.1 in 20000-29999 (outside the kernel's range
    for client sockets, so no outgoing connection takes it before Postfix binds it)."""
    for _attempt in range(200):
        port = random.randint(20000, 29999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise PostfixError("no free port in 127.0.0.1:20000-29999")


def _check_reachable(path: Path, what: str) -> None:
    """Postfix's daemons run as `postfix` or `nobody`: every directory above `path` must be
    searchable by others (tempfile.mkdtemp and pytest's tmp_path are 0700)."""
    for directory in reversed(path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise ValueError(f"{what} {path}: {directory} is not searchable by others (o+x)")


def prepare_sqlite_directory(directory: Path) -> Path:
    """Create `directory` for the SQLite recipient directory as a deployment must: group
    `postfix`, mode 2770. Postfix opens the WAL database read-only as user `postfix` and
    must be able to create its -shm and -wal files there (SQLite copies the database
    file's mode to them, and the set-group-ID bit gives them group `postfix`)."""
    directory.mkdir(exist_ok=True)
    os.chown(directory, 0, grp.getgrnam("postfix").gr_gid)
    directory.chmod(0o2770)
    return directory


def _check_sqlite_readable(path: Path) -> None:
    postfix_gid = grp.getgrnam("postfix").gr_gid
    _check_reachable(path.parent, "sqlite_path")
    for target, need, what in (
        (path.parent, stat.S_IWGRP | stat.S_IXGRP, "group-writable"),
        (path, stat.S_IRGRP, "group-readable"),
    ):
        status = target.stat()
        if status.st_gid != postfix_gid or status.st_mode & need != need:
            raise ValueError(
                f"sqlite_path: {target} must be group postfix and {what} "
                "(see prepare_sqlite_directory)"
            )


def _is_postfix_master(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "master"
    except OSError:
        return False


def _process_list(pids: Iterable[int]) -> str:
    """One "PID command line" line per process, for an error message."""
    lines = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            command = "(gone)"
        lines.append(f"{pid} {command}")
    return "\n".join(lines)


# --- The instance ------------------------------------------------------------------------


class PostfixInstance:
    """A private Postfix below `root`, configured from contrib/postfix/.

    `sqlite_path` is the recipient directory (SCHEMA.md), or `pgsql` names a shared
    PostgreSQL directory instead ({"hosts", "user", "password", "dbname"}: Postfix then reads
    contrib/postfix/pgsql-*.cf in place of the sqlite ones); `relay_port` the loopback port of
    the CaptureServer that receives all non-local mail. `policy_port` / `milter_port`: the
    policy service and milter endpoints on 127.0.0.1; `socketmap_port` the transport
    socketmap (outbox); `dsn_port` the DSN-submission smtpd of master.cf. None (the
    default) leaves that contrib line out, for tests without that daemon or service.
    `extra_main_cf` settings and `extra_master_cf` lines are applied last.

    Use as a context manager, or start() and stop(); stop() always leaves no process.
    """

    def __init__(
        self,
        root: Path,
        *,
        sqlite_path: Path | None = None,
        pgsql: Mapping[str, str] | None = None,
        relay_port: int,
        policy_port: int | None = None,
        milter_port: int | None = None,
        socketmap_port: int | None = None,
        dsn_port: int | None = None,
        extra_main_cf: Mapping[str, str] | None = None,
        extra_master_cf: Sequence[str] = (),
    ) -> None:
        if (sqlite_path is None) == (pgsql is None):
            raise ValueError("name one directory: sqlite_path or pgsql")
        self.root = root.resolve()
        self.sqlite_path = sqlite_path.resolve() if sqlite_path is not None else None
        self.pgsql = dict(pgsql) if pgsql is not None else None
        self.relay_port = relay_port
        self.policy_port = policy_port
        self.milter_port = milter_port
        self.socketmap_port = socketmap_port
        self.dsn_port = dsn_port
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_master_cf = list(extra_master_cf)
        self.host = LOOPBACK
        self.smtp_port = free_loopback_port()
        self.config_directory = self.root / "config"
        self.queue_directory = self.root / "queue"
        self.data_directory = self.root / "data"
        self.mail_directory = self.root / "mail"
        self.log_path = self.root / "maillog"
        self._master_pid: int | None = None

    @property
    def master_pid(self) -> int | None:
        """The master process while the instance runs, else None."""
        return self._master_pid

    # --- configuration

    def main_cf(self) -> dict[str, str]:
        """The complete main.cf settings: contrib fragment, then this machine, then extras."""
        fragment = (CONTRIB_DIR / "main.cf.fragment").read_text()
        fragment = _replace_exactly(
            fragment, CONTRIB_MAP_DIRECTORY, f"{self.config_directory}/", "main.cf.fragment"
        )
        contrib = parse_main_cf(fragment)
        for name, placeholder in CONTRIB_SETTINGS_REPLACED.items():
            if contrib.get(name) != placeholder:
                raise PostfixError(
                    f"main.cf.fragment: {name} is no longer {placeholder!r}; update the harness"
                )
        restrictions = contrib["smtpd_recipient_restrictions"]
        if self.policy_port is None:
            restrictions = without_restriction(restrictions, "check_policy_service")
        else:
            restrictions = _replace_exactly(
                restrictions,
                CONTRIB_POLICY_ENDPOINT,
                f"inet:{LOOPBACK}:{self.policy_port}",
                "smtpd_recipient_restrictions",
            )
        contrib["smtpd_recipient_restrictions"] = restrictions
        if self.socketmap_port is None:
            del contrib["transport_maps"]
        else:
            contrib["transport_maps"] = _replace_exactly(
                contrib["transport_maps"],
                CONTRIB_SOCKETMAP_ENDPOINT,
                f"inet:{LOOPBACK}:{self.socketmap_port}",
                "transport_maps",
            )
        if self.milter_port is None:
            del contrib["smtpd_milters"]
        else:
            contrib["smtpd_milters"] = _replace_exactly(
                contrib["smtpd_milters"],
                CONTRIB_MILTER_ENDPOINT,
                f"inet:{LOOPBACK}:{self.milter_port}",
                "smtpd_milters",
            )
        if self.pgsql is not None:
            for name in DIRECTORY_MAP_SETTINGS:
                contrib[name] = _replace_exactly(
                    contrib[name], "proxy:sqlite:", "proxy:pgsql:", name
                ).replace("/sqlite-", "/pgsql-")
        machine = self._machine_settings()
        clashes = (contrib.keys() & machine.keys()) - CONTRIB_SETTINGS_REPLACED.keys()
        if clashes:
            raise PostfixError(f"the harness would override contrib settings {sorted(clashes)}")
        return {**contrib, **machine, **self.extra_main_cf}

    def _machine_settings(self) -> dict[str, str]:
        relay = f"[{LOOPBACK}]:{self.relay_port}"
        return {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_directory),
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": MYHOSTNAME,
            "mydomain": "traqmilter.test",
            "myorigin": "$myhostname",
            # No local(8) domains: every local domain is a virtual one from the directory.
            "mydestination": "",
            "local_transport": "error:5.1.1 local delivery is disabled in this test instance",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": f"{TRUSTED_CLIENT}/32",
            # All non-local mail, whatever the route, goes to the capture server; no DNS.
            "relayhost": relay,
            "default_transport": f"smtp:{relay}",
            "relay_transport": f"smtp:{relay}",
            "smtp_bind_address": LOOPBACK,
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "header_checks": f"regexp:{self.config_directory}/hold-header",
            "virtual_mailbox_base": str(self.mail_directory),
            "virtual_uid_maps": f"static:{pwd.getpwnam('nobody').pw_uid}",
            "virtual_gid_maps": f"static:{grp.getgrnam('nogroup').gr_gid}",
            # There is no /dev/log here: postlogd writes this file.
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            # Short timers: deferred mail is retried within seconds, nothing waits for
            # flow control or sleeps after client errors.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "transport_retry_time": "1s",
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "notify_classes": "resource, software",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "smtpd_banner": "$myhostname ESMTP",
        }

    def master_cf(self) -> str:
        """master.cf: the contrib smtpd line bound to 127.0.0.1:smtp_port, every other
        service Postfix needs, then `extra_master_cf`. The contrib services keep their
        chroot column (the smtpd is chrooted into this instance's queue directory)."""
        entries = parse_master_cf((CONTRIB_DIR / "master.cf.fragment").read_text())
        entries += parse_master_cf(BASE_MASTER_CF)
        lines = []
        for fields in entries:
            name, kind = fields[0], fields[1]
            if kind == "inet":
                if name == CONTRIB_DSN_SERVICE:
                    if self.dsn_port is None:
                        continue
                    name = f"{LOOPBACK}:{self.dsn_port}"
                elif name == "smtp":
                    name = f"{LOOPBACK}:{self.smtp_port}"
                else:
                    raise PostfixError(f"master.cf.fragment: unexpected inet service {name}")
            lines.append(" ".join([name, kind, *fields[2:]]))
        return "\n".join([*lines, *self.extra_master_cf, ""])

    def _write_config(self) -> None:
        self.config_directory.mkdir(parents=True, exist_ok=True)
        if self.pgsql is not None:
            for name in PGSQL_MAP_FILES:
                text = (CONTRIB_DIR / name).read_text()
                for key, placeholder in CONTRIB_PGSQL_SETTINGS.items():
                    text = _replace_exactly(
                        text, f"{key} = {placeholder}\n", f"{key} = {self.pgsql[key]}\n", name
                    )
                (self.config_directory / name).write_text(text)
        else:
            for name in SQLITE_MAP_FILES:
                text = _replace_exactly(
                    (CONTRIB_DIR / name).read_text(),
                    CONTRIB_SQLITE_PATH,
                    str(self.sqlite_path),
                    name,
                )
                (self.config_directory / name).write_text(text)
        (self.config_directory / "hold-header").write_text(f"/^{HOLD_HEADER}$/ HOLD\n")
        main_cf = "".join(f"{name} = {value}\n" for name, value in self.main_cf().items())
        (self.config_directory / "main.cf").write_text(main_cf)
        (self.config_directory / "master.cf").write_text(self.master_cf())

    def _make_directories(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        _check_reachable(self.root, "root")
        if self.sqlite_path is not None:
            _check_sqlite_readable(self.sqlite_path)
        self.queue_directory.mkdir(mode=0o755, exist_ok=True)
        self.data_directory.mkdir(mode=0o700, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_directory, postfix_user.pw_uid, postfix_user.pw_gid)
        # virtual(8) creates each Maildir as the mailbox user.
        self.mail_directory.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_directory, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)

    # --- life cycle

    def _postfix(self, *arguments: str, program: str = POSTFIX) -> str:
        completed = subprocess.run(
            [program, "-c", str(self.config_directory), *arguments],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            raise PostfixError(
                f"{program} {' '.join(arguments)} failed ({completed.returncode}):\n"
                f"{completed.stdout}{completed.stderr}\nmaillog:\n{self.log_text()[-4000:]}"
            )
        return completed.stdout

    def start(self) -> PostfixInstance:
        """Write the configuration and start Postfix; smtpd accepts mail on return."""
        if self._master_pid is not None:
            raise PostfixError("already started")
        self._make_directories()
        self._write_config()
        try:
            self._postfix("start")
            pid_text = (self.queue_directory / "pid" / "master.pid").read_text()
            self._master_pid = int(pid_text.split()[0])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Postfix and every process it started; safe to call more than once.

        Equivalent to `postfix stop` without its one-second polling: SIGTERM to the
        master, which terminates its process group (about 1.5 s), then SIGKILL to
        whatever is left of that group after STOP_TIMEOUT_SECONDS.
        """
        pid = self._master_pid
        self._master_pid = None
        if pid is None:
            # start() failed after the master came up, or stop() runs on a fresh object.
            pid_file = self.queue_directory / "pid" / "master.pid"
            if not pid_file.exists():
                return
            pid = int(pid_file.read_text().split()[0])
            if not _is_postfix_master(pid):
                return
        # The master leads a session and process group of its own: while any process of
        # that group lives, the group id cannot belong to anything else.
        if _is_postfix_master(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while process_group_members(pid) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if process_group_members(pid):
            os.killpg(pid, signal.SIGKILL)
            while process_group_members(pid):
                time.sleep(POLL_SECONDS)

    def reload(self, extra_main_cf: Mapping[str, str] | None = None) -> None:
        """Rewrite the configuration (adding `extra_main_cf`) and reload Postfix.

        Like `postfix reload` without its second-long integrity check: SIGHUP to the
        master, which re-reads main.cf and master.cf and tells every process it started
        before to exit. Returns once all of those have exited (idle ones take about 1.5 s,
        busy ones finish their work first), so every later connection sees the new
        settings.

        Their exit is also the proof that the master took the reload (qmgr runs from the
        start and exits only then). The master's "reload" log line is not: it reaches the
        log through postlogd only, and once, on a loaded CI machine, it was still missing
        10 s later while the rest of the log stayed silent too.
        """
        if self._master_pid is None:
            raise PostfixError("not started")
        self.extra_main_cf.update(extra_main_cf or {})
        self._write_config()
        mark = self.log_mark()
        old_processes = set(process_group_members(self._master_pid)) - {self._master_pid}
        os.kill(self._master_pid, signal.SIGHUP)
        if not old_processes:  # only just started, none spawned yet: the log must do
            self.wait_for_log(r"reload -- version", RELOAD_TIMEOUT_SECONDS, since=mark)
        deadline = time.monotonic() + RELOAD_TIMEOUT_SECONDS
        while still_running := old_processes & set(process_group_members(self._master_pid)):
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"processes {sorted(still_running)} still run the old settings"
                    f" {RELOAD_TIMEOUT_SECONDS} s after the reload:\n"
                    f"{_process_list(still_running)}\nmaillog since:\n"
                    f"{self.log_text()[mark:][-4000:]}"
                )
            time.sleep(POLL_SECONDS)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the queue

    def queue_size(self, queues: Iterable[str] = COUNTED_QUEUES) -> int:
        """Messages in the given queues (default: incoming, active, deferred, hold)."""
        total = 0
        for queue in queues:
            for _directory, _subdirectories, files in os.walk(self.queue_directory / queue):
                total += len(files)
        return total

    def wait_queue_empty(self, timeout: float) -> None:
        """Wait until every counted queue is empty; PostfixError with the log if not."""
        deadline = time.monotonic() + timeout
        while (size := self.queue_size()) > 0:
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"{size} messages still queued after {timeout} s:\n{self.log_text()[-4000:]}"
                )
            time.sleep(POLL_SECONDS)

    def flush(self) -> None:
        """Ask for delivery of all deferred mail now (`postqueue -f`)."""
        self._postfix("-f", program=POSTQUEUE)

    def hold_messages(self, count: int, recipient: str) -> None:
        """Put `count` messages for `recipient` on hold (they stay in the queue).

        Submitted with sendmail(1) and held by cleanup(8), so neither smtpd's restrictions
        nor the policy service see them (this works while policyd defers new mail).
        """
        target = self.queue_size(["hold"]) + count
        message = f"From: <{HOLD_SENDER}>\nSubject: held\n{HOLD_HEADER}\n\nheld\n".encode()
        for _message in range(count):
            subprocess.run(
                [SENDMAIL, "-C", str(self.config_directory), "-f", HOLD_SENDER, "--", recipient],
                input=message,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=True,
            )
        deadline = time.monotonic() + COMMAND_TIMEOUT_SECONDS
        while self.queue_size(["hold"]) < target:
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"held messages never reached the hold queue:\n{self.log_text()[-4000:]}"
                )
            time.sleep(POLL_SECONDS)

    def release_held(self) -> None:
        """Release every held message (`postsuper -H ALL`) and deliver it now (flush)."""
        self._postfix("-H", "ALL", program=POSTSUPER)
        self.flush()

    def delete_queued(self) -> None:
        """Delete every queued message (`postsuper -d ALL`)."""
        self._postfix("-d", "ALL", program=POSTSUPER)

    # --- the log

    def log_text(self) -> str:
        """The whole mail log of this instance so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The current end of the log, to pass as wait_for_log(since=...)."""
        return len(self.log_text())

    def wait_for_log(
        self, regex: str, timeout: float = LOG_SECONDS, since: int = 0
    ) -> re.Match[str]:
        """Wait until the log (from character `since` on) matches `regex`; return the match.

        Postfix writes its log through postlogd, so a line can lag its event slightly.
        """
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log_text(), since)
            if match:
                return match
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"no log line matched {regex!r} in {timeout} s:\n"
                    f"{self.log_text()[since:][-4000:]}"
                )
            time.sleep(POLL_SECONDS)

    # --- delivered mail

    def maildir(self, address: str) -> Path:
        """The Maildir of `address` ("domain/local/" below virtual_mailbox_base)."""
        local_part, _, domain = address.lower().rpartition("@")
        return self.mail_directory / domain / local_part

    def delivered_subjects(self, address: str, timeout: float) -> list[str]:
        """Once the queue is empty: the Subject of every message in the Maildir of
        `address`, oldest first."""
        self.wait_queue_empty(timeout)
        return [message["Subject"] for message in self.maildir_messages(address)]

    def maildir_messages(self, address: str) -> list[EmailMessage]:
        """Every message in the Maildir of `address` (new/ and cur/), oldest first."""
        files = [
            path
            for folder in ("new", "cur")
            if (self.maildir(address) / folder).is_dir()
            for path in (self.maildir(address) / folder).iterdir()
        ]
        messages = []
        for path in sorted(files, key=lambda path: path.name):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            messages.append(message)
        return messages
