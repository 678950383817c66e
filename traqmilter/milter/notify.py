"""The administrator is told: the digest timer and submission, and the on_create hook.

Digester collects core.digest events from the milter's session threads (under a lock, in
a bounded DigestBook) and, once per `notifications.period`, hands one digest per notify
address to the MTA through the DSN submitter (traqmilter.milter.submit): MAIL FROM:<>,
so a digest that cannot be delivered is dropped by the MTA instead of bouncing back to
traqmilter and looping (RFC 5321 4.5.5: no report about a null-sender message).

HookRunner runs `on_create` commands on its own thread, never on a milter callback
thread: a slow or hanging hook must not hold an SMTP session. Its queue is bounded;
when full, a hook is skipped and logged. A hook's failure is logged and never affects mail.

SECURITY: a hook is an argv list run without a shell; the new address (already parsed by
core.address, no control characters) is the last argument and TRAQMILTER_ADDRESS.
BUGS: the events of a period whose digest the MTA refused are lost (logged); the period's
counts live in memory, so a restart loses the current period's digest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from traqmilter.core.digest import DigestBook, DigestError, DigestEvent, build_digest
from traqmilter.core.settings import NotificationSettings
from traqmilter.milter.submit import DsnSubmitter, SubmitError, brief

log = logging.getLogger("traqmilter.milter")

HOOK_QUEUE_SIZE = 100  # pending on_create commands; beyond it a hook is skipped (logged)


class Digester:
    """Collects digest events; flush() sends the period's digests."""

    def __init__(
        self,
        settings: Callable[[], NotificationSettings],
        submitter: DsnSubmitter,
        *,
        hostname: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.submitter = submitter
        self.hostname = hostname or socket.getfqdn()
        self.clock = clock
        self._lock = threading.Lock()
        self._book = DigestBook(max_tracked=settings().max_tracked)
        self._since = clock()

    def record(self, events: Iterable[DigestEvent]) -> None:
        with self._lock:
            for event in events:
                self._book.add(event)

    def flush(self) -> int:
        """Hand this period's digests to the MTA; return how many were taken. A digest the
        MTA refuses is logged and dropped (the next period starts afresh)."""
        settings = self.settings()
        now = self.clock()
        with self._lock:
            book, since = self._book, self._since
            self._book = DigestBook(max_tracked=settings.max_tracked)
            self._since = now
        if not book:
            return 0
        sent = 0
        for notify, summaries in book.summaries(settings.top).items():
            try:
                digest = build_digest(
                    notify,
                    summaries,
                    since=since,
                    until=now,
                    hostname=self.hostname,
                    token=uuid.uuid4().hex,
                )
                self.submitter.submit(digest)
            except (DigestError, SubmitError) as exc:
                log.error("milter: digest to %s not handed over: %s", notify, brief(exc))
                continue
            log.info("milter: digest handed over: to=<%s>", digest.envelope_recipient)
            sent += 1
        return sent

    def run(self, stop: threading.Event) -> None:
        """The timer: flush every period (re-read each round, so a reload applies). The
        caller flushes once more at a clean stop."""
        while not stop.wait(self.settings().period):
            self.flush_logged()

    def flush_logged(self) -> None:
        try:
            self.flush()
        except Exception:  # a bug must not stop the timer; the next round tries again
            log.exception("milter: digest failed")


class HookRunner:
    """Runs on_create commands one at a time on its own thread."""

    def __init__(self, timeout: Callable[[], float], *, size: int = HOOK_QUEUE_SIZE) -> None:
        self.timeout = timeout
        self._queue: queue.Queue[tuple[tuple[str, ...], str] | None] = queue.Queue(size)

    def submit(self, argv: tuple[str, ...], address: str) -> None:
        """Queue one run (never blocks: a full queue skips it, logged)."""
        try:
            self._queue.put_nowait((argv, address))
        except queue.Full:
            log.error(
                "milter: on_create for %s skipped: %d hooks pending", address, self._queue.qsize()
            )

    def run_one(self, argv: tuple[str, ...], address: str) -> bool:
        """Run one hook; True when it exited 0. Every failure is logged, none raised."""
        env = {**os.environ, "TRAQMILTER_ADDRESS": address}
        try:
            done = subprocess.run(
                [*argv, address],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout(),
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.error(
                "milter: on_create %s for %s: killed after %gs", argv[0], address, self.timeout()
            )
            return False
        except OSError as exc:
            log.error("milter: on_create %s for %s: %s", argv[0], address, brief(exc))
            return False
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode("utf-8", "replace")
            log.error(
                "milter: on_create %s for %s exited with %d: %s",
                argv[0],
                address,
                done.returncode,
                brief(output),
            )
            return False
        log.info("milter: on_create %s for %s: ok", argv[0], address)
        return True

    def run(self, stop: threading.Event) -> None:
        """Work the queue until stop is set (close() wakes it)."""
        while not stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            self.run_one(*item)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):  # busy: the runner sees stop next
            self._queue.put_nowait(None)
