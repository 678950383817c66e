"""Preparing and supervising the daemons: `policyd` (policyd.main), `milter`
(traqmilter.milter.server), and `run` supervising both as two child processes (libmilter
owns its process's threads and signals, so the two never share one interpreter).

Signals: SIGTERM/SIGINT stop (in-flight requests finish within a bound), SIGHUP reloads
the config and directory sources (a bad config is refused, the old one keeps serving);
each daemon's main handles them, `run` forwards them.

Each daemon runs inside traqmilter.daemonize.DaemonProcess (the `daemon:` settings): it
detaches unless told to stay in the foreground, writes the pid file, opens its runtime as
the target user, binds its sockets as root, then drops root and tells systemd READY=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from traqmilter.config import load_config
from traqmilter.core.settings import Config
from traqmilter.daemonize import DaemonProcess, NotifyRelay, notify, resolve_identity
from traqmilter.runtime import counts_unknown, open_runtime

log = logging.getLogger("traqmilter")

ConfigReader = Callable[[str | None], Config]


def _prepare(
    config_path: str | None, config: Config, *, bounce_templates: bool = True
) -> tuple[str | None, DaemonProcess]:
    """Everything checked before detaching, so that a bad config or user fails where the
    administrator sees it. The config path is made absolute (a daemon runs in /)."""
    process = DaemonProcess(config.daemon, resolve_identity(config.daemon))
    process.check()
    with process.as_target_user():
        # refuse a bad config before starting anything (each daemon announces what it
        # discovered from Postfix when it opens the runtime it serves)
        open_runtime(config, bounce_templates=bounce_templates, announce=False).close()
    return (os.path.abspath(config_path) if config_path else None), process


def run_policyd(
    config_path: str | None, config: Config, read_config: ConfigReader = load_config
) -> int:
    """`traqmilter policyd`, inside a DaemonProcess (root is dropped once it listens).
    read_config: how a reload reads the config (the command line's daemon options
    applied, as they were at start)."""
    from policyd.main import serve_policyd  # here: each daemon loads only its own front end

    config_path, process = _prepare(config_path, config, bounce_templates=False)
    with process.running():
        with process.as_target_user():
            runtime = open_runtime(config, bounce_templates=False)
            runtime.read_config = read_config
        try:
            asyncio.run(serve_policyd(runtime, config_path, process))
        finally:
            runtime.close()
    return 0


def run_milter(
    config_path: str | None, config: Config, read_config: ConfigReader = load_config
) -> int:
    """`traqmilter milter`, inside a DaemonProcess (libmilter binds its socket in
    run_milter; root is dropped in its `ready` callback). read_config: as run_policyd's."""
    from traqmilter.milter.server import block_signals
    from traqmilter.milter.server import run_milter as serve

    count_unknown = counts_unknown(config)
    config_path, process = _prepare(config_path, config)
    with process.running():
        block_signals()  # before any thread: libmilter's signals must reach only its thread
        with process.as_target_user():
            runtime = open_runtime(config)
            runtime.read_config = read_config
        try:
            return serve(
                runtime,
                config_path=config_path,
                count_unknown=count_unknown,
                ready=lambda listens: process.listening(
                    listens, socket_mode=config.milter.socket_mode
                ),
            )
        finally:
            process.stopping()
            runtime.close()


def run_all(config_path: str | None, config: Config) -> int:
    """Supervise `traqmilter policyd` and `traqmilter milter`; forward signals; restart a
    daemon that dies (at most MAX_RESTARTS within a minute, then stop everything).

    The supervisor holds the pid file and stays root (a restarted child binds its sockets
    as root again); each child stays in the foreground and drops root itself."""
    config_path, process = _prepare(config_path, config)
    base = [sys.executable, "-m", "traqmilter"] + (["-c", config_path] if config_path else [])
    base += ["--foreground", "--pid-file", ""]
    with process.running():
        supervisor = _Supervisor({name: [*base, name] for name in ("policyd", "milter")})
        return supervisor.run()


class _Supervisor:
    MAX_RESTARTS = 5
    POLL_SECONDS = 0.2

    def __init__(self, commands: dict[str, list[str]]) -> None:
        self.commands = commands
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, list[float]] = {name: [] for name in commands}
        self.stopping = False
        # Under Type=notify, READY=1 once both children are ready (they report to us).
        self.relay = NotifyRelay() if os.environ.get("NOTIFY_SOCKET") else None
        self.ready = False

    def _signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for name, child in self.children.items():
            forward = signal.SIGTERM if signum == signal.SIGINT else signum
            if forward == signal.SIGHUP and name == "milter":
                forward = signal.SIGUSR1  # libmilter stops on SIGHUP; SIGUSR1 reloads
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(forward)

    def _start(self, name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.relay is not None:
            env["NOTIFY_SOCKET"] = self.relay.address
        return subprocess.Popen(self.commands[name], env=env)

    def _wait(self) -> None:
        if self.relay is None:
            time.sleep(self.POLL_SECONDS)
            return
        self.relay.wait(self.POLL_SECONDS)
        children = {child.pid for child in self.children.values()}
        if not self.ready and children <= self.relay.ready_pids:
            self.ready = True
            notify("READY=1")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        for name in self.commands:
            self.children[name] = self._start(name)
        status = 0
        while not self.stopping:
            self._wait()
            for name, child in list(self.children.items()):
                if child.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                recent = [t for t in self.restarts[name] if now - t < 60] + [now]
                self.restarts[name] = recent
                if len(recent) > self.MAX_RESTARTS:
                    log.error("run: %s keeps failing (exit %s); stopping", name, child.returncode)
                    self.stopping, status = True, 1
                    break
                log.error("run: %s exited with %s; restarting", name, child.returncode)
                self.children[name] = self._start(name)
        if self.relay is not None:
            notify("STOPPING=1")
            self.relay.close()
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return status
