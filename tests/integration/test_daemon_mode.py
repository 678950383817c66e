"""policyd as a classic Unix daemon, started as root: it detaches (python-daemon), writes
its pid file, binds its unix socket as root with the configured mode and group, drops to
nobody:nogroup for good, reloads a good config on SIGHUP (a changed threshold applies,
counters and blocks stay), refuses a bad one with a log line and keeps serving, and stops
cleanly on SIGTERM, removing its pid file and socket."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon_world import (
    PolicyConnection,
    is_block,
    make_directory,
    rcpt_request,
    unknown_until_blocked,
    wait_for,
    write_config,
)
from tests.support.fixtures import open_tmp_dir
from tests.support.postfix import free_loopback_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

USER, GROUP, SOCKET_GROUP = "nobody", "nogroup", "mail"


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory nobody can traverse (pytest's tmp_path is below a 0700 directory)."""
    with open_tmp_dir("traqmilter-daemon-") as path:
        yield path


def process_state(pid: int) -> dict[str, str]:
    """/proc/PID/status as a mapping; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def exited(pid: int) -> bool:
    """Gone, or a zombie: the daemon's parent is init (or what runs as pid 1 here)."""
    return process_state(pid).get("State", "Z").startswith("Z")


def test_policyd_daemon_mode_drops_root_reloads_and_stops(root: Path) -> None:
    nobody = pwd.getpwnam(USER)
    nogroup, mail = grp.getgrnam(GROUP), grp.getgrnam(SOCKET_GROUP)
    make_directory(root)
    for name in ("state", "sock"):  # the daemon's own directories, as an installer makes them
        (root / name).mkdir(exist_ok=True)
        for path in [root / name, *(root / name).iterdir()]:
            os.chown(path, nobody.pw_uid, nogroup.gr_gid)
    socket_path = root / "sock" / "policy.sock"
    pid_path = root / "run" / "policyd.pid"  # run/ is missing: the daemon makes it
    config = root / "traqmilter.yaml"
    policyd = (
        f'  listen: "unix:{socket_path}"\n'
        f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
        "  socket_mode: '0660'\n"
    )
    daemon = (
        f"daemon: {{foreground: false, pid_file: {pid_path}, user: {USER}, group: {GROUP},"
        f" umask: '0027', socket_group: {SOCKET_GROUP}}}\n"
    )
    write_config(config, root=root, threshold=5, policyd=policyd, extra=daemon)
    log = root / "daemon.log"

    with log.open("wb") as stderr:
        started = subprocess.run(
            [sys.executable, "-m", "traqmilter", "-c", str(config), "policyd"],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            timeout=60,
            check=False,
        )
    # The command returns once the daemon has detached; the daemon lives on.
    assert started.returncode == 0, log.read_text()
    wait_for(
        lambda: pid_path.exists() and socket_path.exists() and pid_path.read_text().strip() != "",
        "pid file and socket",
    )
    pid = int(pid_path.read_text())
    try:
        # The socket is bound (as root) before the drop; the first answer comes after it.
        connection = PolicyConnection(unix_path=str(socket_path))
        assert connection.ask(rcpt_request("admin@example.com", "192.0.2.1")) == "DUNNO"
        assert pid_path.read_text() == f"{pid}\n"
        status = process_state(pid)
        assert status, log.read_text()
        assert "policyd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert os.getsid(pid) != os.getsid(0)  # its own session: detached from ours
        # Real, effective, saved and filesystem ids, and the supplementary groups.
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert status["Gid"].split() == [str(nogroup.gr_gid)] * 4
        assert status["Groups"].split() == [str(nogroup.gr_gid)]

        sock = os.stat(socket_path)
        assert stat.S_ISSOCK(sock.st_mode)
        assert stat.S_IMODE(sock.st_mode) == 0o660
        assert (sock.st_uid, sock.st_gid) == (nobody.pw_uid, mail.gr_gid)
        pid_stat = os.stat(pid_path)
        assert (pid_stat.st_uid, stat.S_IMODE(pid_stat.st_mode)) == (0, 0o644)
        assert os.stat(pid_path.parent).st_uid == nobody.pw_uid

        at_five = unknown_until_blocked(connection, "192.0.2.1")

        # A good new config: the new threshold and connection limit apply; the block taken
        # before stays, and the connection held across the reload keeps being answered.
        limited = policyd + "  max_connections: 1\n"
        write_config(config, root=root, threshold=2, policyd=limited, extra=daemon)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "policyd: reloaded configuration" in log.read_text(), "the reload")
        at_two = unknown_until_blocked(connection, "192.0.2.2")
        # threshold: N answers N unknown recipients and blocks at the next one.
        assert (at_five, at_two) == (6, 3)
        assert is_block(connection.ask(rcpt_request("nobody99@example.com", "192.0.2.1")))
        second = PolicyConnection(unix_path=str(socket_path))
        with pytest.raises((AssertionError, OSError)):  # over max_connections: closed at once
            second.ask(rcpt_request("admin@example.com", "192.0.2.9"))
        second.close()
        wait_for(lambda: "max_connections=1" in log.read_text(), "the refusal's log line")

        # A restart-only key: refused whole, naming the key; the old config serves on.
        moved = limited.replace("socket_mode: '0660'", "socket_mode: '0600'")
        write_config(config, root=root, threshold=9, policyd=moved, extra=daemon)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "needs a restart" in log.read_text(), "the refusal")
        assert "policyd.socket_mode: changed from 0660 to 0600; needs a restart" in log.read_text()
        assert unknown_until_blocked(connection, "192.0.2.4") == at_two
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660

        # A bad new config: refused with the key's path and line; the old one serves on.
        write_config(config, root=root, threshold=0, policyd=limited, extra=daemon)
        os.kill(pid, signal.SIGHUP)
        wait_for(
            lambda: "dictionary_attack.threshold: 0 is below the minimum 1" in log.read_text(),
            "the refusal",
        )
        assert unknown_until_blocked(connection, "192.0.2.3") == at_two
        assert process_state(pid)["Uid"].split() == [str(nobody.pw_uid)] * 4
        connection.close()

        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: exited(pid), "the daemon to exit")
    finally:
        if not exited(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "policyd: stopping" in text
    assert "Traceback" not in text and "fatal" not in text, text
    assert not pid_path.exists()
    assert not socket_path.exists()


def test_a_live_pid_file_stops_a_second_start(root: Path) -> None:
    """Two daemons on one pid file: the second refuses to start, the first is untouched."""
    make_directory(root)
    pid_path = root / "policyd.pid"
    pid_path.write_text(f"{os.getpid()}\n")  # a live process: this test
    config = root / "traqmilter.yaml"
    policyd = f'  listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    policyd += f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    write_config(
        config, root=root, threshold=5, policyd=policyd, extra=f"daemon: {{pid_file: {pid_path}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "traqmilter", "-c", str(config), "policyd"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"already running as pid {os.getpid()}" in result.stderr
    assert pid_path.read_text() == f"{os.getpid()}\n"


def test_milter_daemon_mode_drops_root_and_sets_its_socket(root: Path) -> None:
    """libmilter makes its own socket (with the umask's mode): the daemon gives it
    milter.socket_mode, the user and socket_group before dropping root; SIGUSR1 reloads."""
    nobody = pwd.getpwnam(USER)
    nogroup, mail = grp.getgrnam(GROUP), grp.getgrnam(SOCKET_GROUP)
    make_directory(root)
    for name in ("state", "sock"):
        (root / name).mkdir(exist_ok=True)
        for path in [root / name, *(root / name).iterdir()]:
            os.chown(path, nobody.pw_uid, nogroup.gr_gid)
    socket_path = root / "sock" / "milter.sock"
    pid_path = root / "run" / "milter.pid"
    config = root / "traqmilter.yaml"
    policyd = f'  listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    extra = (
        f"daemon: {{foreground: false, pid_file: {pid_path}, user: {USER},"
        f" umask: '0027', socket_group: {SOCKET_GROUP}}}\n"
        f"milter: {{listen: 'unix:{socket_path}', socket_mode: '0660'}}\n"
    )
    write_config(config, root=root, threshold=5, policyd=policyd, extra=extra)
    log = root / "daemon.log"
    with log.open("wb") as stderr:
        started = subprocess.run(
            [sys.executable, "-m", "traqmilter", "-c", str(config), "milter"],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            timeout=60,
            check=False,
        )
    assert started.returncode == 0, log.read_text()
    wait_for(lambda: "running as nobody" in log.read_text(), "the privilege drop")
    pid = int(pid_path.read_text())
    try:
        status = process_state(pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4  # the user's login group
        sock = os.stat(socket_path)
        assert stat.S_ISSOCK(sock.st_mode)
        assert stat.S_IMODE(sock.st_mode) == 0o660
        assert (sock.st_uid, sock.st_gid) == (nobody.pw_uid, mail.gr_gid)

        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: "milter: reloaded configuration" in log.read_text(), "the reload")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: exited(pid), "the milter to exit")
    finally:
        if not exited(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "milter: stopped" in text
    assert "Traceback" not in text and "fatal" not in text, text
    assert not pid_path.exists()
