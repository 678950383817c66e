"""A private redis-server for tests: its own temp dir, a unix socket (or a loopback port
the OS picked), no persistence (`--save ''`), stopped by its PID.

The fixtures (tests/support/fixtures.py): `redis_server`, one per session, shared by the
tests that only need a server (each takes its own key prefix through `redis_prefix`);
a test that stops, restarts or pauses Redis makes its own RedisServer. It dies with the
test run even when pytest is killed (tests/support/children.py).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import children

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_SECONDS = 10.0
PROBE_SECONDS = 0.5  # a PING unanswered this long: the server sleeps (it answers in µs)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """start() / stop() may be called again: a restart comes back empty (no persistence),
    on the same socket and port."""

    def __init__(self, *, tcp: bool = False, extra: tuple[str, ...] = ()) -> None:
        """extra: more redis-server options (TLS ports and files, for example)."""
        self.dir = Path(tempfile.mkdtemp(prefix="traqmilter-redis-"))
        self.socket = self.dir / "redis.sock"
        self.port = free_loopback_port() if tcp else 0
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}?db=0"

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5, password=password)

    def start(self) -> RedisServer:
        assert self.process is None, "already running"
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
            "--enable-debug-command", "local",
            *self.extra,
        ]  # fmt: skip
        self.process = children.spawn(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                if self.client().ping():
                    return self
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{log}")
            time.sleep(0.02)

    def pause(self, seconds: int) -> threading.Thread:
        """Make the server sleep `seconds` (DEBUG SLEEP, from a thread, which the caller
        joins); returns once it sleeps, i.e. answers no one, so the test never races the
        command to the server."""
        sleeping = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=seconds + 10)
        sleeper = threading.Thread(
            target=lambda: sleeping.execute_command("DEBUG", "SLEEP", seconds)
        )
        sleeper.start()
        deadline = time.monotonic() + START_SECONDS
        while True:
            probe = redis.Redis(
                unix_socket_path=str(self.socket),
                socket_timeout=PROBE_SECONDS,
                retry=Retry(NoBackoff(), 0),  # redis-py would retry a timeout by default
            )
            try:
                probe.ping()
            except redis.TimeoutError:
                return sleeper
            finally:
                probe.close()
            if time.monotonic() > deadline:
                sleeper.join()
                raise RuntimeError(f"redis-server never slept for DEBUG SLEEP {seconds}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL), dropping its data."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed then
            children.stop(process, timeout=10)

    def kill(self) -> None:
        """Kill -9, as a crash would."""
        assert self.process is not None
        children.kill(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
