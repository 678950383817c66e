"""The administrator is told: the digest timer and submission, and the on_create hook.

Digester collects core.digest events from the milter's session threads (under a lock, in
a bounded DigestBook per period) and its thread writes them to the state store
(traqmilter.state.DigestStore: the SQLite file, or Redis shared by the MX hosts) within
SAVE_SECONDS, so a restart, a reload or a kill keeps them. GRACE_SECONDS after each
period's end (periods are aligned to the epoch, core.digest_counts.period_start) the process that
claims the digests (one per site: the claim is in the shared store) hands one digest per
notify address to the MTA through the DSN submitter (traqmilter.milter.submit) and only
then removes the counts it covered: a digest the MTA refuses stays and goes out with the
next attempt (RETRY_SECONDS later, each further failure doubling the wait up to one
period), one the MTA took is never sent again. MAIL FROM:<>, so a digest that cannot be
delivered is dropped by the MTA instead of bouncing back to traqmilter and looping (RFC
5321 4.5.5: no report about a null-sender message).

HookRunner runs `on_create` commands on its own thread, never on a milter callback
thread: a slow or hanging hook must not hold an SMTP session. Its queue is bounded;
when full, a hook is skipped and logged. A hook's failure is logged and never affects mail.

SECURITY: a hook is an argv list run without a shell; the new address (already parsed by
core.address, no control characters) is the last argument and TRAQMILTER_ADDRESS.
BUGS: at least once, not exactly once: if the process dies after the MTA took a digest
and before its counts are removed, the next claimant sends them again. Events recorded in
the last SAVE_SECONDS before a kill are lost (they were in memory only). Counts no digest
took within KEEP_SECONDS after their period (an MTA refusing for a week) are given up.
An event stored for a period more than GRACE_SECONDS after it ended (a host whose clock
is behind, a store that was away) goes out with the next digest, unless it lands while
that period's digest is being handed over: its removal takes it too.
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

from traqmilter.core.digest import (
    DigestBook,
    DigestError,
    DigestEvent,
    build_digest,
    pending_digests,
)
from traqmilter.core.digest_counts import period_start
from traqmilter.core.settings import NotificationSettings
from traqmilter.milter.submit import DsnSubmitter, SubmitError, brief
from traqmilter.state import DigestStore, StateError

log = logging.getLogger("traqmilter.milter")

HOOK_QUEUE_SIZE = 100  # pending on_create commands; beyond it a hook is skipped (logged)
SAVE_SECONDS = 0.2
"""How often recorded events are written to the state store (what a kill can lose)."""
GRACE_SECONDS = 2.0
"""A period is sent this long after it ended, once every host has stored its last events."""
RETRY_SECONDS = 60.0
"""After a refused hand-off or store trouble, the next attempt; each failure in a row
doubles the wait, up to one period: a notify address the MTA refuses for good (a mailbox
removed since start-up) costs one attempt a period, not one a minute for a week."""
KEEP_SECONDS = 7 * 86400.0
"""How long after its period an unsent digest's counts are kept (then given up)."""
CLAIM_SECONDS = 120.0
"""The shortest claim on the digests; a claimant stops starting hand-overs at half of it."""
MAX_UNSAVED_PERIODS = 24
"""Periods kept in memory while the store cannot be written (beyond: the oldest dropped)."""


class Digester:
    """Records digest events; save() stores them, flush() sends the closed periods."""

    def __init__(
        self,
        settings: Callable[[], NotificationSettings],
        submitter: DsnSubmitter,
        store: DigestStore,
        *,
        hostname: str = "",
        clock: Callable[[], float] = time.time,
        claim_seconds: Callable[[], float] = lambda: CLAIM_SECONDS,
    ) -> None:
        self.settings = settings
        self.submitter = submitter
        self.store = store
        self.hostname = hostname or socket.getfqdn()
        self.clock = clock
        self.claim_seconds = claim_seconds
        self.holder = f"{self.hostname} {os.getpid()} {uuid.uuid4().hex[:12]}"
        self.kept = 0  # digests the last flush left in the store for the next attempt
        self.failed_flushes = 0  # flushes in a row that left some (the retry backoff)
        self._lock = threading.Lock()
        self._unsaved: dict[int, DigestBook] = {}  # period start -> events not stored yet
        self._store_failing = False

    def record(self, events: Iterable[DigestEvent]) -> None:
        """From a session thread: only memory, never the store (the timer thread writes)."""
        settings = self.settings()
        period = period_start(self.clock(), settings.period)
        with self._lock:
            book = self._unsaved.get(period)
            if book is None:
                book = self._unsaved[period] = DigestBook(max_tracked=settings.max_tracked)
                self._trim()
            for event in events:
                book.add(event)

    def _trim(self) -> None:
        while len(self._unsaved) > MAX_UNSAVED_PERIODS:
            oldest = min(self._unsaved)
            del self._unsaved[oldest]
            log.error("milter: digest events of the period from %d dropped: not stored", oldest)

    def save(self) -> bool:
        """Write the recorded events to the store; False when it failed (they are kept in
        memory, bounded, for the next try; logged once per outage)."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, {}
        settings = self.settings()
        for period in sorted(unsaved):
            try:
                self.store.add_digest(
                    unsaved[period].rows(period),
                    max_tracked=settings.max_tracked,
                    expires=period + settings.period + KEEP_SECONDS,
                )
            except StateError as exc:
                if not self._store_failing:
                    log.error("milter: digest events not stored (kept in memory): %s", brief(exc))
                self._store_failing = True
                with self._lock:
                    for left in (p for p in unsaved if p >= period):
                        book = self._unsaved.setdefault(left, unsaved[left])
                        if book is not unsaved[left]:
                            book.add_rows(unsaved[left].rows(left))
                    self._trim()
                return False
        if self._store_failing and unsaved:
            log.info("milter: digest events stored again")
            self._store_failing = False
        return True

    def flush(self) -> int:
        """Store what was recorded; then, if this process wins the claim, hand the digest
        of every closed period to the MTA, one per notify address; return how many were
        taken. One the MTA refuses stays in the store (self.kept counts them)."""
        self.kept = 0
        try:
            return self._claim_and_hand_over()
        except Exception:  # a bug: the timer goes on (flush_logged), and tries again soon
            self.kept = 1
            raise
        finally:
            self.failed_flushes = self.failed_flushes + 1 if self.kept else 0

    def _claim_and_hand_over(self) -> int:
        if not self.save():
            self.kept = 1  # nothing could be read either: try again soon
            return 0
        settings = self.settings()
        now = self.clock()
        lease = self.claim_seconds()
        try:
            if not self.store.claim_digests(self.holder, lease, now):
                return 0  # another process (another MX host) sends them now
        except StateError as exc:
            log.error("milter: digests not sent: %s", brief(exc))
            self.kept = 1
            return 0
        try:
            return self._hand_over(settings, now, lease)
        finally:
            with contextlib.suppress(StateError):  # else the claim ends by itself
                self.store.release_digests(self.holder)

    def _hand_over(self, settings: NotificationSettings, now: float, lease: float) -> int:
        try:
            rows = self.store.pending_digests(
                period_start(now - GRACE_SECONDS, settings.period), now
            )
        except StateError as exc:
            log.error("milter: digests not sent: %s", brief(exc))
            self.kept = 1
            return 0
        sent = 0
        pending = pending_digests(rows, max_tracked=settings.max_tracked)
        for n, digest_of in enumerate(pending):
            if self.clock() - now > lease / 2:  # the claim must outlast the hand-over
                self.kept += len(pending) - n
                break
            tallies = digest_of.tallies
            try:
                digest = build_digest(
                    digest_of.notify,
                    tallies.summaries(settings.top),
                    since=digest_of.since,
                    until=digest_of.periods[-1] + settings.period,
                    hostname=self.hostname,
                    token=uuid.uuid4().hex,
                    max_tracked=settings.max_tracked,
                    dropped=tallies.dropped,
                )
            except DigestError as exc:  # never deliverable: given up, not retried
                log.error("milter: digest to %s dropped: %s", digest_of.notify, brief(exc))
            else:
                try:
                    self.submitter.submit(digest)
                except SubmitError as exc:
                    log.error(
                        "milter: digest to %s not handed over (kept for the next attempt): %s",
                        digest_of.notify,
                        brief(exc),
                    )
                    self.kept += 1
                    continue
                log.info("milter: digest handed over: to=<%s>", digest.envelope_recipient)
                sent += 1
            try:
                self.store.remove_digest(digest_of.notify, digest_of.periods)
            except StateError as exc:  # sent, and sent again next time: at least once
                log.error("milter: digest to %s not removed: %s", digest_of.notify, brief(exc))
        return sent

    def next_flush(self, now: float) -> float:
        """When the next flush is due: GRACE_SECONDS after the current period ends, or
        sooner when the last one left digests behind (RETRY_SECONDS, doubled for each
        failure in a row, at most one period)."""
        period = self.settings().period
        due = period_start(now - GRACE_SECONDS, period) + period + GRACE_SECONDS
        if self.kept:
            backoff = RETRY_SECONDS * 2 ** min(max(self.failed_flushes - 1, 0), 20)
            due = min(due, now + min(backoff, period))
        return due

    def run(self, stop: threading.Event) -> None:
        """The digest thread: store the recorded events every SAVE_SECONDS, flush when
        due (first at once: digests a previous run left), store the rest at stop. The
        settings are re-read each round, so a reload applies."""
        due = self.clock()
        while True:
            if self.clock() >= due:
                self.flush_logged()
                due = self.next_flush(self.clock())
            else:
                self.save_logged()
            if stop.wait(SAVE_SECONDS):
                break
        self.save_logged()

    def flush_logged(self) -> None:
        try:
            self.flush()
        except Exception:  # a bug must not stop the timer; the next round tries again
            log.exception("milter: digest failed")

    def save_logged(self) -> None:
        try:
            self.save()
        except Exception:  # a bug must not stop the timer
            log.exception("milter: digest events not stored")


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
