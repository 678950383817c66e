"""Running the milter: libmilter's listener around TraqMilter, in a process of its own.

libmilter owns the process: its main loop runs on the calling thread, it starts one
thread per SMTP session and a signal thread that waits for SIGHUP, SIGTERM and SIGINT and
then stops the milter (in-flight sessions finish; about 5 s). So:
- run_milter() blocks those signals, and SIGUSR1, on the calling thread before any other
  thread exists (block_signals); threads started later inherit the mask, and no Python
  thread can be killed by a signal meant for libmilter (NOTES-postfix.md).
- SIGTERM, SIGINT and SIGHUP stop the milter: libmilter cannot be told otherwise, and it
  cannot be started twice in one process. SIGUSR1 reloads the configuration (a thread
  waits for it); `traqmilter run` turns its SIGHUP into SIGUSR1 for the milter.
- Only one milter per process (libmilter keeps global state).

Under the sendmail role with milter.socketmap_listen set, the process also answers
Sendmail's socket map lookups that route the outbox action (SendmailRouting: policyd's
socketmap server on an asyncio loop of its own, in a thread), so Sendmail needs one daemon.

On TCP, the listening socket gets TCP_NODELAY (accepted sockets inherit it) so that
replies are not held back by Nagle's algorithm waiting for the MTA's delayed ACK: without
it every message stalls about 40 ms (NOTES-postfix.md). libmilter does not expose its
socket, so it is found among the process's descriptors by its port.

BUGS: a unix socket is created with the process umask (libmilter chooses no mode); run
with umask 007 and the MTA in the socket's group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import Milter

from policyd.socketmap import (
    SENDMAIL_MAILHOST_MAP,
    SocketmapRequest,
    SocketmapServer,
    TransportLookup,
)
from traqmilter.core.attack import AttackTable, Block
from traqmilter.core.engine import Engine, outbox_relay_for
from traqmilter.core.limits import ActionLimits
from traqmilter.core.listen import parse_listen
from traqmilter.core.settings import Config
from traqmilter.directory.stats import LookupStats
from traqmilter.metrics import Metrics
from traqmilter.milter.adapter import TraqMilter
from traqmilter.milter.notify import CLAIM_SECONDS, Digester, HookRunner
from traqmilter.milter.service import MailboxStore, MilterService
from traqmilter.milter.submit import ConfiguredSubmitter
from traqmilter.runtime import StartupError, serve_metrics
from traqmilter.state import DigestStore

log = logging.getLogger("traqmilter.milter")

MILTER_NAME = "traqmilter"
RELOAD_SIGNAL = signal.SIGUSR1
SOCKETMAP_SECONDS = 10.0  # to bind the socket map at start, and to drain it at stop
LIBMILTER_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


class QueueGauge(Protocol):
    size: int

    def start_thread(self, stop_event: threading.Event) -> threading.Thread: ...


class Directory(Protocol):
    @property
    def store(self) -> MailboxStore: ...


class BlockStore(DigestStore, Protocol):
    backend: str
    sync_seconds: float
    last_sync: float

    @property
    def up(self) -> bool: ...

    def share_limits(self, limits: ActionLimits) -> None: ...

    def follow(
        self, table: AttackTable, now: float, guard: AbstractContextManager[object] | None = None
    ) -> bool: ...


class MilterRuntime(Protocol):
    """What run_milter needs of traqmilter.runtime.Runtime."""

    @property
    def attacks(self) -> AttackTable: ...

    @property
    def blocks(self) -> BlockStore: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def config(self) -> Config: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def directory_stats(self) -> LookupStats: ...

    @property
    def queue(self) -> QueueGauge: ...

    def persist_block(self, block: Block) -> None: ...

    def reload_or_keep(self, config_path: str | None, daemon: str) -> bool: ...


def block_signals() -> None:
    """Block libmilter's signals and the reload signal on the calling thread. Call it
    before any thread starts (run_milter does, and warns when it is too late)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*LIBMILTER_SIGNALS, RELOAD_SIGNAL})


def libmilter_address(listen: str) -> str:
    """libmilter's spelling of a listen address: inet:8891@127.0.0.1, inet6:8891@::1,
    unix:/path."""
    address = parse_listen(listen)
    if address.family == "unix":
        return f"unix:{address.path}"
    return f"{'inet6' if ':' in address.host else 'inet'}:{address.port}@{address.host}"


def set_listener_nodelay(port: int) -> bool:
    """Set TCP_NODELAY on this process's listening TCP socket bound to `port`; False when
    there is none (e.g. a unix socket)."""
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(descriptor).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(descriptor))
        except OSError:
            continue  # closed meanwhile (the listdir descriptor itself)
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            if sock.getsockname()[1] != port:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return True
    return False


def build_notifiers(runtime: MilterRuntime) -> tuple[Digester, HookRunner]:
    """The digests and the on_create runner; both read runtime.config when they act, so a
    reload applies to them (notifications.*, bounce.* for the hand-over). The digest
    counts live in the state store (runtime.blocks), as the blocks do."""
    digester = Digester(
        lambda: runtime.config.notifications,
        ConfiguredSubmitter(lambda: runtime.config.bounce, local_hostname=socket.getfqdn()),
        runtime.blocks,
        # Long enough for a few hand-overs, each bounded by bounce.submit_timeout.
        claim_seconds=lambda: max(CLAIM_SECONDS, 4 * runtime.config.bounce.submit_timeout),
    )
    return digester, HookRunner(lambda: runtime.config.notifications.hook_timeout)


def build_service(
    runtime: MilterRuntime,
    *,
    count_unknown: bool = False,
    digester: Digester | None = None,
    hooks: HookRunner | None = None,
) -> MilterService:
    """The shared milter state for a runtime (whose config was checked when it was loaded:
    traqmilter.config.check_semantics)."""
    submitter = ConfiguredSubmitter(lambda: runtime.config.bounce, local_hostname=socket.getfqdn())
    service = MilterService(
        runtime,
        mailboxes=lambda: runtime.directory.store,
        submitter=submitter,
        count_unknown=count_unknown,
        role=runtime.config.milter.role,  # read at start: a reload refuses to change it
        on_block=runtime.persist_block,
        digests=digester.record if digester is not None else None,
        hooks=hooks.submit if hooks is not None else None,
    )
    runtime.blocks.share_limits(service.limits)  # several hosts: shared bounce/create rates
    return service


class SendmailRouting:
    """The sendmail role's socket map on milter.socketmap_listen: Sendmail's
    FEATURE(ldap_routing) asks it, for each recipient of an LDAPROUTE_DOMAIN, which host
    to relay it to (SENDMAIL_MAILHOST_MAP, answered by core.engine.outbox_relay_for over
    the current engine). policyd's SocketmapServer runs on an asyncio loop of its own in a
    daemon thread; each lookup takes the service's decide_lock, as every engine call in
    this process does. If the process is down, Sendmail's lookup fails and it queues the
    recipient (contrib/sendmail/README.md): nothing is routed on doubt."""

    def __init__(self, runtime: MilterRuntime, service: MilterService) -> None:
        settings = runtime.config.milter
        lookup = TransportLookup(lambda: runtime.engine, SENDMAIL_MAILHOST_MAP, outbox_relay_for)

        def locked(request: SocketmapRequest) -> str:
            with service.decide_lock:
                return lookup(request)

        self.listen = settings.socketmap_listen
        self.server = SocketmapServer(locked, listen=self.listen, socket_mode=settings.socket_mode)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="socketmap", daemon=True)

    def start(self) -> None:
        """Bind and serve; raises StartupError when the socket cannot be bound."""
        self.thread.start()
        try:
            self._run(self.server.start())
        except OSError as exc:
            self._stop_loop()
            raise StartupError(f"cannot listen on {self.listen}: {exc.strerror or exc}") from None

    def stop(self) -> None:
        self._run(self.server.close())
        self._stop_loop()

    def _run(self, coroutine: Any) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(SOCKETMAP_SECONDS)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SOCKETMAP_SECONDS)
        if not self.thread.is_alive():
            self.loop.close()


def run_milter(
    runtime: MilterRuntime,
    *,
    config_path: str | None = None,
    count_unknown: bool = False,
    ready: Callable[[list[str]], None] | None = None,
) -> int:
    """Serve the milter on `milter.listen` (and, in the sendmail role, the socket map on
    `milter.socketmap_listen`) until SIGTERM, SIGINT or SIGHUP; return 0.

    config_path is re-read on SIGUSR1. count_unknown: see MilterService. ready, if given,
    is called with the listen addresses once connections are accepted."""
    if threading.active_count() > 1:
        log.warning("milter: threads started before the milter; a signal may kill one")
    block_signals()
    digester, hooks = build_notifiers(runtime)
    service = build_service(runtime, count_unknown=count_unknown, digester=digester, hooks=hooks)
    settings = runtime.config.milter
    metrics = (
        Metrics("milter", runtime.directory_stats) if runtime.config.metrics.milter_listen else None
    )
    if metrics is not None:  # its thread starts after block_signals(), like the others
        metrics.follow_state(runtime.blocks)
        serve_metrics(metrics, runtime.config.metrics.milter_listen, "milter")

    Milter.factory = lambda: TraqMilter(service, metrics=metrics)
    Milter.set_exception_policy(Milter.TEMPFAIL)
    register_callbacks()
    Milter.setconn(libmilter_address(settings.listen))
    Milter.settimeout(int(settings.timeout))
    Milter.register(
        MILTER_NAME,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, command: ctx.getpriv().unknown(command),
        negotiate=Milter.negotiate_callback,
    )
    Milter.opensocket(True)
    address = parse_listen(settings.listen)
    if address.family == "inet" and not set_listener_nodelay(address.port):
        log.warning("milter: cannot set TCP_NODELAY on port %d; expect 40 ms stalls", address.port)

    routing = None
    if settings.role == "sendmail" and settings.socketmap_listen:
        routing = SendmailRouting(runtime, service)
        routing.start()
    stop = threading.Event()
    runtime.queue.start_thread(stop)
    threading.Thread(
        target=_sync_blocks, args=(runtime, service, stop), name="blocks", daemon=True
    ).start()
    threading.Thread(target=digester.run, args=(stop,), name="digest", daemon=True).start()
    threading.Thread(target=hooks.run, args=(stop,), name="on_create", daemon=True).start()
    threading.Thread(
        target=_reload_on_signal, args=(runtime, config_path), name="reload", daemon=True
    ).start()
    listens = [settings.listen] + ([routing.listen] if routing is not None else [])
    log.info("milter: listening on %s", ", socket map on ".join(listens))
    if ready is not None:
        ready(listens)
    try:
        Milter.main()
    finally:
        stop.set()
        if routing is not None:
            routing.stop()
        hooks.close()
        digester.save_logged()  # the events of the last moments stored (the thread may be busy)
        if metrics is not None:
            metrics.close()
    log.info("milter: stopped")
    return 0


def register_callbacks() -> None:
    """What Milter.runmilter() registers, without its opensocket()+main() (TCP_NODELAY must
    be set in between). bench/postfix_bench.py's do-nothing pymilter registers the same."""
    Milter.set_connect_callback(Milter.connect_callback)
    Milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    Milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    Milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    Milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    Milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    Milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    Milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    Milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    Milter.set_close_callback(Milter.close_callback)


def _sync_blocks(runtime: MilterRuntime, service: MilterService, stop: threading.Event) -> None:
    """Follow the dictionary-attack blocks policyd and `traqmilter blocks` write to the
    shared state, so that the milter judges clients as policyd does (a cleared block is
    lifted here too within the store's sync_seconds)."""
    while not stop.wait(runtime.blocks.sync_seconds):
        try:
            # The attack table is the engine's: touched under the decide lock only.
            runtime.blocks.follow(runtime.attacks, time.time(), service.decide_lock)
        except Exception:  # logged; the next round tries again
            log.exception("milter: cannot read the dictionary-attack blocks")


def _reload_on_signal(runtime: MilterRuntime, config_path: str | None) -> None:
    while True:
        signal.sigwait({RELOAD_SIGNAL})
        if runtime.reload_or_keep(config_path, "milter"):
            log.info("milter: reloaded configuration")
