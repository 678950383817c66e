"""Servers a test starts (redis-server, postgres, a traqmilter daemon, a stand-in milter)
that cannot outlive the test run.

A server left running after pytest dies (SIGKILL, the OOM killer, a CI timeout: no
teardown runs) keeps its port, its temp dir and a share of a machine other runs use.
spawn() starts each one:
- with a parent-death signal (prctl PR_SET_DEATHSIG, set by `setpriv --pdeathsig`, which
  then execs the server: no Python code runs between fork and exec, and the PID is the
  server's): the kernel signals the server when the pytest thread that started it dies;
- in a process group of its own, so that stop() also reaches what the server forked
  (postgres's backends, `traqmilter run`'s daemons);
- returning only once the death signal is set (the PID runs the server, not setpriv);
- registered until stopped: an atexit finalizer kills the groups still alive when pytest
  exits without their teardown (an internal error, an interrupt between fixtures).
stop() ends a server by its PID (the signal, a wait, then SIGKILL to its group).

BUGS: the death signal reaches the server only, not its children: postgres's backends
exit when the postmaster dies; `traqmilter run` gets SIGTERM (DaemonProcess asks for it),
which it passes to its daemons. It follows the *thread* that forked: start servers from
the main thread (fixtures do) or from one that outlives them. Linux clears it when a
process changes its credentials, so `setpriv` sets it after its own --reuid/--regid (the
order setpriv applies them in); a server that is a set-user-ID program would lose it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SETPRIV = "/usr/bin/setpriv"  # util-linux, Essential on Debian
STOP_SECONDS = 15.0  # how long stop() waits before it kills
POLL_SECONDS = 0.02

_running: dict[int, subprocess.Popen[bytes]] = {}  # group (leader's PID) -> leader


def spawn(
    argv: Sequence[str],
    *,
    death_signal: signal.Signals = signal.SIGKILL,
    credentials: Sequence[str] = (),
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start argv as a server of this test run (see the module docstring). death_signal:
    what it gets when the test run dies (SIGTERM for a server that stops its own children
    cleanly). credentials: setpriv options to run it as another user (--reuid=...). popen:
    subprocess.Popen's other arguments (stdin, stdout, stderr, cwd, env)."""
    command = [
        SETPRIV,
        *credentials,
        f"--pdeathsig={death_signal.name.removeprefix('SIG')}",
        "--",
        *argv,
    ]
    process = subprocess.Popen(command, start_new_session=True, **popen)
    _running[process.pid] = process
    _wait_exec(process)
    return process


def _wait_exec(process: subprocess.Popen[bytes]) -> None:
    """Return once setpriv has replaced itself with the server, or has exited.

    Popen returns when setpriv is exec'd, before setpriv has set the death signal: a
    test run killed in between (a loaded machine, a test that kills at once) would leave
    the server running. Once the PID runs something else, the signal is set.
    """
    setpriv = os.path.realpath(SETPRIV)
    while process.poll() is None:
        try:
            if os.readlink(f"/proc/{process.pid}/exe") != setpriv:
                return
        except OSError:  # exiting (no exe link) or not ours to read
            return
        time.sleep(0.001)


def stop(
    process: subprocess.Popen[bytes],
    mode: signal.Signals = signal.SIGTERM,
    *,
    timeout: float = STOP_SECONDS,
) -> int:
    """Stop a server spawn() started, by its PID: `mode`, then a wait of up to `timeout`
    seconds for it and for what it forked (its process group), then SIGKILL to the group.
    Returns the server's exit status (a negative signal number when it was killed); safe
    to call again. Raises subprocess.TimeoutExpired, after the kill, if the server itself
    outlived `timeout`: a server that ignores `mode` is a finding."""
    if process.poll() is None:
        process.send_signal(mode)
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(process)
        raise
    _end_group(process.pid, grace=timeout)
    return status


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a crash would: the server and everything in its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _end_group(process.pid, grace=0)


def _end_group(group: int, *, grace: float) -> None:
    """Wait up to `grace` seconds for what is left of the process group to exit by itself,
    then kill it; return once none of it runs."""
    _running.pop(group, None)
    deadline = time.monotonic() + grace
    while process_group_members(group):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        time.sleep(POLL_SECONDS)


def process_group_members(group: int) -> list[int]:
    """Live processes in process group `group` (zombies, already dead, are left out)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (name) state ppid pgrp ..."; the name may contain
            # spaces, so split after its closing parenthesis.
            state, _ppid, pgrp = (entry / "stat").read_text().rpartition(")")[2].split()[:3]
        except OSError:
            continue
        if int(pgrp) == group and state != "Z":
            members.append(int(entry.name))
    return members


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_running.values()):
        kill(process)
