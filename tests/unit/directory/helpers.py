"""Builders for directory tests: real SQLite stores and real Postfix tables."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from tests.support.postfix_config import private_postfix_config
from traqmilter.core.address import Address
from traqmilter.postfix_tools import find_program, postfix_command

POSTMAP = find_program("postmap")
MAP_TYPES = ("hash", "lmdb", "texthash")


def write_table(source: Path, lines: Iterable[str], *, age_seconds: float = 60.0) -> None:
    """Write a table or list source, dated age_seconds ago: postmap waits until a text
    table is a second or two old before reading it, in case it is still being written."""
    source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    stamp = time.time() - age_seconds
    os.utime(source, (stamp, stamp))


def postmap(map_type: str, source: Path) -> str:
    """Build (or, for texthash, just name) a Postfix table from its source file, with the
    private Postfix configuration beside it (postfix_config_dir); returns the spec a
    PostfixMapSource follows."""
    assert POSTMAP is not None, "postmap (Debian package postfix) is required"
    spec = f"{map_type}:{source}"
    if map_type != "texthash":
        command = postfix_command(POSTMAP, postfix_config_dir(source.parent), spec)
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return spec


def postfix_config_dir(tmp_path: Path) -> str:
    """The test's own Postfix configuration directory (made on first use)."""
    return str(private_postfix_config(tmp_path / "postfix-config"))


def make_table(tmp_path: Path, map_type: str, keys: Iterable[str], name: str = "vmailbox") -> str:
    source = tmp_path / name
    write_table(source, (f"{key}\tanything" for key in keys))
    return postmap(map_type, source)


def address(key: str) -> Address:
    """An Address straight from its parts, bypassing the parser (to hand the store hostile
    values the parser would refuse)."""
    local, _, domain = key.rpartition("@")
    return Address(local, domain)
