"""The test environment: a server a test starts (tests/support/children.py) dies with the
test run, even when pytest is killed and no teardown runs, and stop() ends what it forked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import children
from tests.support.children import process_group_members

REPO = Path(__file__).resolve().parents[1]
GONE_SECONDS = 10.0

# A stand-in for pytest: starts a server with spawn(), says its PID, then dies as asked.
TEST_RUN = """
import sys, time
from tests.support import children
server = children.spawn(sys.argv[2:], stdin=None)
print(server.pid, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)  # no teardown: the atexit finalizer is all that is left
time.sleep(300)
"""
# A server that forks: the death signal reaches the shell only, not its sleep.
FORKING = ["sh", "-c", "sleep 300 & wait"]


def _wait_gone(group: int) -> None:
    deadline = time.monotonic() + GONE_SECONDS
    while process_group_members(group):
        assert time.monotonic() < deadline, f"server {group} outlived the test run"
        time.sleep(0.02)


def _test_run(mode: str, *server: str) -> tuple[subprocess.Popen[bytes], int]:
    """The stand-in test run, and the PID of the server it started."""
    run = children.spawn(
        [sys.executable, "-c", TEST_RUN, mode, *server], cwd=REPO, stdout=subprocess.PIPE
    )
    assert run.stdout is not None
    with run.stdout:
        return run, int(run.stdout.readline())


def test_a_server_dies_when_the_test_run_is_killed() -> None:
    run, server = _test_run("hang", "sleep", "300")
    assert process_group_members(server) == [server]  # running, in a group of its own
    os.kill(run.pid, signal.SIGKILL)  # as the OOM killer or a CI timeout would
    run.wait()
    _wait_gone(server)
    children.stop(run)


def test_what_a_server_forked_is_killed_when_the_test_run_exits_without_teardown() -> None:
    run, server = _test_run("exit", *FORKING)
    assert run.wait(timeout=GONE_SECONDS) == 0
    _wait_gone(server)  # the shell and its sleep: the whole group
    children.stop(run)


def test_stop_ends_what_the_server_forked() -> None:
    # SIGTERM ends the shell; its sleep would live on.
    server = children.spawn(FORKING)
    deadline = time.monotonic() + GONE_SECONDS
    while len(process_group_members(server.pid)) < 2:
        assert time.monotonic() < deadline, "the shell did not start its children"
        time.sleep(0.02)
    assert children.stop(server, timeout=1) == -signal.SIGTERM
    assert process_group_members(server.pid) == []


def test_a_server_that_ignores_the_stop_signal_is_killed_and_named() -> None:
    server = children.spawn([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE)
    assert server.stdout is not None
    with server.stdout:
        assert server.stdout.readline() == b"ready\n"
    with pytest.raises(subprocess.TimeoutExpired):
        children.stop(server, timeout=0.5)
    assert server.returncode == -signal.SIGKILL
    assert process_group_members(server.pid) == []


IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""
