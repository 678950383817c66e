"""Render docs/configuration.md and traqmilter.yaml(5) from the declarations in
traqmilter/core/settings.py.

    python -m traqmilter.config_reference > docs/configuration.md
    python -m traqmilter.config_reference --man > docs/man/traqmilter.yaml.5

tests/unit/test_config_reference.py fails when the file and the declarations disagree, so
every key is documented exactly once, with its type, default, bounds and unit.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Any, get_type_hints

from traqmilter.core.settings import Config, Kind

HEADER = """\
# Configuration reference

Generated from `traqmilter/core/settings.py` by
`python -m traqmilter.config_reference`; do not edit by hand.

traqmilter reads one YAML file (default `/etc/traqmilter/traqmilter.yaml`, `-c FILE` to
override). Without a file, the embedded default below runs. An unknown key, a duplicate key
or a bad value stops start-up with the key's path and line. Durations take a unit: `30s`,
`10m`, `1h`, `2d`, `1w` (a bare number is seconds).
"""


def _default(value: Any, kind: Kind | None) -> str:
    if kind is Kind.DURATION:
        return _duration(float(value))
    if kind is Kind.MODE:
        return f"0{value:o}"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "[] (none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '"" (empty)'
    return str(value)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _bounds(meta: Any) -> str:
    low, high, unit = meta["minimum"], meta["maximum"], meta["unit"]
    if low is None and high is None:
        return ""
    if meta["kind"] is Kind.DURATION:
        return f"{_duration(low)} to {_duration(high)}"
    if meta["kind"] is Kind.MODE:
        return f"0{low:o} to 0{high:o}"
    return f"{low} to {high}" + (f" {unit}" if unit else "")


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference: a key, or a section (kind "section", no default)."""

    path: str
    kind: str
    default: str
    bounds: str
    doc: str


def keys(cls: type[Any] = Config, prefix: str = "") -> Iterator[Key]:
    """Every declared key and section of `cls`, in declaration order."""
    instance = cls()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        meta = f.metadata
        if "written_as" in meta:
            continue  # documented with the key it is written as
        if "kind" in meta:
            kind = meta["kind"]
            default = _default(getattr(instance, f.name), kind)
            shown = kind.value
            if kind is Kind.CHOICE:
                shown = "one of " + ", ".join(choice or '""' for choice in meta["choices"])
            yield Key(path, shown, default, _bounds(meta), meta["doc"])
        elif "entry" in meta:
            yield Key(f"{path}.<name>", "mapping", "{}", "", meta["doc"])
        elif dataclasses.is_dataclass(hints[f.name]):
            yield Key(path, "section", "", "", meta.get("doc", ""))
            yield from keys(hints[f.name], f"{path}.")


def _row(key: Key) -> str:
    if key.kind == "section":
        return f"| `{key.path}` | section | | | {key.doc} |"
    if key.kind == "mapping":
        return f"| `{key.path}` | mapping | `{key.default}` | | {key.doc} |"
    return f"| `{key.path}` | {key.kind} | `{key.default}` | {key.bounds} | {key.doc} |"


ENTRIES_NOTE = (
    "Each entry of `domains` and `exceptions` takes the keys of `undelivered`; a key it",
    "does not name keeps the value from `undelivered`.",
)

EXAMPLE = """\
## Example

A complete file for one Postfix server, `mx.example.com`, that receives mail for six
domains and handles their unknown recipients in each of the six ways. Every key it does
not write keeps the default above. The endpoints must match contrib/postfix/ (the values
here are the defaults both sides ship). Before a first start, add the mailboxes it names,
`traqmilter mailbox add ADDRESS` for each of `postmaster@example.com`, `admin@example.org`,
`sales@example.com` and `customer@shop.example`, then run `traqmilter check`.
`tests/unit/test_config_example.py` loads this block with `traqmilter check`, and
`tests/integration/test_shipped_config.py` runs it with the contrib Postfix files.

```yaml
# /etc/traqmilter/traqmilter.yaml on mx.example.com
state_dir: /var/lib/traqmilter          # dictionary-attack blocks survive restarts here

directory:
  # Mailboxes, aliases and domains; Postfix reads the same file (contrib/postfix).
  sqlite: /var/lib/traqmilter/directory.sqlite
  recipient_delimiter: "+"              # the same as Postfix's recipient_delimiter

undelivered:                            # the default for every local domain
  action: reject                        # 550 5.1.1 at RCPT: nothing accepted, nothing sent
  reject_text: User unknown

domains:                                # the local domains; each may override undelivered
  example.com: {}                       # the main domain: unknown recipients are rejected
  example.org:                          # a small office: everything unknown to one person
    action: forward
    forward_to: admin                   # a local part of this domain, or a full address
  example.net:                          # the company's old name: user@example.net is
    action: readdress                   #   delivered to user@example.com
    readdress_to: example.com
  shop.example:                         # each customer gets a mailbox on first mail,
    action: create                      #   with the settings of customer@shop.example
    template: customer
  split.example:                        # shared with another server: addresses unknown
    action: outbox                      #   here are relayed there unaltered
    outbox_relay: "[mx2.example.com]:25"
  old.example:                          # a closed internal system whose senders want a
    action: bounce                      #   delivery report (not on the open Internet:
    bounce_template: /etc/traqmilter/bounce.txt.j2  # backscatter, see actions.md)

exceptions:                             # per address or pattern; the first match wins
  "sales-*@example.com":                # retired campaign addresses reach the sales team
    action: forward
    forward_to: sales@example.com

postmaster: postmaster@example.com      # postmaster@ every local domain reaches this mailbox

dictionary_attack:                      # 5 unknown recipients in 10 minutes: blocked 1 hour
  threshold: 5
  window: 10m
  block: 1h
  exempt: [127.0.0.0/8, "::1/128", 192.0.2.0/24]   # loopback and the office network
  exempt_authenticated: true            # SASL users (your own staff) are never counted

queue:
  high_water: 40000                     # above it, accept-time actions turn into reject
  defer_water: 60000                    # above it, new mail is deferred (452 4.3.1)
  directory: /var/spool/postfix         # Postfix's queue_directory

policyd:
  listen: "inet:127.0.0.1:10040"        # main.cf: check_policy_service
  socketmap_listen: "inet:127.0.0.1:10041"   # main.cf: transport_maps (outbox)

milter:
  listen: "inet:127.0.0.1:8891"         # main.cf: smtpd_milters
  role: postfix

bounce:
  submit: smtp
  smtp_submit: "inet:127.0.0.1:10026"   # master.cf: the DSN smtpd
  rate_per_sender: 5                    # at most 5 reports to one sender per hour
  rate_window: 1h

create:
  max_total: 5000                       # at most this many mailboxes made by create
  rate_per_hour: 20

log:
  destination: stderr                   # journald under systemd
  level: info
```
"""


def render() -> str:
    lines = [
        HEADER,
        "| key | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [_row(key) for key in keys()]
    lines += ["", *ENTRIES_NOTE, "", EXAMPLE.rstrip("\n")]
    return "\n".join(lines) + "\n"


MAN_HEADER = r""".\" Generated from traqmilter/core/settings.py by
.\" python -m traqmilter.config_reference --man; do not edit by hand.
.TH TRAQMILTER.YAML 5 "" "traqmilter" "File Formats Manual"
.SH NAME
traqmilter.yaml \- traqmilter configuration file
.SH SYNOPSIS
.I /etc/traqmilter/traqmilter.yaml
.SH DESCRIPTION
.BR traqmilter (8)
reads one YAML file (default
.IR /etc/traqmilter/traqmilter.yaml ,
.B \-c
.I file
to override). Without a file, the embedded default runs. An unknown key, a duplicate key
or a bad value stops start\-up with the key's path and line. Durations take a unit:
.BR 30s ,
.BR 10m ,
.BR 1h ,
.BR 2d ,
.B 1w
(a bare number is seconds). A reload (SIGHUP) reads the file again.
.PP
Keys are written below as dotted paths:
.B queue.high_water
is
.B high_water
inside the
.B queue
mapping.
.SH KEYS
"""

MAN_FOOTER = r""".SH EXAMPLE
.EX
domains:
  example.com: {action: reject}
  example.org: {action: forward, forward_to: admin}
milter: {role: postfix}
queue: {high_water: 40000, defer_water: 60000}
.EE
.SH FILES
.TP
.I /etc/traqmilter/traqmilter.yaml
The default location.
.SH SEE ALSO
.BR traqmilter (8)
.PP
.I docs/configuration.md
holds the same reference as a table.
"""


def _roff(text: str) -> str:
    """Text safe in a roff text line: backslashes escaped, backticks dropped, hyphens of
    options kept literal, no line starting a request."""
    text = text.replace("\\", "\\e").replace("`", "").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def render_man() -> str:
    lines = [MAN_HEADER.rstrip("\n")]
    for key in keys():
        if key.kind == "section":
            lines += [".SS " + _roff(key.path), _roff(key.doc)]
            continue
        facts = [key.kind]
        if key.default:
            facts.append("default " + _roff(key.default))
        if key.bounds:
            facts.append(_roff(key.bounds))
        lines += [".TP", ".B " + _roff(key.path), "(" + "; ".join(facts) + ")", _roff(key.doc)]
    lines += [".PP", _roff(" ".join(ENTRIES_NOTE)), MAN_FOOTER.rstrip("\n")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_man() if sys.argv[1:] == ["--man"] else render(), end="")
