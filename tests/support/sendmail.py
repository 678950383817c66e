"""SendmailInstance: a private, real Sendmail 8.17 for integration tests (run as root).

Debian's `sendmail-bin` conflicts with `postfix`, so it is never installed:
`scripts/setup --test` downloads sendmail-bin, sendmail-cf, m4, libwrap0 and sasl2-bin
(saslpasswd2) and unpacks them below build/sendmail/root (SENDMAIL_ROOT), setgid bit
dropped. Nothing of the system's is started, enabled or touched.

Each instance lives in its own directory: sendmail.cf (built with the unpacked m4 and
cf/ files from a .mc that holds contrib/sendmail/traqmilter.mc exactly as shipped, only
its socket replaced), queue, aliases, log. Sendmail runs as `sendmail -bD` (a daemon in
the foreground, so the harness holds its pid) inside a private mount namespace
(`unshare --mount`) where these are bound over the system's files:
- /etc/hosts, with the host name MYHOSTNAME (else each start waits 60 s for DNS);
- /etc/resolv.conf, naming 127.0.0.1 only, so no DNS query leaves loopback;
- /dev, a private one with null/zero/random/urandom and `log`: the socket of LogCatcher,
  where Sendmail's syslog() lines land (this machine has no /dev/log);
- with SMTP AUTH (`sasl_users`), Cyrus SASL's plugin directory SASL_DIRECTORY, the first
  directory of its configuration path that exists on Debian (there is no /etc/sasl2):
  the instance's own Sendmail.conf, sasldb and copies of the two plugins they need.
With FEATURE(nocanonify), FEATURE(accept_unresolvable_domains), a service switch that
names only files, and DONT_PROBE_INTERFACES, Sendmail asks no DNS at all.

Mail routing: the domains of the test are relay domains (RELAY_DOMAIN): Sendmail accepts
every recipient of them and leaves each to the milter, as a gateway in front of the
mailbox server does; everything, local domains included, goes to the smart host, a
CaptureServer on 127.0.0.1:`relay_port`, except the unknown recipients of the outbox
domains: contrib/sendmail/traqmilter.mc's FEATURE(ldap_routing) asks the milter's socket
map, which names their relay (another loopback address, the same relay mailer port).
Bare `postmaster` is aliased to POSTMASTER.
Mail submitted on the command line (`submit_queued`) is only queued (-odq) and never
passes the milter (milters see SMTP only): that fills the queue deterministically.

SECURITY: root only; every listener is on loopback, every path below `root`.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from tests.support.postfix import LOOPBACK, free_loopback_port, process_group_members

REPO = Path(__file__).resolve().parents[2]
CONTRIB_MC = REPO / "contrib" / "sendmail" / "traqmilter.mc"
# The sockets in the shipped .mc, replaced by each instance's: the milter's, and the socket
# map the milter serves for the outbox action's routing.
CONTRIB_MILTER_SOCKET = "S=inet:8891@127.0.0.1"
CONTRIB_SOCKETMAP_SOCKET = "socket inet:10041@127.0.0.1"
SENDMAIL_ROOT = Path(
    os.environ.get("TRAQMILTER_SENDMAIL_ROOT", REPO / "build" / "sendmail" / "root")
)
SENDMAIL = SENDMAIL_ROOT / "usr" / "libexec" / "sendmail" / "sendmail"
M4 = SENDMAIL_ROOT / "usr" / "bin" / "m4"
CF_DIRECTORY = SENDMAIL_ROOT / "usr" / "share" / "sendmail" / "cf"
LIBRARY_PATH = SENDMAIL_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
SASLPASSWD2 = SENDMAIL_ROOT / "usr" / "sbin" / "saslpasswd2"
# Cyrus SASL's plugin directory, first of its configuration path that exists here (the
# others, /etc/sasl2 and /etc/sasl, do not): an instance with SMTP AUTH binds its own
# directory over it in its namespace (Sendmail.conf, the sasldb and copies of the plugins).
SASL_DIRECTORY = Path("/usr/lib/x86_64-linux-gnu/sasl2")
SASL_PLUGINS = ("libplain.so*", "libsasldb.so*")
MYHOSTNAME = "mx.traqmilter.test"
POSTMASTER = "postmaster@example.com"
DEVICES = ("null", "zero", "random", "urandom")
COMMAND_TIMEOUT_SECONDS = 60
START_SECONDS = 20.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.02


def socket_directory() -> Path:
    """A fresh directory for a milter's unix socket (the caller removes it). Sendmail
    refuses a socket below any group- or world-writable directory ("unsafe"), and the
    checkout itself may lie below /tmp (a CI clone), so the parent is the repository's
    build/ only where its whole path is safe, else a root-only directory under /run."""
    for parent in (REPO / "build" / "sendmail" / "sockets", Path("/run/traqmilter-tests")):
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if all(not (p.stat().st_mode & 0o022) for p in (parent, *parent.parents)):
            return Path(tempfile.mkdtemp(dir=parent))
    raise SendmailError("no directory without group- or world-writable parents for a socket")


class SendmailError(RuntimeError):
    """Sendmail failed to build, start, or do what the harness waited for."""


def sendmail_unavailable_reason() -> str | None:
    """Why a private Sendmail cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private Sendmail needs root (a mount namespace, a queue owned by root)"
    for program in (SENDMAIL, M4, SASLPASSWD2, Path("/usr/bin/unshare"), Path("/usr/bin/mount")):
        if not os.access(program, os.X_OK):
            return f"{program} is missing (bash scripts/setup --test unpacks Sendmail)"
    return None


def contrib_lines(socket_spec: str, socketmap_spec: str) -> str:
    """contrib/sendmail/traqmilter.mc as shipped, with its two sockets replaced."""
    text = CONTRIB_MC.read_text()
    for shipped, ours in (
        (CONTRIB_MILTER_SOCKET, f"S={socket_spec}"),
        (CONTRIB_SOCKETMAP_SOCKET, f"socket {socketmap_spec}"),
    ):
        if text.count(shipped) != 1:
            raise SendmailError(f"{CONTRIB_MC} no longer holds {shipped} once")
        text = text.replace(shipped, ours)
    return text


class LogCatcher:
    """The /dev/log of the namespace: a datagram socket collecting syslog() lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self.path.chmod(0o666)
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                datagram = self._socket.recv(65536)
            except OSError:  # closed
                return
            # "<PRI>Mmm dd hh:mm:ss sm-mta[pid]: text": keep from the tag on.
            line = re.sub(rb"^<\d+>", b"", datagram).decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def mark(self) -> int:
        with self._changed:
            return len(self._lines)

    def wait_for(self, regex: str, timeout: float, since: int = 0) -> re.Match[str]:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[since:]:
                    if match := pattern.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SendmailError(
                        f"no log line matched {regex!r} in {timeout} s:\n"
                        + "\n".join(self._lines[since:][-60:])
                    )
                self._changed.wait(remaining)

    def close(self) -> None:
        self._socket.close()


class SendmailInstance:
    """A private Sendmail below `root` with contrib/sendmail/traqmilter.mc's milter line.

    `milter_socket`: the milter's socket in libmilter's spelling ("inet:PORT@127.0.0.1" or
    "local:/path"); `socketmap_socket`: the milter's socket map for outbox routing, in
    Sendmail's spelling (the same forms); `relay_port`: the port of the relay mailer, the
    CaptureServer all mail is relayed to (on 127.0.0.1, and an outbox relay on another
    loopback address); `relay_domains`: the domains Sendmail accepts every recipient of;
    `outbox_domains`: those routed by the socket map (LDAPROUTE_DOMAIN); `queue_group`: a
    group given read and search access to the queue (mode 0750), as an administrator
    grants a milter that counts the queue without CAP_DAC_READ_SEARCH; `sasl_users`: login
    and password of each client allowed SMTP AUTH PLAIN (Cyrus SASL, auxprop over a sasldb
    of the instance's own), which Sendmail then lets relay and names to the milter in
    {auth_authen}; `client_address`: the loopback address Sendmail's own SMTP client binds
    (an instance that relays to another); `hostname`: its name (two instances that talk to
    each other need two: Sendmail refuses to relay to a server greeting with its own name,
    "mail loops back to me"); `milters_before`: the sockets of other milters, in libmilter's
    spelling, that Sendmail runs before traqmilter (an upstream verifier that adds an
    Authentication-Results header). An empty `milter_socket` leaves traqmilter.mc out:
    a plain Sendmail.
    Use as a context manager, or start() and stop(); stop() always leaves no process.
    """

    def __init__(
        self,
        root: Path,
        *,
        milter_socket: str,
        socketmap_socket: str,
        relay_port: int,
        relay_domains: tuple[str, ...],
        outbox_domains: tuple[str, ...] = (),
        queue_group: str = "",
        sasl_users: dict[str, str] | None = None,
        client_address: str = "",
        hostname: str = MYHOSTNAME,
        milters_before: tuple[str, ...] = (),
    ) -> None:
        self.root = root.resolve()
        self.milter_socket = milter_socket
        self.socketmap_socket = socketmap_socket
        self.relay_port = relay_port
        self.relay_domains = relay_domains
        self.outbox_domains = outbox_domains
        self.queue_group = queue_group
        self.sasl_users = dict(sasl_users or {})
        self.client_address = client_address
        self.hostname = hostname
        self.milters_before = milters_before
        self.host = LOOPBACK
        self.smtp_port = free_loopback_port()
        self.cf_path = self.root / "sendmail.cf"
        self.submit_cf_path = self.root / "submit.cf"
        self.client_queue_directory = self.root / "clientmqueue"
        self.queue_directory = self.root / "mqueue"
        self.dev_directory = self.root / "dev"
        self.sasl_directory = self.root / "sasl2"
        self.log: LogCatcher | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # --- configuration

    def mc(self) -> str:
        """The sendmail.mc: this machine's lines, the shipped traqmilter.mc, the outbox
        domains, the mailers."""
        root = self.root
        relay = f"relay:[{LOOPBACK}]"
        auth = (
            ["define(`confAUTH_MECHANISMS', `PLAIN')dnl", "TRUST_AUTH_MECH(`PLAIN')dnl"]
            if self.sasl_users
            else []
        )
        client = (
            [f"CLIENT_OPTIONS(`Family=inet, Addr={self.client_address}')dnl"]
            if self.client_address
            else []
        )
        milter = [
            f"INPUT_MAIL_FILTER(`before{n}', `S={socket}, F=T')dnl"
            for n, socket in enumerate(self.milters_before)
        ] + (
            [contrib_lines(self.milter_socket, self.socketmap_socket).rstrip("\n")]
            if self.milter_socket
            else []
        )
        return "\n".join(
            [
                "divert(-1)",
                "divert(0)dnl",
                f"include(`{CF_DIRECTORY}/m4/cf.m4')dnl",
                "VERSIONID(`traqmilter test instance')dnl",
                "OSTYPE(`linux')dnl",
                f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
                "define(`confDONT_PROBE_INTERFACES', `True')dnl",
                f"define(`confSERVICE_SWITCH_FILE', `{root}/service.switch')dnl",
                f"define(`confHOSTS_FILE', `{root}/hosts')dnl",
                f"define(`QUEUE_DIR', `{self.queue_directory}')dnl",
                f"define(`confPID_FILE', `{root}/sendmail.pid')dnl",
                f"define(`STATUS_FILE', `{root}/statistics')dnl",
                f"define(`ALIAS_FILE', `{root}/aliases')dnl",
                "define(`confHELP_FILE', `')dnl",
                # The instance lives below /tmp (world-writable, sticky).
                "define(`confDONT_BLAME_SENDMAIL', `MapInUnsafeDirPath')dnl",
                "define(`confHOST_STATUS_DIRECTORY', `')dnl",
                "define(`confTO_IDENT', `0s')dnl",
                "define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl",
                "define(`confPRIVACY_FLAGS', `goaway')dnl",
                f"define(`SMART_HOST', `{relay}')dnl",
                f"define(`RELAY_MAILER_ARGS', `TCP $h {self.relay_port}')dnl",
                "define(`confREFUSE_LA', `1000')dnl",
                "define(`confQUEUE_LA', `1000')dnl",
                "FEATURE(`no_default_msa')dnl",  # no submission port 587 on every address
                "FEATURE(`nocanonify')dnl",
                "FEATURE(`accept_unresolvable_domains')dnl",
                *(f"RELAY_DOMAIN(`{domain}')dnl" for domain in self.relay_domains),
                *auth,
                f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr={LOOPBACK}, Name=MTA')dnl",
                *client,
                *milter,
                *(f"LDAPROUTE_DOMAIN(`{domain}')dnl" for domain in self.outbox_domains),
                "MAILER(`local')dnl",
                "MAILER(`smtp')dnl",
                "",
            ]
        )

    def submit_mc(self) -> str:
        """submit.mc of Sendmail's mail submission program (what Debian's /usr/sbin/sendmail
        runs): FEATURE(msp) hands every message over SMTP to this instance's daemon, so
        through the milter like any other SMTP client."""
        root = self.root
        return "\n".join(
            [
                "divert(-1)",
                "divert(0)dnl",
                f"include(`{CF_DIRECTORY}/m4/cf.m4')dnl",
                "VERSIONID(`traqmilter test submission')dnl",
                "OSTYPE(`linux')dnl",
                f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
                f"define(`confSERVICE_SWITCH_FILE', `{root}/service.switch')dnl",
                f"define(`confHOSTS_FILE', `{root}/hosts')dnl",
                f"define(`MSP_QUEUE_DIR', `{self.client_queue_directory}')dnl",
                # A submission program never runs as root: nobody, owning clientmqueue.
                "define(`confRUN_AS_USER', `nobody:nogroup')dnl",
                "define(`confTO_IDENT', `0s')dnl",
                "define(`confHELP_FILE', `')dnl",
                f"define(`RELAY_MAILER_ARGS', `TCP $h {self.smtp_port}')dnl",
                f"FEATURE(`msp', `[{LOOPBACK}]')dnl",
                "",
            ]
        )

    def _m4(self, mc: str, cf: Path) -> None:
        built = subprocess.run(
            [str(M4), f"-D_CF_DIR_={CF_DIRECTORY}/", "-"],
            input=mc,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        if built.returncode != 0 or "ERROR" in built.stderr:
            raise SendmailError(f"m4 failed ({built.returncode}):\n{built.stderr}")
        cf.write_text(built.stdout)

    def _write_config(self) -> None:
        root = self.root
        (root / "sendmail.mc").write_text(self.mc())
        self._m4(self.mc(), self.cf_path)
        self._m4(self.submit_mc(), self.submit_cf_path)
        (root / "hosts").write_text(f"{LOOPBACK} localhost {MYHOSTNAME} {self.hostname}\n")
        (root / "resolv.conf").write_text(f"nameserver {LOOPBACK}\n")
        (root / "service.switch").write_text("hosts files\naliases files\n")
        (root / "aliases").write_text(f"postmaster: {POSTMASTER}\nMAILER-DAEMON: postmaster\n")
        if self.sasl_users:
            self._write_sasl()
        self.sendmail("-bi")

    def _write_sasl(self) -> None:
        """Sendmail.conf (Cyrus SASL's configuration for the application "Sendmail"), a
        sasldb with `sasl_users`, and the two plugins they need, in sasl_directory."""
        directory = self.sasl_directory
        directory.mkdir(mode=0o755, exist_ok=True)
        for pattern in SASL_PLUGINS:
            for plugin in SASL_DIRECTORY.glob(pattern):
                shutil.copy2(plugin, directory / plugin.name, follow_symlinks=False)
        sasldb = directory / "sasldb2"
        (directory / "Sendmail.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN\n"
            f"sasldb_path: {sasldb}\n"
        )
        for login, password in self.sasl_users.items():
            subprocess.run(
                [str(SASLPASSWD2), "-f", str(sasldb), "-c", "-p", "-u", self.hostname, login],
                input=password.encode(),
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=True,
            )
        sasldb.chmod(0o600)  # it holds passwords: root (Sendmail) alone reads it

    def _make_directories(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # The submission program runs as nobody and must reach its queue and config.
        for directory in (self.root, *self.root.parents):
            if not directory.stat().st_mode & stat.S_IXOTH:
                raise SendmailError(f"{directory} is not searchable by others (o+x)")
        self.queue_directory.mkdir(mode=0o700, exist_ok=True)
        if self.queue_group:
            os.chown(self.queue_directory, -1, grp.getgrnam(self.queue_group).gr_gid)
            self.queue_directory.chmod(0o750)
        self.client_queue_directory.mkdir(mode=0o770, exist_ok=True)
        os.chown(
            self.client_queue_directory,
            pwd.getpwnam("nobody").pw_uid,
            grp.getgrnam("nogroup").gr_gid,
        )
        self.dev_directory.mkdir(exist_ok=True)
        for device in DEVICES:
            (self.dev_directory / device).touch()
        log_path = self.dev_directory / "log"
        if log_path.exists():
            log_path.unlink()
        self.log = LogCatcher(log_path)

    def sendmail(self, *arguments: str, stdin: bytes | None = None) -> str:
        """Run this instance's sendmail with `arguments` (in its namespace); its output."""
        argv = self.namespace_argv(str(SENDMAIL), "-C", str(self.cf_path), *arguments)
        completed = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            raise SendmailError(
                f"{' '.join(argv)} failed ({completed.returncode}):\n"
                f"{completed.stdout.decode(errors='replace')}"
                f"{completed.stderr.decode(errors='replace')}\nlog:\n{self.log_text()[-4000:]}"
            )
        return completed.stdout.decode(errors="replace")

    def namespace_argv(self, *argv: str) -> list[str]:
        """`argv` run in a private mount namespace with the instance's /etc/hosts,
        /etc/resolv.conf and /dev bound over the system's."""
        binds = [
            *(f"mount --bind /dev/{d} {self.dev_directory}/{d}" for d in DEVICES),
            f"mount --bind {self.root}/hosts /etc/hosts",
            f"mount --bind {self.root}/resolv.conf /etc/resolv.conf",
            f"mount --bind {self.dev_directory} /dev",
        ]
        if self.sasl_users:
            binds.append(f"mount --bind {self.sasl_directory} {SASL_DIRECTORY}")
        script = " && ".join([*binds, f"export LD_LIBRARY_PATH={LIBRARY_PATH}", 'exec "$@"'])
        return ["/usr/bin/unshare", "--mount", "/bin/sh", "-c", script, "sh", *argv]

    # --- life cycle

    def start(self) -> SendmailInstance:
        """Build sendmail.cf and start the daemon; it answers SMTP on return."""
        if self._process is not None:
            raise SendmailError("already started")
        self._make_directories()
        try:
            self._write_config()
            self._process = subprocess.Popen(
                self.namespace_argv(str(SENDMAIL), "-C", str(self.cf_path), "-bD", "-L", "sm-mta"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._wait_greeting()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_greeting(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SendmailError(
                    f"sendmail exited {self._process.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                with socket.create_connection((self.host, self.smtp_port), timeout=5) as sock:
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise SendmailError(f"sendmail did not greet in {START_SECONDS} s:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM to the daemon (which ends its children), SIGKILL to what is left of its
        process group after STOP_SECONDS; safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            deadline = time.monotonic() + STOP_SECONDS
            while process_group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            if process_group_members(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                while process_group_members(process.pid):
                    time.sleep(POLL_SECONDS)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> SendmailInstance:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the queue

    def queued(self) -> list[Path]:
        """The qf files (one per queued message) in the queue."""
        return sorted(self.queue_directory.glob("qf*"))

    def submit_queued(self, count: int, recipient: str) -> None:
        """Queue `count` messages for `recipient` without delivering them (-odq): on the
        command line, so the milter never sees them."""
        message = b"From: <hold@hold.invalid>\nSubject: held\n\nheld\n"
        for _message in range(count):
            self.sendmail("-odq", "-f", "hold@hold.invalid", "--", recipient, stdin=message)

    def flush_queue(self) -> None:
        """One queue run now: deliver everything queued (`sendmail -q`)."""
        self.sendmail("-q")

    def wait_queue_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while queued := self.queued():
            if time.monotonic() > deadline:
                raise SendmailError(
                    f"{len(queued)} messages still queued after {timeout} s:\n"
                    f"{self.log_text()[-4000:]}"
                )
            time.sleep(POLL_SECONDS)

    # --- the log

    def log_text(self) -> str:
        return "" if self.log is None else self.log.text()
