"""policyd as an administrator runs it, with metrics on: real policy requests over a socket
(a known recipient, unknown ones, a harvester crossing the dictionary-attack threshold),
then /metrics scraped over HTTP and parsed with prometheus_client's own parser, and the
event log read back from the daemon's stderr."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon_world import (
    KNOWN,
    PolicyConnection,
    inet_policyd,
    make_directory,
    rcpt_request,
    unknown_until_blocked,
    write_config,
)
from tests.support.daemon_process import DaemonProcess
from tests.support.postfix import free_loopback_port

THRESHOLD = 3
HARVESTER = "203.0.113.5"
INNOCENT = "198.51.100.7"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_real_traffic_and_the_log_has_postfix_lines(tmp_path: Path) -> None:
    make_directory(tmp_path)
    port, metrics_port = free_loopback_port(), free_loopback_port()
    config = tmp_path / "traqmilter.yaml"
    write_config(
        config,
        root=tmp_path,
        threshold=THRESHOLD,
        policyd=inet_policyd(port),
        extra=f'metrics: {{listen: "inet:127.0.0.1:{metrics_port}"}}\n',
    )
    with DaemonProcess(config, "policyd", port) as daemon:
        connection = PolicyConnection(port=port)
        try:
            assert connection.ask(rcpt_request(KNOWN, INNOCENT)) == "DUNNO"
            attempts = unknown_until_blocked(connection, HARVESTER)
        finally:
            connection.close()
        samples = scrape(metrics_port)
        daemon.stop()
        log = daemon.log()

    assert attempts == THRESHOLD + 1  # threshold unknown recipients answered, the next blocked

    def decisions(rule: str) -> float:
        labels = (("daemon", "policyd"), ("domain", "example.com"), ("rule", rule))
        return samples.get(("traqmilter_decisions_total", labels), 0.0)

    assert decisions("known") == 1
    assert decisions("unknown_reject") == attempts - 1
    assert decisions("client_blocked") == 1
    assert samples[("traqmilter_blocks_total", ())] == 1
    assert samples[("traqmilter_errors_total", (("daemon", "policyd"),))] == 0
    requests = 1 + attempts
    latency = (("daemon", "policyd"),)
    assert samples[("traqmilter_decision_seconds_count", latency)] == requests
    assert samples[("traqmilter_dsn_total", (("result", "sent"),))] == 0

    assert (
        "NOQUEUE: policyd: reject: RCPT from unknown[203.0.113.5]: 550 5.1.1 "
        "<nobody1@example.com>: Recipient address rejected: User unknown; "
        "from=<someone@sender.example> to=<nobody1@example.com> proto=ESMTP "
        "helo=<harvester.example> rule=unknown_reject"
    ) in log, log
    assert f"policyd: block: client={HARVESTER} attempts={THRESHOLD + 1} until=" in log, log
    assert f"to=<{KNOWN}>" not in log, log  # accepted recipients only at level debug
