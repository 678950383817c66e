"""`traqmilter report`: --since, the log line frames, hostile lines, and the summary, from
lines the real log writer (traqmilter.logs.decision) produced."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path

import pytest

from traqmilter.cli import main
from traqmilter.core.address import parse_address
from traqmilter.core.digest import DomainTallies
from traqmilter.core.plan import Fate
from traqmilter.core.rule_names import RuleName
from traqmilter.logs import JsonFormatter, decision
from traqmilter.report import (
    MAX_LINE,
    Malformed,
    Reading,
    bounded_lines,
    parse_since,
    stamp_of,
)

NOW = datetime(2026, 12, 5, 18, 0, 0).timestamp()  # local time, as syslog stamps are


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("12h", 43200), ("1d", 86400), ("7d", 604800), ("90s", 90), ("1.5h", 5400)],
)
def test_since_takes_a_duration_with_its_unit(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "1", "30", "1x", "d", "-1d", "1 day", "0m", "1e3d", "3661d", "9" * 400 + "d"]
)
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|more than 0"):
        parse_since(text)


def fate_line(
    fate: Fate,
    rule: RuleName,
    recipient: str,
    *,
    sender: str = "<s@remote.example>",
    client: str = "192.0.2.7",
    new: str = "",
) -> str:
    """The message of a fate line, as the milter logs it."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.report")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        decision(
            logger,
            "milter",
            fate.value,
            queue_id="3F2A1C0B5D",
            client_name="mx.remote.example",
            client_address=client,
            sender=sender,
            recipients=(recipient,),
            rule=rule,
            new=new,
        )
    finally:
        logger.removeHandler(handler)
    (record,) = records
    message = record.getMessage()
    assert isinstance(message, str)
    return message


FORWARDED = fate_line(
    Fate.FORWARDED, RuleName.UNKNOWN_FORWARD, "<Often+x@fwd.example>", new="<admin@fwd.example>"
)
BOUNCED = fate_line(Fate.BOUNCED, RuleName.UNKNOWN_BOUNCE, "<y@bounce.example>", sender="<>")
CREATED = fate_line(Fate.CREATED, RuleName.UNKNOWN_CREATE, "<fresh@shop.example>")


def read(lines: list[str | None], since: float = 86400) -> Reading:
    reading = Reading(DomainTallies(max_tracked=10))
    reading.read(lines, since=NOW - since, now=NOW, parse=parse_address)
    return reading


def test_every_frame_a_log_reaches_a_file_in() -> None:
    json_line = JsonFormatter("milter").format(
        logging.LogRecord("traqmilter.milter", logging.INFO, "", 0, FORWARDED, None, None)
    )
    entry = json.loads(json_line)
    entry["time"] = "2026-12-05T16:30:00.123Z"
    lines: list[str | None] = [
        f"Dec  5 17:00:00 mx traqmilter/milter[42]: {FORWARDED}",  # syslog, local time
        f"2026-12-05T17:10:00.123456+00:00 mx traqmilter/milter[42]: {FORWARDED}",  # rsyslog
        f"2026-12-05T17:20:00+0000 mx traqmilter/milter[42]: {FORWARDED}",  # journalctl
        f"2026-12-05T17:20:00.123456789Z mx traqmilter/milter[42]: {FORWARDED}",  # ns
        json.dumps(entry),  # log.format: json
        f"Dec  5 17:00:00 mx traqmilter/milter: {json.dumps(entry)}",  # json through syslog
    ]
    reading = read(lines, since=10 * 86400)
    assert (reading.counted, reading.undated, reading.malformed) == (6, 0, 0)
    (summary,) = reading.tallies.summaries(5)
    assert summary.domain == "fwd.example"
    assert summary.forwarded.top == (("often@fwd.example", 6),)  # the base key, as digests
    assert summary.senders.top == (("s@remote.example", 6),)
    assert summary.clients.top == (("192.0.2.7", 6),)


def test_since_and_undated_lines() -> None:
    reading = read(
        [
            f"Dec  5 17:59:00 mx m: {BOUNCED}",
            f"Dec  5 16:00:00 mx m: {BOUNCED}",  # two hours ago
            f"traqmilter.milter: {BOUNCED}",  # stderr, text: no time
        ],
        since=3600,
    )
    assert (reading.counted, reading.older, reading.undated) == (1, 1, 1)
    (summary,) = reading.tallies.summaries(5)
    assert summary.bounced.top == (("y@bounce.example", 1),)
    assert summary.senders.top == (("<>", 1),)  # the null sender, named


def test_a_december_stamp_read_in_january_is_last_year() -> None:
    january = datetime(2027, 1, 1, 0, 30).timestamp()
    assert (
        stamp_of("Dec 31 23:50:00 mx m: x", january) == datetime(2026, 12, 31, 23, 50).timestamp()
    )


@pytest.mark.parametrize(
    "line",
    [
        None,  # longer than MAX_LINE
        f"Feb 30 10:00:00 mx m: {FORWARDED}",  # no such day
        f"Foo  5 10:00:00 mx m: {FORWARDED}",
        f"2026-12-05T25:00:00Z mx m: {FORWARDED}",
        "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<a@b> to=<not an address> "
        "client=x[1] rule=unknown_forward",
        "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<a@b> to=<bare> client=x[1] rule=r",
        "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<a@b> to=<\\U7fffffff@x.example> "
        "client=x[1] rule=r",
        "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<a@b> to=<a\\x0a@x.example> "
        "client=x[1] rule=r",
    ],
)
def test_hostile_lines_are_skipped_and_counted(line: str | None) -> None:
    reading = read([line, f"Dec  5 17:00:00 mx m: {CREATED}"])
    assert (reading.counted, reading.malformed) == (1, 1)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\x00\x1b[2J",
        "Dec  5 17:00:00 mx postfix/smtpd[1]: connect from unknown[192.0.2.1]",
        "Dec  5 17:00:00 mx m: Q: milter: readdressed: from=<a@b> to=<c@d> new=<c@e> "
        "client=x[1] rule=unknown_readdress",
        "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<a@b> to=<c@fwd.example>",  # cut
        '{"time": 5, "message": 7}',
        "{not json",
    ],
)
def test_other_lines_are_not_counted(line: str) -> None:
    reading = read([line])
    assert (reading.counted, reading.tallies.summaries(5)) == (0, ())


def test_values_are_printed_as_the_log_escapes_them() -> None:
    # A sender with a terminal escape: the log writes it escaped, report keeps it so.
    line = fate_line(
        Fate.FORWARDED, RuleName.UNKNOWN_FORWARD, "<ü@fwd.example>", sender="<a\x1b[2J@b>"
    )
    assert "\x1b" not in line
    (summary,) = read([f"Dec  5 17:00:00 mx m: {line}"]).tallies.summaries(5)
    assert summary.forwarded.top == (("\\xfc@fwd.example", 1),)
    assert summary.senders.top == (("a\\x1b[2J@b", 1),)


def test_a_raw_control_character_in_a_forged_line_never_reaches_the_output() -> None:
    forged = "Dec  5 17:00:00 mx m: Q: milter: forwarded: from=<\x1b]0;x\x07@b> to=<c@fwd.example> "
    reading = read([forged + "client=x[\x1b1] rule=unknown_forward"])
    (summary,) = reading.tallies.summaries(5)
    assert summary.senders.top == (("\\x1b]0;x\\x07@b", 1),)
    assert summary.clients.top == (("\\x1b1", 1),)


def test_bounded_lines_skip_an_endless_line_without_holding_it() -> None:
    stream = io.BytesIO(b"a\n" + b"x" * (3 * MAX_LINE) + b"\nb\r\n\xff\xfe\nlast")
    assert list(bounded_lines(stream)) == ["a", None, "b", "\ufffd\ufffd", "last"]


def test_stamp_without_one_is_none() -> None:
    assert stamp_of("traqmilter.milter: x", NOW) is None
    with pytest.raises(Malformed):
        stamp_of("Dec 32 10:00:00 mx m: x", NOW)


# --- the command


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "t.yaml"
    path.write_text(f"state_dir: {tmp_path}/s\ndirectory: {{sqlite: {tmp_path}/d.sqlite}}\n")
    return str(path)


def test_report_prints_the_digest_summary(
    tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stamp = datetime.now().strftime("%b %e %H:%M:%S")  # local time, as syslog
    log = tmp_path / "mail.log"
    rare = fate_line(Fate.FORWARDED, RuleName.UNKNOWN_FORWARD, "<rare@fwd.example>")
    log.write_text(
        "".join(f"{stamp} mx traqmilter/milter[1]: {m}\n" for m in (FORWARDED, rare, FORWARDED))
        + f"{stamp} mx traqmilter/milter[1]: {CREATED}\n"
        + "garbage\nDec 32 00:00:00 mx m: x\n"
        + f"traqmilter.milter: {BOUNCED}\n"
    )
    assert main(["-c", config, "report", "--since", "1h", str(log)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("What traqmilter did for unknown recipients from ")
    assert (
        "Domain fwd.example\n"
        "  Unknown addresses forwarded to the catch-all (forward), most used first:\n"
        "         2  often@fwd.example\n"
        "         1  rare@fwd.example\n"
        "  Senders:\n"
        "         3  s@remote.example\n"
        "  Clients:\n"
        "         3  192.0.2.7\n"
    ) in out
    assert "Domain shop.example\n  New mailboxes (create):\n    fresh@shop.example\n" in out
    assert "bounce.example" not in out  # its only line has no time
    assert err == (
        "traqmilter: report: 4 recipients counted; 1 decision lines without a time skipped; "
        "1 malformed lines skipped\n"
    )


def test_report_with_nothing_says_so(
    tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "empty.log"
    log.write_text("")
    assert main(["-c", config, "report", str(log)]) == 0
    out, _ = capsys.readouterr()
    assert out.endswith("\n\nNothing: no mailbox created, no unknown address used.\n")


@pytest.mark.parametrize("since", ["1x", "30", "0d", "-1h"])
def test_report_refuses_a_bad_since(
    since: str, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["-c", config, "report", "--since", since, "/dev/null"])
    assert exited.value.code == 2
    assert "argument --since: " in capsys.readouterr().err


def test_report_names_a_log_it_cannot_read(
    tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", config, "report", str(tmp_path / "absent.log")]) == 2
    assert "absent.log: No such file or directory" in capsys.readouterr().err


def test_report_reads_standard_input(
    config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = f"2026-12-05T17:20:00+0000 mx traqmilter/milter[42]: {BOUNCED}\n".encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert main(["-c", config, "report", "--since", "3660d"]) == 0
    out, err = capsys.readouterr()
    assert "Domain bounce.example\n" in out and "         1  y@bounce.example\n" in out
    assert err == "traqmilter: report: 1 recipients counted\n"
