"""policyd's main: the policy and socketmap servers around one runtime, in an asyncio loop,
as traqmilter.milter.server is the milter's. traqmilter.daemons prepares the process
(config, identity, pid file) and calls serve_policyd().

A request's path: PolicyServer -> handle() (metrics timing) -> PolicyAdapter -> Engine.rcpt;
the adapter's observer (decision_observer) logs the decision (log_decision, the shape both
front ends share: traqmilter.logs.decision) and counts it. A reload builds a new
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

from policyd.adapter import DecisionObserver, PolicyAdapter
from policyd.codec import PolicyRequest
from policyd.server import ConnectionNotes, PolicyServer
from policyd.socketmap import SocketmapServer, TransportLookup
from traqmilter.core.engine import RcptDecision
from traqmilter.core.rule_names import RuleName
from traqmilter.logs import decision, forward_target_missing, policyd_block, refusal_action
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


def log_decision(logger: logging.Logger, request: PolicyRequest, rcpt: RcptDecision) -> None:
    """policyd's line for one RCPT decision, with the fields its request holds: a refusal at
    INFO, no objection (DUNNO) only at DEBUG (the hot path: nothing is built unless DEBUG
    is on)."""
    reply = rcpt.reply
    if rcpt.rule is RuleName.FORWARD_TARGET_MISSING:
        forward_target_missing(logger, rcpt)
    level = logging.DEBUG if reply is None else logging.INFO
    if not logger.isEnabledFor(level):
        return
    attributes = request.attributes  # built once: most of these are not extracted
    decision(
        logger,
        "policyd",
        refusal_action(reply),
        queue_id=attributes.get("queue_id", ""),
        client_name=attributes.get("client_name", ""),
        client_address=attributes.get("client_address", ""),
        sender=attributes.get("sender", ""),
        recipients=(attributes.get("recipient", ""),),
        rule=rcpt.rule,
        stage="RCPT",
        reply=reply,
        proto=attributes.get("protocol_name", ""),
        helo=attributes.get("helo_name", ""),
        level=level,
    )


def decision_observer(logger: logging.Logger, metrics: Metrics | None) -> DecisionObserver:
    """What policyd does with every RCPT decision once its effects were performed: log it
    (and the block it started), count it."""

    def observe(request: PolicyRequest, rcpt: RcptDecision) -> None:
        log_decision(logger, request, rcpt)
        if rcpt.new_block is not None:
            policyd_block(logger, rcpt.new_block)
        if metrics is not None:
            metrics.decision(rcpt)

    return observe


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
    metrics = Metrics("policyd", runtime.directory_stats) if runtime.config.metrics.listen else None
    if metrics is not None:
        metrics.follow_state(runtime.blocks)
    observe = decision_observer(logging.getLogger("traqmilter.policyd"), metrics)

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
        loop.create_task(runtime.queue.run_periodically(stop)),
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
