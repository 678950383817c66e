"""The event log: escaping of network values, policyd's Postfix-shaped lines (golden
strings), the JSON format read back, the log destination, and the metrics' labels."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from policyd.codec import PolicyRequest, parse_request
from policyd.main import log_decision
from traqmilter import logs
from traqmilter.config import ConfigError, load_config
from traqmilter.core import replies
from traqmilter.core.address import parse_address
from traqmilter.core.attack import Block
from traqmilter.core.engine import RcptDecision
from traqmilter.core.settings import DomainPolicy, LogSettings
from traqmilter.logs import JsonFormatter, configure_logging, log_value
from traqmilter.metrics import Metrics

LOCAL = DomainPolicy()

# --- log_value

ESCAPES = [
    # label, value from the network, as logged
    ("plain address", "zed@example.com", "zed@example.com"),
    ("empty", "", ""),
    ("CR LF forging a line", "a\r\nNOQUEUE: fake", "a\\x0d\\x0aNOQUEUE: fake"),
    ("NUL", "a\x00b", "a\\x00b"),
    ("ESC and DEL", "\x1b[31m\x7f", "\\x1b[31m\\x7f"),
    ("percent stays literal", "100%s%d%%", "100%s%d%%"),
    ("double quote", 'say "hi"', "say \\x22hi\\x22"),
    (
        "angle brackets close a field",
        "x> to=<admin@example.com",
        "x\\x3e to=\\x3cadmin@example.com",
    ),
    ("backslash", "a\\x0a", "a\\x5cx0a"),
    ("non-ASCII", "jürgen@例え.jp", "j\\xfcrgen@\\u4f8b\\u3048.jp"),
    ("C1 control", "a\x85b", "a\\x85b"),
]


@pytest.mark.parametrize(("label", "value", "want"), ESCAPES, ids=[c[0] for c in ESCAPES])
def test_log_value_escapes(label: str, value: str, want: str) -> None:
    assert log_value(value) == want


def test_log_value_output_is_printable_ascii_without_delimiters() -> None:
    every_char = "".join(chr(code) for code in range(0x300))
    escaped = log_value(every_char[: logs.MAX_LOGGED_VALUE])
    assert escaped.isascii() and escaped.isprintable()
    assert not set('"<>') & set(escaped)


def test_log_value_is_bounded() -> None:
    assert log_value("a" * 10_000) == "a" * logs.MAX_LOGGED_VALUE + "..."


def test_percent_in_a_value_survives_logging_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("traqmilter.test").info("from=<%s>", log_value("%s%(x)s"))
    assert caplog.records[0].getMessage() == "from=<%s%(x)s>"


# --- policyd's lines


def policy_request(**attributes: str) -> PolicyRequest:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "203.0.113.5",
        "client_name": "unknown",
        "helo_name": "h",
        "sender": "s@x",
        "recipient": "zed@example.com",
        "queue_id": "",
    }
    base.update(attributes)
    parsed = parse_request("\n".join(f"{k}={v}" for k, v in base.items()).encode())
    assert isinstance(parsed, PolicyRequest), parsed
    return parsed


def decision(rule: str, reply: replies.Reply | None, block: Block | None = None) -> RcptDecision:
    return RcptDecision(rule, reply, None, parse_address("zed@example.com"), LOCAL, new_block=block)


@pytest.fixture
def event_log(caplog: pytest.LogCaptureFixture) -> Iterator[logging.Logger]:
    caplog.set_level(logging.DEBUG, logger="traqmilter.policyd")
    yield logging.getLogger("traqmilter.policyd")


GOLDEN = [
    (
        "unknown, rejected",
        {},
        decision("unknown_reject", replies.user_unknown("zed@example.com", "User unknown")),
        "NOQUEUE: policyd: reject: RCPT from unknown[203.0.113.5]: 550 5.1.1 "
        "<zed@example.com>: Recipient address rejected: User unknown; from=<s@x> "
        "to=<zed@example.com> proto=ESMTP helo=<h> rule=unknown_reject",
    ),
    (
        "blocked client, deferred, with a queue id and a client name",
        {"queue_id": "4ABC123", "client_name": "mx.example.net"},
        decision("client_blocked", replies.S450_CLIENT_BLOCKED),
        "4ABC123: policyd: defer: RCPT from mx.example.net[203.0.113.5]: 450 4.7.1 "
        "<zed@example.com>: Recipient address rejected: Too many unknown recipients from "
        "your address, try again later; from=<s@x> to=<zed@example.com> proto=ESMTP "
        "helo=<h> rule=client_blocked",
    ),
    (
        "null sender, hostile HELO",
        {"sender": "", "helo_name": "evil\x1b>\r"},
        decision("unknown_null_sender", replies.user_unknown("zed@example.com", "User unknown")),
        "NOQUEUE: policyd: reject: RCPT from unknown[203.0.113.5]: 550 5.1.1 "
        "<zed@example.com>: Recipient address rejected: User unknown; from=<> "
        "to=<zed@example.com> proto=ESMTP helo=<evil\\x1b\\x3e\\x0d> rule=unknown_null_sender",
    ),
    (
        "known, at debug",
        {"client_name": ""},
        decision("known", None),
        "NOQUEUE: policyd: dunno: RCPT from unknown[203.0.113.5]: from=<s@x> "
        "to=<zed@example.com> proto=ESMTP helo=<h> rule=known",
    ),
]


@pytest.mark.parametrize(
    ("label", "attributes", "rcpt_decision", "want"), GOLDEN, ids=[c[0] for c in GOLDEN]
)
def test_policyd_decision_line(
    label: str,
    attributes: dict[str, str],
    rcpt_decision: RcptDecision,
    want: str,
    event_log: logging.Logger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_decision(event_log, policy_request(**attributes), rcpt_decision)
    assert [r.getMessage() for r in caplog.records] == [want]


def test_accepted_recipients_are_not_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="traqmilter.policyd")
    log_decision(logging.getLogger("traqmilter.policyd"), policy_request(), decision("known", None))
    assert caplog.records == []


def test_policyd_block_line(event_log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    logs.policyd_block(event_log, Block("203.0.113.5", until=1_800_000_000.0, attempts=5))
    assert [r.getMessage() for r in caplog.records] == [
        "policyd: block: client=203.0.113.5 attempts=5 until=2027-01-15T08:00:00Z"
    ]


# --- formats and destinations


def test_json_lines_parse_back_with_the_decision_fields(
    event_log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    request = policy_request(sender='s"\r@x', queue_id="4ABC123")
    rejected = decision("unknown_reject", replies.user_unknown("zed@example.com", "User unknown"))
    log_decision(event_log, request, rejected)
    (record,) = caplog.records
    line = JsonFormatter("policyd").format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["daemon"] == "policyd" and entry["level"] == "info"
    assert entry["time"].endswith("Z")
    assert entry["message"] == record.getMessage()
    assert {k: entry[k] for k in ("queue_id", "action", "rule", "from", "to", "new", "client")} == {
        "queue_id": "4ABC123",
        "action": "reject",
        "rule": "unknown_reject",
        "from": "s\\x22\\x0d@x",
        "to": "zed@example.com",
        "new": "",
        "client": "unknown[203.0.113.5]",
    }


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_syslog_without_dev_log_falls_back_to_stderr_with_a_warning(
    restore_root_logger: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", "/nonexistent/dev-log")
    handler = configure_logging(LogSettings(destination="syslog"), "policyd")
    assert isinstance(handler, logging.StreamHandler)
    assert "cannot log to /nonexistent/dev-log; logging to stderr" in capsys.readouterr().err


def test_syslog_lines_carry_facility_tag_and_pid(
    restore_root_logger: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "log")  # a stand-in for /dev/log: a unix datagram socket
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(5)
        handler = configure_logging(LogSettings(destination="syslog"), "policyd")
        assert isinstance(handler, logging.handlers.SysLogHandler)
        assert logs.preserved_log_files() == [handler.socket.fileno()]
        logging.getLogger("traqmilter.policyd").info("NOQUEUE: policyd: %s", log_value("x\n"))
        datagram = syslog.recv(4096)
    # <22>: facility mail (2) * 8 + severity info (6); the tag as rsyslog shows it.
    assert (
        datagram == f"<22>traqmilter/policyd[{os.getpid()}]: NOQUEUE: policyd: x\\x0a\x00".encode()
    )


def test_text_lines_carry_no_traceback_unless_debug(restore_root_logger: None) -> None:
    handler = configure_logging(LogSettings(), "policyd")
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    try:
        raise ValueError("secret input\r\nfrom the network")
    except ValueError:
        logging.getLogger("traqmilter.policyd").exception("policyd: request handler failed")
    assert stream.getvalue() == (
        "traqmilter.policyd: policyd: request handler failed\n(exception: ValueError)\n"
    )


def test_json_destination_writes_one_object_per_line(restore_root_logger: None) -> None:
    handler = configure_logging(LogSettings(format="json", level="debug"), "milter")
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    logging.getLogger("traqmilter.milter").debug("milter: %s", "x\ny")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "milter: x\ny"  # JSON escapes it; one line


# --- metrics and their config


def test_metrics_label_only_local_domains() -> None:
    metrics = Metrics("policyd")
    metrics.decision(decision("known", None))
    metrics.decision(RcptDecision("not_local", None, None, parse_address("a@elsewhere.example")))
    metrics.decision(decision("client_blocked", replies.S450_CLIENT_BLOCKED, Block("x", 0.0, 5)))
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    domain = ("domain", "example.com")
    assert (
        samples[("traqmilter_decisions_total", (("daemon", "policyd"), domain, ("rule", "known")))]
        == 1
    )
    assert (
        samples[
            (
                "traqmilter_decisions_total",
                (("daemon", "policyd"), ("domain", "-"), ("rule", "not_local")),
            )
        ]
        == 1
    )
    assert samples[("traqmilter_blocks_total", ())] == 1
    assert samples[("traqmilter_dsn_total", (("result", "suppressed"),))] == 0


@pytest.mark.parametrize(
    ("listen", "accepted"),
    [
        ("inet:127.0.0.1:9100", True),
        ("inet:[::1]:9100", True),
        ("inet:0.0.0.0:9100", False),
        ("inet:192.0.2.1:9100", False),
        ("inet:localhost:9100", False),
        ("inet:127.0.0.1:0", False),
        ("unix:/run/metrics", False),
    ],
)
def test_metrics_listen_is_loopback_only(tmp_path: Path, listen: str, accepted: bool) -> None:
    path = tmp_path / "traqmilter.yaml"
    path.write_text(f'domains: {{example.com: {{}}}}\nmetrics: {{listen: "{listen}"}}\n')
    if accepted:
        assert load_config(str(path)).metrics.listen == listen
    else:
        with pytest.raises(ConfigError, match=r"metrics\.listen"):
            load_config(str(path))


def test_the_two_metrics_ports_must_differ(tmp_path: Path) -> None:
    path = tmp_path / "traqmilter.yaml"
    listen = "inet:127.0.0.1:9100"
    path.write_text(
        "domains: {example.com: {}}\n"
        f'metrics: {{listen: "{listen}", milter_listen: "{listen}"}}\n'
    )
    with pytest.raises(ConfigError, match=r"metrics\.milter_listen: must differ"):
        load_config(str(path))


# --- one decision line for both front ends

EVENT_KEYS = {"queue_id", "action", "rule", "from", "to", "new", "client"}


@pytest.mark.parametrize(
    ("label", "kwargs", "want"),
    [
        (
            "milter at RCPT, hostile recipient escaped",
            {"stage": "RCPT", "reply": replies.S450_CREATE_RATE, "recipients": ("<a>b@x>",)},
            "4Q: milter: defer: RCPT from mx[192.0.2.1]: 450 4.7.1 <a\\x3eb@x>: Recipient "
            "address rejected: Too many new mailboxes, try again later; from=<s@x> "
            "to=<a\\x3eb@x> rule=unknown_create",
        ),
        (
            "milter at END-OF-MESSAGE, two recipients",
            {"stage": "END-OF-MESSAGE", "reply": replies.S554_LOOP, "recipients": ("<a@x>", "b@x")},
            "4Q: milter: defer: END-OF-MESSAGE from mx[192.0.2.1]: 554 5.4.6 Mail loop "
            "detected: too many hops; from=<s@x> to=<a@x>,<b@x> rule=unknown_create",
        ),
        (
            "milter fate",
            {"recipients": ("<a@x>",), "new": "<admin@x>"},
            "4Q: milter: defer: from=<s@x> to=<a@x> new=<admin@x> client=mx[192.0.2.1] "
            "rule=unknown_create",
        ),
    ],
)
def test_decision_line_shapes_and_fields(
    label: str, kwargs: dict[str, object], want: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="traqmilter.milter")
    fields: dict[str, object] = {
        "queue_id": "4Q",
        "client_name": "mx",
        "client_address": "192.0.2.1",
        "sender": "<s@x>",
        "rule": "unknown_create",
        **kwargs,
    }
    logs.decision(logging.getLogger("traqmilter.milter"), "milter", "defer", **fields)  # type: ignore[arg-type]
    (record,) = caplog.records
    assert record.getMessage() == want
    assert set(record.event) == EVENT_KEYS  # type: ignore[attr-defined]
    entry = json.loads(JsonFormatter("milter").format(record))
    assert entry["client"] == "mx[192.0.2.1]" and entry["from"] == "s@x"
