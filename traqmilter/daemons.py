"""Running the daemons: policyd in an asyncio loop, and `run` supervising policyd and the
milter as two child processes (libmilter owns its process's threads and signals, so the two
never share one interpreter).

Signals: SIGTERM/SIGINT stop (in-flight requests finish within a bound), SIGHUP reloads
the config and directory sources (a bad config is refused, the old one keeps serving).

Each daemon runs inside traqmilter.daemonize.DaemonProcess (the `daemon:` settings): it
detaches unless told to stay in the foreground, writes the pid file, opens its runtime as
the target user, binds its sockets as root, then drops root and tells systemd READY=1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 -- see below
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from traqmilter.config import ConfigError, load_config
from traqmilter.core.engine import RcptDecision
from traqmilter.core.settings import Config
from traqmilter.daemonize import DaemonProcess, NotifyRelay, notify, resolve_identity
from traqmilter.metrics import Metrics
from traqmilter.runtime import Runtime, StartupError, open_runtime

# asyncio.to_thread imports concurrent.futures.thread on first use; after the privilege
# drop the interpreter's own files may be unreadable (a Python under /root), so load it now.

if TYPE_CHECKING:
    from policyd.codec import PolicyRequest
    from policyd.server import ConnectionNotes, PolicyServer
    from policyd.socketmap import SocketmapServer

log = logging.getLogger("traqmilter")

ConfigReader = Callable[[str | None], Config]

DRAIN_SECONDS = 5.0


def _prepare(config_path: str | None, config: Config) -> tuple[str | None, DaemonProcess]:
    """Everything checked before detaching, so that a bad config or user fails where the
    administrator sees it. The config path is made absolute (a daemon runs in /)."""
    process = DaemonProcess(config.daemon, resolve_identity(config.daemon))
    process.check()
    with process.as_target_user():
        open_runtime(config).close()  # refuse a bad config before starting anything
    return (os.path.abspath(config_path) if config_path else None), process


def run_policyd(
    config_path: str | None, config: Config, read_config: ConfigReader = load_config
) -> int:
    """read_config: how a reload reads the config (the command line's daemon options
    applied, as they were at start)."""
    config_path, process = _prepare(config_path, config)
    with process.running():
        with process.as_target_user():
            runtime = open_runtime(config)
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
    from traqmilter.milter.server import block_signals, counts_unknown
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
                ready=lambda listen: process.listening(
                    [listen], socket_mode=config.milter.socket_mode
                ),
            )
        finally:
            process.stopping()
            runtime.close()


def settle_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's view.

    The config, engine, directory and compiled patterns live until the process ends or the
    next reload; without this, every full collection walks them again, which cost policyd
    1.5-2.5 us of its 29 us per request (bench/policyd_bench.py). Called once serving
    starts and after each reload, when the old engine's cycles are collected first.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def serve_policyd(
    runtime: Runtime,
    config_path: str | None,
    process: DaemonProcess | None = None,
) -> None:
    from policyd.adapter import PolicyAdapter
    from policyd.server import PolicyServer
    from policyd.socketmap import SocketmapServer, TransportLookup
    from traqmilter.logs import policyd_block, policyd_decision

    metrics = Metrics("policyd") if runtime.config.metrics.listen else None
    if metrics is not None:
        metrics.follow_state(runtime.blocks)
    decision_log = logging.getLogger("traqmilter.policyd")

    def observe(request: PolicyRequest, decision: RcptDecision) -> None:
        policyd_decision(decision_log, request, decision)
        if decision.new_block is not None:
            policyd_block(decision_log, decision.new_block)
        if metrics is not None:
            metrics.decision(decision)

    def new_adapter() -> PolicyAdapter:
        return PolicyAdapter(runtime.engine, on_block=runtime.persist_block, on_decision=observe)

    adapter = new_adapter()

    def handle(request: PolicyRequest, notes: ConnectionNotes) -> str:
        if metrics is None:
            return adapter(request, notes)  # rebinding `adapter` on reload switches engines
        started = time.perf_counter()
        try:
            return adapter(request, notes)
        except Exception:
            metrics.errors_here.inc()
            raise
        finally:
            metrics.latency_here.observe(time.perf_counter() - started)

    settings = runtime.config.policyd
    server = PolicyServer(
        handle,
        listen=settings.listen,
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout,
        socket_mode=settings.socket_mode,
    )
    # Postfix's transport lookups for the outbox action, decided by the same engine.
    socketmap = SocketmapServer(
        TransportLookup(lambda: runtime.engine),
        listen=settings.socketmap_listen,
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout,
        socket_mode=settings.socket_mode,
    )
    stop = asyncio.Event()
    reloading = asyncio.Lock()
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        nonlocal adapter
        async with reloading:
            try:
                await asyncio.to_thread(runtime.reload, config_path)
            except (ConfigError, StartupError) as exc:
                for line in str(exc).splitlines():
                    log.error("policyd: reload refused, keeping the old config: %s", line)
                return
            except Exception:
                log.exception("policyd: reload failed, keeping the old config")
                return
            adapter = new_adapter()
            for listener in (server, socketmap):
                listener.max_connections = runtime.config.policyd.max_connections
                listener.idle_timeout = runtime.config.policyd.idle_timeout
            settle_heap()
            log.info("policyd: reloaded configuration")

    # Handlers first: a SIGTERM or SIGHUP right after READY=1 must not kill the process.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    try:
        for listener, listen in (
            (server, settings.listen),
            (socketmap, settings.socketmap_listen),
        ):
            try:
                await listener.start()
            except OSError as exc:
                await server.close()
                raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        if metrics is not None:
            try:
                metrics.serve(runtime.config.metrics.listen)
            except OSError as exc:
                await server.close()
                await socketmap.close()
                raise StartupError(
                    f"cannot serve metrics on {runtime.config.metrics.listen}: "
                    f"{exc.strerror or exc}"
                ) from None
            log.info("policyd: metrics on %s", runtime.config.metrics.listen)
        log.info(
            "policyd: listening on %s, socketmap on %s", settings.listen, settings.socketmap_listen
        )
        settle_heap()
        if process is not None:
            try:
                process.listening([settings.listen, settings.socketmap_listen])
            except BaseException:
                await server.close()
                await socketmap.close()
                raise
        await _serve_until(stop, runtime, server, socketmap, process)
    finally:
        if metrics is not None:
            metrics.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _serve_until(
    stop: asyncio.Event,
    runtime: Runtime,
    server: PolicyServer,
    socketmap: SocketmapServer,
    process: DaemonProcess | None,
) -> None:
    loop = asyncio.get_running_loop()
    background = [
        loop.create_task(_every(lambda: runtime.queue.sample_interval, runtime.queue.sample)),
        loop.create_task(
            _every(lambda: runtime.blocks.sync_seconds, lambda: _sync_blocks(runtime))
        ),
    ]
    try:
        await stop.wait()
    finally:
        log.info("policyd: stopping")
        if process is not None:
            process.stopping()
        for task in background:
            task.cancel()
        await asyncio.wait_for(server.close(), DRAIN_SECONDS + 1)
        await socketmap.close()


async def _every(seconds: Callable[[], float], work: Callable[[], object]) -> None:
    """Run blocking `work` in a thread now and every seconds() (read each time: a reload
    may change it); a failure is logged, not fatal."""
    while True:
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("policyd: periodic task failed")
        await asyncio.sleep(seconds())


def _sync_blocks(runtime: Runtime) -> None:
    """Pick up `traqmilter blocks clear` and other processes' (or hosts') blocks, and hand
    this host's counts to a shared store."""
    runtime.blocks.follow(runtime.attacks, time.time())


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
