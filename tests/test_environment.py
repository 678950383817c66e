"""The test environment itself: no test may use the machine's own Postfix configuration
(tests/support/etc_guard.py), and what the guard lets through works without it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import etc_guard
from tests.support.fixtures import require
from tests.support.postfix_config import private_postfix_config
from tests.unit.directory.helpers import make_table
from traqmilter.directory import PostfixMapSource
from traqmilter.postfix_tools import find_program

POSTMAP = find_program("postmap")
POSTCONF = find_program("postconf")


@pytest.fixture
def guard_trips() -> Iterator[list[str]]:
    """The guard's violations during the test; forgotten afterwards, since the test
    trips the guard on purpose (conftest would stop the run otherwise)."""
    before = len(etc_guard.violations)
    trips: list[str] = []
    yield trips
    trips.extend(etc_guard.violations[before:])
    del etc_guard.violations[before:]


@pytest.mark.parametrize(
    "path", ["/etc/postfix/main.cf", "/etc/postfix/master.cf", "/etc/postfix/../postfix/main.cf"]
)
def test_opening_the_system_postfix_configuration_fails_with_the_reason(
    path: str, guard_trips: list[str]
) -> None:
    with pytest.raises(etc_guard.SystemPostfixConfigUsed, match="private Postfix configuration"):
        Path(path).read_text()


def test_dynamic_map_registry_is_not_configuration(guard_trips: list[str]) -> None:
    # Postfix reads it from its meta_directory whatever -c says: reading it is allowed.
    assert "sqlite" in Path("/etc/postfix/dynamicmaps.cf").read_text()
    assert guard_trips == []


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["postmap", "-s", "hash:/nonexistent/table"], None),
        (["/usr/sbin/postconf", "-h", "queue_directory"], None),
        (["postconf", "-c", "/etc/postfix", "-h", "queue_directory"], None),
        (["postconf", "-c/etc/postfix/", "-h", "queue_directory"], None),
        (["/usr/sbin/sendmail", "-i", "--", "-C", "/tmp"], None),
        (["postmap", "-q", "x", "hash:/nonexistent/table"], {"MAIL_CONFIG": "/etc/postfix"}),
    ],
)
def test_postfix_commands_without_a_private_config_dir_fail_with_the_reason(
    argv: list[str], env: dict[str, str] | None, guard_trips: list[str]
) -> None:
    with pytest.raises(etc_guard.SystemPostfixConfigUsed, match=r"/etc/postfix/main\.cf"):
        subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
    assert len(guard_trips) == 0  # recorded, and forgotten by the fixture
    assert len(etc_guard.violations) >= 1


def test_postfix_commands_with_a_private_config_dir_run(tmp_path: Path) -> None:
    config_dir = private_postfix_config(tmp_path / "postfix")
    assert POSTCONF is not None
    done = subprocess.run(
        [POSTCONF, "-c", str(config_dir), "-h", "config_directory"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == str(config_dir)


def test_the_product_following_the_system_postfix_fails_the_test(
    tmp_path: Path, guard_trips: list[str]
) -> None:
    spec = make_table(tmp_path, "hash", ["a@example.com"])  # built with a private config
    with pytest.raises(etc_guard.SystemPostfixConfigUsed, match="postmap -c /etc/postfix -s"):
        PostfixMapSource(spec, config_dir="/etc/postfix", background=False)


def test_child_python_processes_are_guarded_too() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "open('/etc/postfix/main.cf')"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "SystemPostfixConfigUsed: test-environment guard" in done.stderr


def test_a_missing_real_part_fails_as_root_and_skips_only_without_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require(None)  # nothing missing: the test goes on
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as CI runs: a skip would hide the part
    with pytest.raises(pytest.fail.Exception, match="postmap is missing"):
        require("postmap is missing")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="postmap is missing"):
        require("postmap is missing")
