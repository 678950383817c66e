"""Two MX hosts end to end: two private Postfix instances, each with its own policyd and
milter and its own SQLite directory holding the same mailboxes, sharing one private
redis-server for the dictionary-attack state. Real SMTP: a harvester alternating between
the hosts, `traqmilter blocks clear` on one host, Redis killed and brought back mid-run."""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from milter_world import World, milter_world

from tests.integration.daemon_world import wait_for
from tests.integration.test_policyd_metrics_and_log import scrape
from tests.support.daemon_process import traqmilter_command
from tests.support.postfix import free_loopback_port
from tests.support.redis_server import RedisServer
from tests.support.smtp import make_message, send_message

pytestmark = pytest.mark.postfix

THRESHOLD = 3
HARVESTER = "127.0.0.3"
SENDER = "someone@sender.example"


@dataclass
class Mx:
    world: World
    metrics_port: int

    def last_sync(self) -> float:
        """When policyd's last sync with Redis that worked started."""
        labels = (("backend", "redis"),)
        return scrape(self.metrics_port)[("traqmilter_state_last_sync_timestamp_seconds", labels)]

    def rcpt(self, recipient: str, client: str = HARVESTER) -> int:
        """The reply code to one RCPT TO in a session of its own from `client`."""
        smtp = smtplib.SMTP(timeout=30, source_address=(client, 0))
        try:
            smtp.connect(self.world.postfix.host, self.world.postfix.smtp_port)
            smtp.ehlo("client.test")
            smtp.mail(SENDER)
            code, _text = smtp.rcpt(recipient)
            return int(code)
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()

    def policyd_blocks(self) -> bool:
        """Whether this host's policyd itself (the milter follows the blocks too) answers
        the harvester's RCPT with the block: its event log says so."""
        before = self.world.policyd.log().count("rule=client_blocked")
        code = self.rcpt("alice@example.com")
        return code == 450 and self.world.policyd.log().count("rule=client_blocked") > before

    def deliver(self, subject: str) -> None:
        """Mail alice from an innocent client; it must be accepted."""
        result = send_message(
            self.world.postfix.host,
            self.world.postfix.smtp_port,
            sender=SENDER,
            recipients=["alice@example.com"],
            message=make_message(SENDER, ["alice@example.com"], subject=subject),
        )
        assert result.data is not None and result.data.positive, result

    def subjects(self) -> list[str]:
        self.world.settle()
        return [m["Subject"] for m in self.world.postfix.maildir_messages("alice@example.com")]

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return traqmilter_command(self.world.config_path, *argv)


@pytest.fixture
def two_mx() -> Iterator[tuple[Mx, Mx, RedisServer]]:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        shared = (
            f"dictionary_attack: {{threshold: {THRESHOLD}, exempt: [127.0.0.1/32]}}\n"
            f'state: {{backend: redis, url: "{redis.url}", key_prefix: "mx:", timeout: 0.2s}}\n'
        )
        hosts = []
        for _ in range(2):
            port = free_loopback_port()
            metrics = (
                f'metrics: {{listen: "inet:127.0.0.1:{port}",'
                f' milter_listen: "inet:127.0.0.1:{free_loopback_port()}"}}\n'
            )
            world = stack.enter_context(milter_world(extra_config=shared + metrics, policyd=True))
            hosts.append(Mx(world, port))
        yield hosts[0], hosts[1], redis


def test_two_mx_hosts_share_blocks_and_survive_redis_dying(
    two_mx: tuple[Mx, Mx, RedisServer],
) -> None:
    mx1, mx2, redis = two_mx
    # A harvester alternating between the MX hosts: THRESHOLD guesses in total, each
    # answered "unknown" ...
    codes = [(mx1, mx2)[n % 2].rcpt(f"guess{n}@example.com") for n in range(THRESHOLD)]
    assert codes == [550] * THRESHOLD
    # ... and once both hosts have synced since (how soon: bench/README.md), the next
    # guess is blocked wherever it lands, then every recipient on both hosts.
    wait_for(lambda: redis.client().zscore("mx:hot", HARVESTER) is not None, "count shared")
    marked = time.time()
    wait_for(lambda: min(mx1.last_sync(), mx2.last_sync()) > marked, "both hosts synced")
    assert (mx1, mx2)[THRESHOLD % 2].rcpt("guess-next@example.com") == 450
    # (The milter follows the blocks too: policyd's own answer, in its log, shows that
    # policyd has the block.)
    wait_for(
        lambda: mx1.policyd_blocks() and mx2.policyd_blocks(),
        "policyd blocking the harvester on both hosts",
    )
    assert mx1.rcpt("alice@example.com") == 450 and mx2.rcpt("guess9@example.com") == 450
    mx1.deliver("innocent-during-block")  # others are not affected

    # `traqmilter blocks clear` on one host clears on both.
    cleared = mx2.cli("blocks", "clear", HARVESTER)
    assert cleared.returncode == 0, cleared.stderr
    wait_for(
        lambda: mx1.rcpt("alice@example.com") == 250 and mx2.rcpt("alice@example.com") == 250,
        "the block lifted on both hosts",
    )

    # Redis killed mid-run: mail still flows, unknown stays unknown, nothing crashes.
    redis.kill()
    mx1.deliver("redis-down-1")
    mx2.deliver("redis-down-2")
    assert mx1.rcpt("nobody@example.com", client="127.0.0.4") == 550
    assert mx2.rcpt("nobody@example.com", client="127.0.0.4") == 550
    wait_for(
        lambda: all("failed" in mx.world.policyd.log() for mx in (mx1, mx2)),
        "both policyd noticing Redis is gone",
    )
    redis.start()
    wait_for(
        lambda: all("answers again" in mx.world.policyd.log() for mx in (mx1, mx2)),
        "both policyd reconnecting by themselves",
    )
    mx1.deliver("redis-back")
    assert mx1.subjects().count("innocent-during-block") == 1
    assert mx1.subjects().count("redis-down-1") == 1
    assert mx1.subjects().count("redis-back") == 1
    assert mx2.subjects().count("redis-down-2") == 1
    for mx in (mx1, mx2):
        for daemon in (mx.world.policyd, mx.world.milter):
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
            assert "Traceback" not in daemon.log(), daemon.log()
