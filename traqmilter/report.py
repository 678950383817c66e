"""`traqmilter report`: the digest's summary (traqmilter.core.digest) on the command line,
read from the event log.

The source is the line traqmilter.logs.decision() writes for each recipient's fate at end
of message, e.g.

    3F2A1C0B5D: milter: forwarded: from=<s@remote.example> to=<x@fwd.example>
    new=<admin@fwd.example> client=mx.remote.example[192.0.2.7] rule=unknown_forward

(one line), in whatever frame it reached a file: syslog's (`Dec  5 17:00:00 host
traqmilter/milter[42]: ...` or an RFC 3339 stamp), `journalctl -o short-iso`, or a JSON
line (log.format: json, its `time` field). The forwarded, bounced and dropped recipients
and the created mailboxes are counted per domain, exactly as a digest counts them.

SECURITY: a log file may hold anything (other programs write there too, and an attacker
chooses the senders and recipients). A line that is too long, does not parse, or names no
valid recipient is skipped and counted, never fatal. Values are printed in the log's
escaped form (traqmilter.logs.log_value), so no control character reaches the terminal.
Memory is bounded by notifications.max_tracked, as for a digest.
BUGS: whoever can write to the log (any local program, through syslog) can add to the
counts: report believes the lines it reads. A line without a time (log.destination:
stderr, text, captured as is) cannot be placed in --since: it is skipped and counted. A
traditional syslog stamp has no year or zone: the local zone and the latest year that is
not in the future are assumed. `mailbox created` is each recipient's fate line: a message
to new+a@ and new+b@ counts its sender twice (a digest, which sees the message whole, once).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from traqmilter.config import parse_duration
from traqmilter.core.address import Address, AddressError
from traqmilter.core.digest import NOTIFIED_FATES, DigestEvent, DomainTallies
from traqmilter.core.plan import Fate
from traqmilter.core.settings import Action
from traqmilter.logs import log_value

MAX_LINE = 16384  # bytes; a decision line is at most a few KiB (values cut at 512)
MAX_SINCE_SECONDS = 3660 * 86400  # ten years: beyond it a date cannot be formatted sanely

REPORTED_FATES = {**NOTIFIED_FATES, Fate.CREATED: Action.CREATE}

_FATE_LINE = re.compile(
    r"(?:^|\s)\S+: milter: (?P<fate>"
    + "|".join(re.escape(f.value) for f in REPORTED_FATES)
    + r"): from=<(?P<sender>[^<>]*)> to=<(?P<to>[^<>]*)>(?: new=<[^<>]*>)?"
    r" client=.*\[(?P<client>[^\[\]]*)\] rule=\w+$"
)
_ISO_STAMP = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?(?:\s|$)"
)
_BSD_STAMP = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)\s")
_MONTHS = {
    m: n
    for n, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}  # syslog writes them in the C locale
_ESCAPE = re.compile(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})")


class Malformed(ValueError):
    """A line that looks like a decision line but cannot be used."""


def parse_since(text: str) -> float:
    """--since in seconds: a positive duration with its unit (30m, 12h, 1d, 7d). Raises
    ValueError, its text fit for the user."""
    seconds = parse_duration(text, unit_required=True)
    if not 0 < seconds <= MAX_SINCE_SECONDS:
        raise ValueError(f"{text!r} must be more than 0 and at most 3660d")
    return seconds


def stamp_of(line: str, now: float) -> float | None:
    """The time at the start of a log line (RFC 3339 / ISO 8601, or syslog's `Mmm dd
    hh:mm:ss`), seconds since the epoch; None when it has none. Raises Malformed."""
    try:
        iso = _ISO_STAMP.match(line)
        if iso is not None:
            text, fraction, zone = iso.groups()
            # fromisoformat takes at most microseconds; journald's zone is +0000.
            text += f".{fraction[:6]}" if fraction else ""
            when = datetime.fromisoformat(text + (zone or "").replace("Z", "+00:00"))
            return when.timestamp()  # without a zone: local time, as syslog writes it
        bsd = _BSD_STAMP.match(line)
        if bsd is None:
            return None
        month = _MONTHS.get(bsd.group(1))
        if month is None:
            raise Malformed("unknown month")
        day, hour, minute, second = (int(g) for g in bsd.groups()[1:])
        year = datetime.fromtimestamp(now).year
        for guess in (year, year - 1):  # December's lines read in January
            stamp = datetime(guess, month, day, hour, minute, second).timestamp()
            if stamp <= now + 86400:
                return stamp
        return stamp
    except (ValueError, OverflowError) as exc:
        raise Malformed(f"bad time: {exc}") from None


def _unescape(text: str) -> str:
    """traqmilter.logs.log_value undone (a recipient is parsed as the MTA gave it)."""

    def char(match: re.Match[str]) -> str:
        return chr(int(next(g for g in match.groups() if g is not None), 16))

    try:
        return _ESCAPE.sub(char, text)
    except ValueError as exc:  # beyond U+10FFFF
        raise Malformed("bad escape") from exc


def event_of(message: str, parse: Callable[[str], Address]) -> DigestEvent | None:
    """The digest event a decision line's message records; None for any other line.
    parse: the recipient parser the engine uses (delimiters, case). Raises Malformed."""
    fate = _FATE_LINE.search(message)
    if fate is None:
        return None
    try:
        address = parse(_unescape(fate.group("to")))
    except AddressError as exc:
        raise Malformed(f"recipient: {exc}") from None
    if not address.domain:
        raise Malformed("recipient without a domain")
    sender = log_value(_unescape(fate.group("sender"))) or "<>"
    client = log_value(_unescape(fate.group("client"))) or "local"
    action = REPORTED_FATES[Fate(fate.group("fate"))]
    return DigestEvent("", address.domain, action, log_value(address.key), sender, client)


@dataclass
class Reading:
    """What report read: the tallies and how many lines counted or were skipped."""

    tallies: DomainTallies
    counted: int = 0
    undated: int = 0  # decision lines without a time
    malformed: int = 0  # too long, bad JSON, bad time, bad recipient
    older: int = 0  # before --since

    def read(
        self,
        lines: Iterable[str | None],
        *,
        since: float,
        now: float,
        parse: Callable[[str], Address],
    ) -> None:
        """Count the decision lines from `since` on (None: a line that was too long)."""
        for line in lines:
            try:
                if line is None:
                    raise Malformed("line too long")
                stamp, message = _framed(line, now)
                event = event_of(message, parse)
            except Malformed:
                self.malformed += 1
                continue
            if event is None:
                continue
            if stamp is None:
                self.undated += 1
            elif stamp < since:
                self.older += 1
            else:
                self.tallies.add(event)
                self.counted += 1


def _framed(line: str, now: float) -> tuple[float | None, str]:
    """(time, message) of a log line: a JSON line (log.format: json, perhaps behind a
    syslog prefix) carries both; otherwise the stamp in front, and the line."""
    start = line.find('{"')
    if start >= 0:
        try:
            entry = json.loads(line[start:])
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("message"), str):
            stamp = entry.get("time")
            when = stamp_of(stamp, now) if isinstance(stamp, str) else None
            return when if when is not None else stamp_of(line, now), entry["message"]
    return stamp_of(line, now), line


def bounded_lines(stream: BinaryIO) -> Iterator[str | None]:
    """The lines of a byte stream as text (undecodable bytes replaced); None for a line
    longer than MAX_LINE, whose rest is skipped without being held in memory."""
    while True:
        chunk = stream.readline(MAX_LINE + 1)
        if not chunk:
            return
        if len(chunk) > MAX_LINE and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):
                chunk = stream.readline(MAX_LINE + 1)
            yield None
            continue
        yield chunk.decode("utf-8", "replace").rstrip("\r\n")
