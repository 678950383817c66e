"""policyd's main: the policy and socketmap servers around one runtime, in an asyncio loop,
as traqmilter.milter.server is the milter's. traqmilter.daemons prepares the process
(config, identity, pid file) and calls serve_policyd().

A request's path: PolicyServer -> handle() (metrics timing) -> PolicyAdapter -> Engine.rcpt;
observe() logs the decision (logs.rcpt_decision) and counts it. A reload builds a new
adapter over the new engine; rebinding `adapter` switches engines atomically, on the loop.

Signals: SIGTERM/SIGINT stop (in-flight requests finish within DRAIN_SECONDS), SIGHUP
reloads the config and directory sources (a bad config is refused, the old one keeps
serving). Periodic work (queue sampling, following the blocks file) runs in threads so
the loop never waits on a file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 -- see below
import gc
import logging
import signal
import time
from collections.abc import Callable
from typing import Protocol

from policyd.adapter import PolicyAdapter
from policyd.codec import PolicyRequest
from policyd.server import ConnectionNotes, PolicyServer
from policyd.socketmap import SocketmapServer, TransportLookup
from traqmilter.core.engine import RcptDecision
from traqmilter.logs import policyd_block, policyd_decision
from traqmilter.metrics import Metrics
from traqmilter.runtime import Runtime, StartupError, serve_metrics

# asyncio.to_thread imports concurrent.futures.thread on first use; after the privilege
# drop the interpreter's own files may be unreadable (a Python under /root), so load it now.

log = logging.getLogger("traqmilter")

DRAIN_SECONDS = 5.0


class Lifecycle(Protocol):
    """What serve_policyd tells the process around it (traqmilter.daemonize.DaemonProcess)."""

    def listening(self, listens: list[str]) -> None: ...

    def stopping(self) -> None: ...


def settle_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's view.

    The config, engine, directory and compiled patterns live until the process ends or the
    next reload; without this, every full collection walks them again, a measurable share
    of a request's cost (bench/policyd_bench.py). Called once serving starts and after each
    reload, when the old engine's cycles are collected first.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def serve_policyd(
    runtime: Runtime,
    config_path: str | None,
    process: Lifecycle | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; config_path is re-read on SIGHUP."""
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
            if not await asyncio.to_thread(runtime.reload_or_keep, config_path, "policyd"):
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
                serve_metrics(metrics, runtime.config.metrics.listen, "policyd")
            except StartupError:
                await server.close()
                await socketmap.close()
                raise
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
    process: Lifecycle | None,
) -> None:
    loop = asyncio.get_running_loop()
    background = [
        loop.create_task(_every(lambda: runtime.queue.sample_interval, runtime.queue.sample)),
        loop.create_task(
            _every(
                lambda: runtime.blocks.sync_seconds,
                # `traqmilter blocks clear`, other processes' (or hosts') blocks; this
                # host's counts handed to a shared store
                lambda: runtime.blocks.follow(runtime.attacks, time.time()),
            )
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
