"""Running the daemons: policyd in an asyncio loop, and `run` supervising policyd and the
milter as two child processes (libmilter owns its process's threads and signals, so the two
never share one interpreter).

Signals: SIGTERM/SIGINT stop (in-flight requests finish within a bound), SIGHUP reloads
the config and directory sources (a bad config is refused, the old one keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from traqmilter.config import ConfigError
from traqmilter.core.settings import Config
from traqmilter.runtime import Runtime, StartupError, open_runtime

log = logging.getLogger("traqmilter")

BLOCK_SYNC_SECONDS = 5.0  # how soon `traqmilter blocks clear` reaches a running policyd
DRAIN_SECONDS = 5.0


def run_policyd(config_path: str | None, config: Config) -> int:
    runtime = open_runtime(config)
    try:
        asyncio.run(serve_policyd(runtime, config_path))
    finally:
        runtime.close()
    return 0


async def serve_policyd(
    runtime: Runtime,
    config_path: str | None,
) -> None:
    from policyd.adapter import PolicyAdapter
    from policyd.server import PolicyServer
    from policyd.socketmap import SocketmapServer, TransportLookup

    adapter = PolicyAdapter(runtime.engine, on_block=runtime.persist_block)

    def handle(request):  # type: ignore[no-untyped-def]
        return adapter(request)  # rebinding `adapter` on reload switches engines atomically

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
    for listener, listen in ((server, settings.listen), (socketmap, settings.socketmap_listen)):
        try:
            await listener.start()
        except OSError as exc:
            await server.close()
            raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    log.info(
        "policyd: listening on %s, socketmap on %s", settings.listen, settings.socketmap_listen
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
            adapter = PolicyAdapter(runtime.engine, on_block=runtime.persist_block)
            log.info("policyd: reloaded configuration")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    background = [
        loop.create_task(_every(runtime.config.queue.sample_interval, runtime.queue.sample)),
        loop.create_task(_every(BLOCK_SYNC_SECONDS, lambda: _sync_blocks(runtime))),
    ]
    try:
        await stop.wait()
    finally:
        log.info("policyd: stopping")
        for task in background:
            task.cancel()
        await asyncio.wait_for(server.close(), DRAIN_SECONDS + 1)
        await socketmap.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _every(seconds: float, work: Callable[[], object]) -> None:
    """Run blocking `work` in a thread now and every `seconds`; a failure is logged, not fatal."""
    while True:
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("policyd: periodic task failed")
        await asyncio.sleep(seconds)


def _sync_blocks(runtime: Runtime) -> None:
    """Pick up `traqmilter blocks clear` made by the CLI in the shared state file."""
    if runtime.blocks.changed():
        runtime.blocks.sync_table(runtime.attacks, time.time())


def run_all(config_path: str | None, config: Config) -> int:
    """Supervise `traqmilter policyd` and `traqmilter milter`; forward signals; restart a
    daemon that dies (at most MAX_RESTARTS within a minute, then stop everything)."""
    open_runtime(config).close()  # refuse a bad config before starting anything
    base = [sys.executable, "-m", "traqmilter"] + (["-c", config_path] if config_path else [])
    supervisor = _Supervisor({name: [*base, name] for name in ("policyd", "milter")})
    return supervisor.run()


class _Supervisor:
    MAX_RESTARTS = 5

    def __init__(self, commands: dict[str, list[str]]) -> None:
        self.commands = commands
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, list[float]] = {name: [] for name in commands}
        self.stopping = False

    def _signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for name, child in self.children.items():
            forward = signal.SIGTERM if signum == signal.SIGINT else signum
            if forward == signal.SIGHUP and name == "milter":
                forward = signal.SIGUSR1  # libmilter stops on SIGHUP; SIGUSR1 reloads
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(forward)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        for name, command in self.commands.items():
            self.children[name] = subprocess.Popen(command)
        status = 0
        while not self.stopping:
            time.sleep(0.2)
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
                self.children[name] = subprocess.Popen(self.commands[name])
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
