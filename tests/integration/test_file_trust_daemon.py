"""A running milter and policyd refuse a bounce template another user could write: a
reload keeps the old config (and says why, naming the file and its mode), and a start
fails with the same message."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonError, DaemonProcess
from tests.support.fixtures import open_tmp_dir
from tests.support.postfix import free_loopback_port
from traqmilter.cli import main

WAIT_SECONDS = 20.0


@pytest.fixture
def base() -> Iterator[Path]:
    with open_tmp_dir("traqmilter-trust-daemon-") as path:
        yield path


def wait_for_log(daemon: DaemonProcess, text: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("command", "reload_signal"), [("policyd", signal.SIGHUP), ("milter", signal.SIGUSR1)]
)
def test_a_template_made_world_writable_is_refused_at_reload_and_start(
    base: Path, command: str, reload_signal: signal.Signals
) -> None:
    template = base / "bounce.txt.j2"
    template.write_text("Your mail could not be delivered.\n")
    template.chmod(0o644)
    policy_port, socketmap_port, milter_port = (free_loopback_port() for _ in range(3))
    config = base / "traqmilter.yaml"
    config.write_text(
        f"state_dir: {base}/state\ndirectory: {{sqlite: {base}/d.sqlite}}\n"
        f"queue: {{directory: {base}/spool}}\npostmaster: postmaster@example.com\n"
        "domains:\n  example.com: {}\n"
        f"  old.example: {{action: bounce, bounce_template: {template}}}\n"
        f'policyd: {{listen: "inet:127.0.0.1:{policy_port}", '
        f'socketmap_listen: "inet:127.0.0.1:{socketmap_port}"}}\n'
        f'milter: {{listen: "inet:127.0.0.1:{milter_port}"}}\n'
    )
    config.chmod(0o644)
    assert main(["-c", str(config), "mailbox", "add", "postmaster@example.com"]) == 0
    port = policy_port if command == "policyd" else milter_port
    message = (
        f"domains.old.example.bounce_template: {template}: is world-writable, mode 0666; "
        "only root and the daemon's user may be able to write it"
    )
    with DaemonProcess(config, command, port) as daemon:
        template.chmod(0o666)
        assert daemon.process is not None
        daemon.signal(reload_signal)
        wait_for_log(daemon, f"reload refused, keeping the old config: {message}")
        assert daemon.process.poll() is None  # still serving the old config
        assert daemon.stop() == 0
        with pytest.raises(DaemonError) as refused:
            daemon.start()
    assert f"traqmilter: fatal: {message}" in str(refused.value)
