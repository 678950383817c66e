"""An on_create program for tests, which records how it was called, and its fixture
(registered in tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def recording_hook(directory: Path) -> Path:
    """Write `directory`/on_create, a program that appends its argument and its
    TRAQMILTER_ADDRESS to `directory`/ran, one line per run; return its path."""
    hook = directory / "on_create"
    hook.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        f"with open({str(directory / 'ran')!r}, 'a') as out:\n"
        "    out.write(sys.argv[1] + ' ' + os.environ['TRAQMILTER_ADDRESS'] + '\\n')\n"
    )
    hook.chmod(0o755)
    return hook


@pytest.fixture(scope="module")
def on_create_hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with recording_hook's program; a module's runs are in `ran` there."""
    directory = tmp_path_factory.mktemp("hooks")
    recording_hook(directory)
    return directory
