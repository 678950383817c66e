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
        if "kind" in meta:
            kind = meta["kind"]
            default = _default(getattr(instance, f.name), kind)
            yield Key(path, kind.value, default, _bounds(meta), meta["doc"])
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


def render() -> str:
    lines = [
        HEADER,
        "| key | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [_row(key) for key in keys()]
    lines += ["", *ENTRIES_NOTE]
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
