"""The daemon process pieces that need no root: sd_notify, the supervisor's notify relay,
the pid file, identity look-up and the command line's daemon options."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.main import settle_heap
from traqmilter.cli import main
from traqmilter.core.settings import DaemonSettings
from traqmilter.daemonize import (
    DaemonProcess,
    NotifyRelay,
    PidFile,
    notify,
    resolve_identity,
)
from traqmilter.runtime import StartupError

NO_SUCH_PID = 4_194_304 + 7  # above Linux's largest pid_max: never a live process


@pytest.fixture
def datagram_listener() -> Iterator[tuple[socket.socket, str]]:
    """An abstract-namespace datagram socket, as systemd's $NOTIFY_SOCKET, and its '@' name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + f"traqmilter-unit-{os.getpid()}-{os.urandom(4).hex()}")
    sock.settimeout(5)
    name = sock.getsockname()
    try:
        yield sock, "@" + (name[1:] if isinstance(name, str) else name[1:].decode())
    finally:
        sock.close()


def test_notify_sends_one_datagram_to_an_abstract_socket(
    datagram_listener: tuple[socket.socket, str],
) -> None:
    sock, address = datagram_listener
    assert notify("READY=1", address=address)
    assert sock.recv(4096) == b"READY=1"


def test_notify_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("STOPPING=1", address=str(path))
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("address", ["", "relative/path"])
def test_notify_without_a_usable_socket_does_nothing(address: str) -> None:
    assert notify("READY=1", address=address) is False


def test_notify_to_a_missing_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert notify("READY=1", address=str(tmp_path / "absent")) is False
    assert "cannot notify systemd (READY=1)" in caplog.text


def test_relay_records_which_process_is_ready() -> None:
    relay = NotifyRelay()
    try:
        child = subprocess.run(
            [sys.executable, "-c", "from traqmilter.daemonize import notify; notify('READY=1')"],
            env={**os.environ, "NOTIFY_SOCKET": relay.address},
            timeout=60,
            check=True,
        )
        assert child.returncode == 0
        relay.wait(5)
        assert len(relay.ready_pids) == 1
        assert relay.ready_pids != {os.getpid()}
    finally:
        relay.close()


def test_relay_ignores_other_states() -> None:
    relay = NotifyRelay()
    try:
        assert notify("STATUS=starting", address=relay.address)
        relay.wait(5)
        assert relay.ready_pids == set()
        assert notify("READY=1", address=relay.address)
        relay.wait(5)
        assert relay.ready_pids == {os.getpid()}
    finally:
        relay.close()


def test_pid_file_holds_the_pid_and_is_removed(tmp_path: Path) -> None:
    pid_file = PidFile(str(tmp_path / "x.pid"))
    pid_file.write()
    assert (tmp_path / "x.pid").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "x.pid").stat().st_mode & 0o777 == 0o644
    pid_file.remove()
    assert not (tmp_path / "x.pid").exists()


def test_a_stale_pid_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "x.pid").write_text(f"{NO_SUCH_PID}\n")
    PidFile(str(tmp_path / "x.pid")).write()
    assert (tmp_path / "x.pid").read_text() == f"{os.getpid()}\n"


def test_a_live_pid_file_is_refused_and_kept(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            (tmp_path / "x.pid").write_text(f"{other.pid}\n")
            with pytest.raises(StartupError, match=f"already running as pid {other.pid}"):
                PidFile(str(tmp_path / "x.pid")).write()
            assert (tmp_path / "x.pid").read_text() == f"{other.pid}\n"
        finally:
            other.kill()


def test_a_pid_file_naming_another_process_is_not_removed(tmp_path: Path) -> None:
    pid_file = PidFile(str(tmp_path / "x.pid"))
    pid_file.write()
    (tmp_path / "x.pid").write_text(f"{NO_SUCH_PID}\n")  # a successor took it over
    pid_file.remove()
    assert (tmp_path / "x.pid").read_text() == f"{NO_SUCH_PID}\n"


def test_foreground_process_sets_the_umask_and_holds_the_pid_file(tmp_path: Path) -> None:
    settings = DaemonSettings(pid_file=str(tmp_path / "run" / "x.pid"), umask=0o077)
    process = DaemonProcess(settings, resolve_identity(settings))
    previous = os.umask(0o022)
    try:
        process.check()
        with process.running():
            assert (tmp_path / "run" / "x.pid").read_text() == f"{os.getpid()}\n"
            (tmp_path / "created").touch()
        assert not (tmp_path / "run" / "x.pid").exists()
        assert (tmp_path / "created").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (DaemonSettings(user="no-such-user-traqmilter"), "daemon.user: no such user"),
        (DaemonSettings(user="root"), "daemon.user: must not be root"),
        (DaemonSettings(group="nogroup"), "daemon.group: set daemon.user too"),
        (DaemonSettings(socket_group="no-such-group-x"), "daemon.socket_group: no such group"),
    ],
)
def test_identity_problems_stop_start_up(settings: DaemonSettings, message: str) -> None:
    with pytest.raises(StartupError, match=message):
        resolve_identity(settings)


def test_no_user_keeps_the_current_identity() -> None:
    identity = resolve_identity(DaemonSettings())
    assert (identity.uid, identity.gid, identity.socket_gid) == (None, None, None)


def test_a_relative_pid_file_option_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "traqmilter.yaml"
    config.write_text("")  # named: the machine's own config is never read
    assert main(["-c", str(config), "--pid-file", "x.pid", "check"]) == 2
    assert "--pid-file: must be an absolute path" in capsys.readouterr().err


def test_settle_heap_freezes_the_living_and_collects_old_cycles() -> None:
    """policyd's heap settling: what is alive is frozen; garbage cycles from before (an old
    engine after a reload) are collected, not frozen forever."""

    class Node:
        other: object = None

    cycle = Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gone() is None
    finally:
        gc.unfreeze()
