"""The daemon process around policyd, the milter and `run`: detaching (python-daemon), the
umask, the pid file, the privilege drop, unix socket ownership and systemd notification.

Order of start-up (DaemonProcess does each step when the daemon reaches it):
  1. check the config as the target user, while the terminal still sees the errors;
  2. detach (unless `daemon.foreground`) and set the umask; write the pid file (as root);
  3. open the runtime (SQLite, state file) with the target user's effective ids, so the
     files it creates belong to that user and can be reopened after the drop (reload);
  4. bind the listening sockets as root, give unix sockets to user:socket_group;
  5. drop privileges for good (setgroups, setgid, setuid), then tell systemd READY=1.

SECURITY: the drop is setgroups + setgid + setuid with the real, effective and saved ids
all changed; it is checked by trying to get root back. seteuid is used only for step 3,
before any socket is served, and root is restored right after.

BUGS: a detached daemon (foreground: false) reports a failure after step 2 only in its
log (standard error, kept open) and by exiting; its parent has already returned 0. Under
a supervisor (systemd), stay in the foreground.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import select
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import daemon

from traqmilter.core.listen import parse_listen
from traqmilter.core.settings import DaemonSettings
from traqmilter.logs import preserved_log_files
from traqmilter.runtime import StartupError

log = logging.getLogger("traqmilter")


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom the daemon runs as after start-up; None fields mean "keep the current one"."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    socket_gid: int | None = None


def resolve_identity(settings: DaemonSettings) -> Identity:
    """Look up daemon.user, daemon.group and daemon.socket_group; StartupError if unknown."""
    problems: list[str] = []
    socket_gid = _group_id(settings.socket_group, "daemon.socket_group", problems)
    if not settings.user:
        if settings.group:
            problems.append("daemon.group: set daemon.user too (a group alone is not dropped to)")
        if problems:
            raise StartupError("\n".join(problems))
        return Identity(socket_gid=socket_gid)
    try:
        entry = pwd.getpwnam(settings.user)
    except KeyError:
        problems.append(f"daemon.user: no such user: {settings.user}")
        raise StartupError("\n".join(problems)) from None
    gid = _group_id(settings.group, "daemon.group", problems)
    if gid is None:
        gid = entry.pw_gid
    if entry.pw_uid == 0:
        problems.append("daemon.user: must not be root (leave it empty to keep root)")
    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        problems.append(f"daemon.user: only root can switch to {settings.user}")
    if problems:
        raise StartupError("\n".join(problems))
    groups = tuple(sorted(set(os.getgrouplist(settings.user, gid))))
    return Identity(settings.user, entry.pw_uid, gid, groups, socket_gid)


def _group_id(name: str, key: str, problems: list[str]) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        problems.append(f"{key}: no such group: {name}")
        return None


@contextlib.contextmanager
def effective_identity(identity: Identity) -> Iterator[None]:
    """Create files as the target user while keeping the way back to root (real and saved
    ids stay root): for opening the runtime before the listening sockets are bound."""
    if identity.uid is None or identity.gid is None or os.geteuid() != 0:
        yield
        return
    saved_groups = os.getgroups()
    os.setgroups(list(identity.groups))
    os.setegid(identity.gid)
    os.seteuid(identity.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved_groups)


def drop_privileges(identity: Identity) -> None:
    """Become identity.uid/gid for good (real, effective and saved ids; supplementary
    groups); raise StartupError if root could be regained."""
    if identity.uid is None or identity.gid is None or os.geteuid() != 0:
        return
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise StartupError(f"daemon.user: the switch to {identity.user} did not take")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise StartupError(f"daemon.user: could regain root after switching to {identity.user}")
    log.info("running as %s (uid %d, gid %d)", identity.user, identity.uid, identity.gid)


def own_unix_socket(listen: str, identity: Identity, mode: int | None = None) -> None:
    """Give a unix listening socket to the daemon's user and daemon.socket_group, and
    `mode` if given (policyd sets its mode at bind time; libmilter takes the umask's);
    inet listeners are left alone."""
    address = parse_listen(listen)
    if address.family != "unix":
        return
    path = address.path
    gid = identity.socket_gid if identity.socket_gid is not None else identity.gid
    uid = identity.uid
    try:
        if mode is not None:
            os.chmod(path, mode)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as exc:
        raise StartupError(f"cannot give {path} to the daemon user: {exc.strerror}") from None


def ensure_directory(path: str, identity: Identity, mode: int = 0o750) -> None:
    """Create a missing directory for the daemon's files and give it to its user (an
    existing one is left as the administrator made it)."""
    directory = Path(path)
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=mode, parents=True)
        if identity.uid is not None and os.geteuid() == 0:
            os.chown(directory, identity.uid, -1 if identity.gid is None else identity.gid)
    except OSError as exc:
        raise StartupError(f"cannot create {path}: {exc.strerror}") from None


class PidFile:
    """The pid file: refused when it names a live process, removed at a clean stop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written_pid: int | None = None

    def check(self) -> None:
        """StartupError if another live process holds the file."""
        pid = self._read()
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise StartupError(f"daemon.pid_file: {self.path}: already running as pid {pid}")

    def write(self) -> None:
        self.check()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # stale: its process is gone
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise StartupError(f"daemon.pid_file: {self.path}: {exc.strerror}") from None
        with os.fdopen(descriptor, "w") as file:
            os.fchmod(descriptor, 0o644)  # readable whatever the umask; writable by root only
            file.write(f"{os.getpid()}\n")
        self.written_pid = os.getpid()

    def remove(self) -> None:
        """Remove the file if it still names this process."""
        try:
            if self.written_pid is None or self._read() != self.written_pid:
                return
            os.unlink(self.path)
        except (OSError, StartupError) as exc:
            log.warning("cannot remove pid file %s: %s", self.path, exc)

    def _read(self) -> int | None:
        try:
            text = Path(self.path).read_bytes().strip()  # bytes: no codec to import late
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StartupError(f"daemon.pid_file: {self.path}: {exc.strerror}") from None
        return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DaemonProcess:
    """One daemon's process life: see the module docstring for the order of steps."""

    def __init__(self, settings: DaemonSettings, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity
        self.pid_file = PidFile(settings.pid_file) if settings.pid_file else None

    def check(self) -> None:
        """Before detaching: what can be checked while the terminal still sees errors."""
        os.umask(self.settings.umask)  # the check already creates the state files
        if self.pid_file is not None:
            self.pid_file.check()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Detach (unless foreground), set the umask, hold the pid file while inside."""
        if not self.settings.foreground:
            # signal_map={}: the daemons install their own handlers; stderr stays the log.
            context = daemon.DaemonContext(
                detach_process=True,
                umask=self.settings.umask,
                working_directory="/",
                signal_map={},
                stderr=sys.stderr,
                files_preserve=preserved_log_files(),  # the syslog socket
            )
            context.open()
        if self.pid_file is not None:
            ensure_directory(str(Path(self.pid_file.path).parent), self.identity, 0o755)
            self.pid_file.write()
        try:
            yield
        finally:
            if self.pid_file is not None:
                self.pid_file.remove()

    def as_target_user(self) -> contextlib.AbstractContextManager[None]:
        return effective_identity(self.identity)

    def listening(self, listens: list[str], *, socket_mode: int | None = None) -> None:
        """The listeners are bound: hand over unix sockets, drop root, tell systemd."""
        for listen in listens:
            own_unix_socket(listen, self.identity, socket_mode)
        drop_privileges(self.identity)
        notify("READY=1")

    def stopping(self) -> None:
        notify("STOPPING=1")


def notify(state: str, *, address: str | None = None) -> bool:
    """sd_notify(3): send `state` to systemd's $NOTIFY_SOCKET (an AF_UNIX datagram socket,
    '@' meaning the abstract namespace); False when not run under Type=notify.

    Written out instead of depending on a package: it is one datagram."""
    address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc.strerror or exc)
        return False
    return True


class NotifyRelay:
    """For `traqmilter run` under Type=notify: the children notify this socket instead of
    systemd (which, with NotifyAccess=main, listens only to the main process), and the
    supervisor says READY=1 once every child has."""

    CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + f"traqmilter-run-{os.getpid()}-{os.urandom(6).hex()}")
        self.sock.setblocking(False)
        name = self.sock.getsockname()
        self.address = "@" + (name[1:] if isinstance(name, str) else name[1:].decode())
        self.ready_pids: set[int] = set()

    def wait(self, seconds: float) -> None:
        """Collect notifications arriving within `seconds` (returns early on one)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], seconds)
        except InterruptedError:
            return
        while readable:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(self.CREDENTIALS.size)
                )
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = self.CREDENTIALS.unpack(payload[: self.CREDENTIALS.size])[0]
                    if b"READY=1" in data.split(b"\n"):
                        self.ready_pids.add(pid)

    def close(self) -> None:
        self.sock.close()
