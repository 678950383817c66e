"""Run a traqmilter daemon (`traqmilter -c CONFIG policyd|milter|run`) as a child process,
as an administrator would, for integration tests.

start() returns once the daemon accepts connections on its port; stop() sends SIGTERM
and waits; kill() simulates a crash. A daemon that exits early fails the test with its
stderr, never a hang. A daemon dies with the test run even when pytest is killed: it gets
SIGTERM, its own stop signal, which `traqmilter run` passes to its daemons
(tests/support/children.py).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support import children

STARTUP_SECONDS = 20.0
STOP_SECONDS = 15.0


class DaemonError(Exception):
    pass


def traqmilter_command(config_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`traqmilter -c CONFIG ARGV...` (check, explain, mailbox, blocks) as an administrator
    runs it: its status and output, whatever the status."""
    return subprocess.run(
        [sys.executable, "-m", "traqmilter", "-c", str(config_path), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class DaemonProcess:
    def __init__(
        self,
        config_path: Path,
        command: str,
        port: int,
        host: str = "127.0.0.1",
        unix_path: Path | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """The daemon listens on host:port, or on the unix socket `unix_path` if given.
        `prefix`: a command that runs the daemon (ending in an exec, so that the pid
        stays the daemon's), e.g. one that drops root as a service manager would."""
        self.prefix = prefix
        self.config_path = config_path
        self.command = command
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def argv(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "traqmilter",
            "-c",
            str(self.config_path),
            self.command,
        ]

    def start(self) -> DaemonProcess:
        self.process = children.spawn(
            self.argv(),
            death_signal=signal.SIGTERM,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonError(f"{self.command} exited {self.process.returncode}:\n{self.log()}")
            try:
                self._connect().close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        where = self.unix_path or self.port
        raise DaemonError(f"{self.command} did not listen on {where}:\n{self.log()}")

    def _connect(self) -> socket.socket:
        if self.unix_path is None:
            return socket.create_connection((self.host, self.port), timeout=1)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(1)
            connection.connect(str(self.unix_path))
        except OSError:
            connection.close()
            raise
        return connection

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        try:
            status = children.stop(self.process, signal.SIGTERM, timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process = None  # killed
            raise DaemonError(f"{self.command} ignored SIGTERM:\n{self.log()}") from None
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL to the daemon and what it started, as a crash would."""
        if self.process is not None:
            children.kill(self.process)
        self.process = None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        """Everything the daemon wrote to stderr (its log) so far, across restarts."""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def __enter__(self) -> DaemonProcess:
        try:
            return self.start()
        except BaseException:
            self._stderr.close()  # __exit__ does not run when __enter__ fails
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        self._stderr.close()
