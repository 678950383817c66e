"""Listen addresses as the config writes them: `inet:HOST:PORT` or `unix:/path`.

One parser for every daemon (policyd, the socketmap, the milter, metrics) and for the
config loader, so that what the config accepts is exactly what the daemons can bind.
HOST is a name, an IPv4 address or a bracketed IPv6 address; PORT is 1-65535 (0, "any free
port", only where the caller allows it: tests and benches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

_INET: Final = re.compile(r"inet:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    family: Literal["inet", "unix"]
    host: str = ""  # inet: without brackets
    port: int = 0
    path: str = ""  # unix: absolute

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


def parse_listen(text: str, *, any_port: bool = False) -> ListenAddress:
    """The address `text` names; ValueError says what is wrong with it. any_port lets
    port 0 through (bind to any free port)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: unix socket path must be absolute")
        return ListenAddress("unix", path=path)
    match = _INET.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not inet:HOST:PORT or unix:/path")
    port = int(match.group(2))
    if not (0 if any_port else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return ListenAddress("inet", host=match.group(1).strip("[]"), port=port)
