"""Render docs/configuration.md from the declarations in traqmilter/core/settings.py.

    python -m traqmilter.config_reference > docs/configuration.md

tests/unit/test_config_reference.py fails when the file and the declarations disagree, so
every key is documented exactly once, with its type, default, bounds and unit.
"""

from __future__ import annotations

import dataclasses
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


def _rows(cls: type[Any], prefix: str) -> Iterator[str]:
    instance = cls()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        meta = f.metadata
        if "kind" in meta:
            kind = meta["kind"]
            yield (
                f"| `{path}` | {kind.value} | `{_default(getattr(instance, f.name), kind)}` "
                f"| {_bounds(meta)} | {meta['doc']} |"
            )
        elif "entry" in meta:
            yield f"| `{path}.<name>` | mapping | `{{}}` | | {meta['doc']} |"
        elif dataclasses.is_dataclass(hints[f.name]):
            yield f"| `{path}` | section | | | {meta.get('doc', '')} |"
            yield from _rows(hints[f.name], f"{path}.")


def render() -> str:
    lines = [
        HEADER,
        "| key | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += list(_rows(Config, ""))
    lines += [
        "",
        "Each entry of `domains` and `exceptions` takes the keys of `undelivered`; a key it",
        "does not name keeps the value from `undelivered`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
