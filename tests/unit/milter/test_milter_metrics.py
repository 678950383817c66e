"""The milter's metrics and its escaped event log: one conversation through TestCtx with a
Metrics object, then its registry read back with prometheus_client's parser."""

from __future__ import annotations

import logging
from pathlib import Path

import Milter
import pytest
from milter_support import Conversation, make_deployment
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from traqmilter.metrics import Metrics

SENDER = "sender@remote.example"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_milter_counts_decisions_mailboxes_and_dsns(tmp_path: Path) -> None:
    metrics = Metrics("milter")
    outcome = Conversation(make_deployment(tmp_path).service, metrics=metrics).send(
        SENDER,
        ["alice@example.com", "zed@bounce.example", "newbie@shop.example", "a@elsewhere.test"],
    )
    assert outcome.eom == Milter.CONTINUE
    got = samples(metrics)

    def decisions(domain: str, rule: str) -> float:
        labels = (("daemon", "milter"), ("domain", domain), ("rule", rule))
        return got.get(("traqmilter_decisions_total", labels), 0.0)

    assert decisions("example.com", "known") == 1
    assert decisions("bounce.example", "unknown_bounce") == 1
    assert decisions("shop.example", "unknown_create") == 1
    assert decisions("-", "not_local") == 1
    assert got[("traqmilter_mailboxes_created_total", ())] == 1
    assert got[("traqmilter_dsn_total", (("result", "sent"),))] == 1
    assert got[("traqmilter_dsn_total", (("result", "suppressed"),))] == 0
    assert got[("traqmilter_errors_total", (("daemon", "milter"),))] == 0
    assert got[("traqmilter_decision_seconds_count", (("daemon", "milter"),))] == 4


def test_milter_refusal_line_escapes_the_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "traqmilter.milter")
    outcome = Conversation(make_deployment(tmp_path).service).send(
        "evil\r\nNOQUEUE: fake>@remote.example", ["nobody@example.com"]
    )
    assert outcome.rcpts == {"nobody@example.com": Milter.REJECT}
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "4QUEUEID: milter: reject: RCPT from client.test[192.0.2.10]: 550 5.1.1 "
        "<nobody@example.com>: Recipient address rejected: User unknown; "
        "from=<evil\\x0d\\x0aNOQUEUE: fake\\x3e@remote.example> to=<nobody@example.com> "
        "rule=unknown_reject"
    )
