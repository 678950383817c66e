"""Two policyd daemons -- two MX hosts, each with its own directory holding the same
mailboxes -- sharing one private redis-server: real processes, real policy requests over
sockets, `traqmilter blocks` and `traqmilter check` as an administrator runs them, and
Redis killed, restarted empty and paused under them."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.daemon_world import (
    KNOWN,
    PolicyConnection,
    is_block,
    make_directory,
    rcpt_request,
    wait_for,
    write_config,
)
from tests.integration.test_policyd_metrics_and_log import scrape
from tests.support.daemon_process import DaemonProcess, traqmilter_command
from tests.support.postfix import free_loopback_port
from tests.support.redis_server import RedisServer

THRESHOLD = 3


@dataclass
class Host:
    name: str
    config: Path
    daemon: DaemonProcess
    connection: PolicyConnection
    metrics_port: int

    def ask(self, recipient: str, client: str) -> str:
        return self.connection.ask(rcpt_request(recipient, client))

    def blocks(self, client: str) -> bool:
        return is_block(self.ask(KNOWN, client))

    def backend_up(self) -> float:
        return scrape(self.metrics_port)[("traqmilter_state_backend_up", (("backend", "redis"),))]

    def last_sync(self) -> float:
        labels = (("backend", "redis"),)
        return scrape(self.metrics_port)[("traqmilter_state_last_sync_timestamp_seconds", labels)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return traqmilter_command(self.config, *args)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def hosts(tmp_path: Path, redis: RedisServer) -> Iterator[tuple[Host, Host]]:
    started: list[Host] = []
    with contextlib.ExitStack() as stack:
        for name in ("mx1", "mx2"):
            root = tmp_path / name
            root.mkdir()
            make_directory(root)
            port, metrics_port = free_loopback_port(), free_loopback_port()
            config = root / "traqmilter.yaml"
            write_config(
                config,
                root=root,
                threshold=THRESHOLD,
                policyd=(
                    f'  listen: "inet:127.0.0.1:{port}"\n'
                    f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
                ),
                extra=(
                    f'metrics: {{listen: "inet:127.0.0.1:{metrics_port}"}}\n'
                    f'state: {{backend: redis, url: "{redis.url}", key_prefix: "mx:",'
                    " timeout: 0.2s}\n"
                ),
            )
            daemon = stack.enter_context(DaemonProcess(config, "policyd", port))
            connection = PolicyConnection(port=port)
            stack.callback(connection.close)
            started.append(Host(name, config, daemon, connection, metrics_port))
        yield started[0], started[1]


def test_a_harvester_alternating_between_two_mx_hosts_is_blocked_on_both(
    hosts: tuple[Host, Host], redis: RedisServer
) -> None:
    mx1, mx2 = hosts
    harvester = "203.0.113.50"
    for attempt in range(THRESHOLD):
        host = (mx1, mx2)[attempt % 2]
        action = host.ask(f"guess{attempt}@example.com", harvester)
        assert action.startswith("550 5.1.1"), (attempt, action)  # THRESHOLD honest answers
    # Once both hosts have synced since the total reached THRESHOLD (how soon that is:
    # bench/README.md), the next guess is blocked wherever it lands.
    wait_for(lambda: redis.client().zscore("mx:hot", harvester) is not None, "the count shared")
    marked = time.time()
    wait_for(lambda: min(mx1.last_sync(), mx2.last_sync()) > marked, "both hosts synced")
    assert is_block((mx1, mx2)[THRESHOLD % 2].ask("guess-next@example.com", harvester))
    wait_for(lambda: mx1.blocks(harvester) and mx2.blocks(harvester), "blocks on both hosts")
    # Blocked means blocked for every recipient, known ones included; others pass.
    assert is_block(mx2.ask("guess99@example.com", harvester))
    assert mx1.ask(KNOWN, "198.51.100.1") == "DUNNO"
    listed = mx2.cli("blocks", "list")
    assert listed.returncode == 0 and listed.stdout.startswith(f"{harvester}\tuntil "), listed

    # `traqmilter blocks clear` on one host lifts the block on both.
    cleared = mx2.cli("blocks", "clear", harvester)
    assert cleared.returncode == 0 and cleared.stdout == f"cleared {harvester}\n", cleared
    wait_for(
        lambda: not mx1.blocks(harvester) and not mx2.blocks(harvester),
        "the block lifted on both hosts",
    )
    assert mx1.cli("blocks", "list").stdout == ""
    checked = mx1.cli("check")
    assert checked.returncode == 0 and "state on Redis unix://" in checked.stdout, checked


def test_redis_killed_restarted_empty_and_paused_lets_nobody_in(
    hosts: tuple[Host, Host], redis: RedisServer
) -> None:
    mx1, mx2 = hosts
    assert mx1.backend_up() == 1.0
    redis.kill()
    wait_for(lambda: mx1.backend_up() == 0.0, "mx1 noticing Redis is gone")
    # Alone, each host answers as one host would: unknown stays unknown, known passes,
    # a harvester is blocked past THRESHOLD of this host's own attempts, no earlier.
    harvester = "203.0.113.60"
    for attempt in range(THRESHOLD):
        assert mx1.ask(f"x{attempt}@example.com", harvester).startswith("550 5.1.1")
    assert mx2.ask(KNOWN, harvester) == "DUNNO"
    assert is_block(mx1.ask("x9@example.com", harvester))
    assert mx2.ask("y@example.com", "198.51.100.2").startswith("550 5.1.1")
    check = mx1.cli("check")
    assert check.returncode == 2 and "Redis unix://" in check.stderr, check

    # Back, empty: both reconnect by themselves, and the block mx1 made meanwhile is
    # written back, so mx2 honours it too.
    redis.start()
    wait_for(lambda: mx1.backend_up() == 1.0 and mx2.backend_up() == 1.0, "reconnecting")
    wait_for(lambda: mx2.blocks(harvester), "mx1's block reaching mx2 after the restart")

    # Paused (DEBUG SLEEP): decisions never wait for Redis; answered while it sleeps.
    sleeper = redis.pause(5)
    try:
        wait_for(lambda: mx2.backend_up() == 0.0, "mx2 noticing Redis is paused")
        answered = [mx2.ask("z@example.com", f"198.51.100.{10 + n}") for n in range(3)]
        assert sleeper.is_alive(), "answers must not wait for the paused Redis"
        assert all(a.startswith("550 5.1.1") for a in answered), answered
    finally:
        sleeper.join()
    for host in (mx1, mx2):
        host.daemon.stop()
        log = host.daemon.log()
        assert "Traceback" not in log, log
        failures = [
            line for line in log.splitlines() if "state: Redis" in line and "failed" in line
        ]
        assert 1 <= len(failures) <= 2, failures  # once per outage (kill, pause), not per sync
