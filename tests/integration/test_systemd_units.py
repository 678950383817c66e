"""The systemd units in contrib/systemd: `systemd-analyze verify` accepts them, they carry
the hardening and the reload signal each daemon needs, and the daemons speak Type=notify
as systemd expects (READY=1 from the main process once listening, STOPPING=1 at stop)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon_world import make_directory, write_config
from tests.support import children
from tests.support.postfix import free_loopback_port

UNITS_DIRECTORY = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = ("traqmilter.service", "traqmilter-policyd.service", "traqmilter-milter.service")
INSTALLED_PATH = "/usr/local/bin/traqmilter"  # where docs/operations.md installs the command
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/traqmilter",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "CAP_DAC_READ_SEARCH",
    "AmbientCapabilities": "CAP_DAC_READ_SEARCH",
}
CREDENTIALS = struct.Struct("iII")
TIMEOUT = 30.0


def unit_settings(name: str) -> dict[str, str]:
    """Key=value lines of a unit (each key appears once in ours)."""
    settings: dict[str, str] = {}
    for line in (UNITS_DIRECTORY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            assert key not in settings, f"{name}: {key} set twice"
            settings[key] = value
    return settings


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, (
        "systemd-analyze is missing: install Debian's systemd package "
        "(apt-get install systemd; scripts/setup --test does)"
    )
    command = Path(sys.executable).parent / "traqmilter"
    assert command.exists(), f"{command}: the project is not installed in this venv"
    for name in UNITS:
        # verify checks that ExecStart's program exists: point it at this checkout's.
        text = (UNITS_DIRECTORY / name).read_text()
        assert INSTALLED_PATH in text
        (tmp_path / name).write_text(text.replace(INSTALLED_PATH, str(command)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = result.stdout + result.stderr
    # Lines about the host (no running systemd, other units) are not ours to fix.
    about_units = [line for line in output.splitlines() if any(n in line for n in UNITS)]
    assert about_units == [], "\n".join(about_units)
    assert result.returncode == 0, output


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_notify_hardened_and_reloads(name: str) -> None:
    settings = unit_settings(name)
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    for key, value in HARDENING.items():
        assert settings.get(key) == value, f"{name}: {key}"
    command = settings["ExecStart"].split()
    assert command[:3] == [INSTALLED_PATH, "-c", "/etc/traqmilter/traqmilter.yaml"]
    assert "--foreground" in command
    role = command[-1]
    # libmilter stops on SIGHUP, so the milter alone reloads on SIGUSR1.
    want = "USR1" if role == "milter" else "HUP"
    assert settings["ExecReload"] == f"/bin/kill -{want} $MAINPID"
    assert role == {"traqmilter.service": "run"}.get(name, name[len("traqmilter-") : -8])


class NotifySocket:
    """What systemd listens on for Type=notify: messages with the sender's pid."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + f"traqmilter-test-notify-{os.getpid()}-{os.urandom(4).hex()}")
        self.sock.settimeout(TIMEOUT)
        name = self.sock.getsockname()
        self.address = "@" + (name[1:] if isinstance(name, str) else name[1:].decode())

    def receive(self) -> tuple[int, str]:
        """(sender pid, message)."""
        data, ancillary, _flags, _address = self.sock.recvmsg(
            4096, socket.CMSG_SPACE(CREDENTIALS.size)
        )
        pids = [
            CREDENTIALS.unpack(payload[: CREDENTIALS.size])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1
        return pids[0], data.decode()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    try:
        yield listener
    finally:
        listener.sock.close()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("command", ["policyd", "milter", "run"])
def test_ready_from_the_main_process_once_listening_then_stopping(
    command: str, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    make_directory(tmp_path)
    policy_port, milter_port = free_loopback_port(), free_loopback_port()
    policyd = (
        f'  listen: "inet:127.0.0.1:{policy_port}"\n'
        f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    )
    config = tmp_path / "traqmilter.yaml"
    milter = f'milter: {{listen: "inet:127.0.0.1:{milter_port}"}}\n'
    write_config(config, root=tmp_path, threshold=5, policyd=policyd, extra=milter)
    ports = {"policyd": [policy_port], "milter": [milter_port], "run": [policy_port, milter_port]}
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = children.spawn(
            [sys.executable, "-m", "traqmilter", "-c", str(config), command],
            death_signal=signal.SIGTERM,
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "NOTIFY_SOCKET": notify_socket.address},
        )
    try:
        pid, message = notify_socket.receive()
        assert (pid, message) == (process.pid, "READY=1"), log.read_text()
        assert all(accepts(port) for port in ports[command]), log.read_text()
        if command == "run":  # the reload reaches both daemons
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + TIMEOUT
            while "milter: reloaded configuration" not in log.read_text() or (
                "policyd: reloaded configuration" not in log.read_text()
            ):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        pid, message = notify_socket.receive()
        assert (pid, message) == (process.pid, "STOPPING=1"), log.read_text()
        assert process.wait(TIMEOUT) == 0, log.read_text()
    finally:
        children.kill(process)  # what a failed assertion left running
    assert "Traceback" not in log.read_text()
