"""A private Postfix configuration directory for tests that run Postfix commands.

postmap and postconf only need a main.cf to exist; an empty one means "every parameter at
its default". Tests never use the machine's /etc/postfix (tests/support/etc_guard.py
stops a test that does).
"""

from __future__ import annotations

from pathlib import Path

MAIN_CF = "# A test's private Postfix configuration: every parameter at its default.\n"


def private_postfix_config(directory: Path) -> Path:
    """Make (or reuse) `directory` as a Postfix configuration directory; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    main_cf = directory / "main.cf"
    if not main_cf.exists():
        main_cf.write_text(MAIN_CF)
    return directory
