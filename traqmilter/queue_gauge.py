"""The MTA's queue size, sampled in the background and read for free on every RCPT.

PostfixQueueGauge counts message files in Postfix's incoming, active, deferred, hold and
maildrop queues (recursively: hash_queue_names splits deferred/ into subdirectories) with
os.scandir, which reads directory entries without a stat() per file. `.size` is a plain
attribute: reading it does no I/O. One mechanism drives sampling: run_periodically() as an
asyncio task in policyd (the scan runs in a worker thread, so the event loop never waits
for the disk), or start_thread() for the threaded milter. Both sample at once, then every
sample_interval seconds.

SendmailQueueGauge (milter.role: sendmail) counts Sendmail's queue instead: one `qf*`
control file per queued message (data `df*`, transcript `xf*`, temporary `tf*` and
quarantined `hf*`/lost `Qf*` files are not messages waiting). It looks in queue.directory
itself (the classic /var/spool/mqueue), in its `qf/` subdirectory (the layout that splits
qf, df and xf files into subdirectories), and in every `q*` subdirectory with the same two
places (several queue directories, QUEUE_DIR=/var/spool/mqueue/q*). Sendmail documents
these subdirectories as possibly symbolic links to other disks, so those named ones are
followed; nothing else is. Both gauges share the sampling code (QueueGauge).

A gauge that has never sampled reports 0. The queue limits are a pressure valve, not a
security boundary: failing open for the few seconds before the first sample (or when the
queue cannot be read at all) keeps mail flowing, whereas any large default would defer
every message of a healthy server. When a sample fails (queue directory missing or
unreadable), the last good value is kept and the failure is logged once until a sample
succeeds again.

SECURITY: Postfix's queue directories are mode 0700, owned by postfix (Sendmail's mqueue
is 0700 root); the daemon needs read and search access to them: give its systemd unit
AmbientCapabilities=CAP_DAC_READ_SEARCH, or grant access with ACLs (or, for Sendmail's
queue, a group: mode 0750). Symbolic links are
never followed in Postfix's queue, and the recursion is bounded (Postfix hashes at most a
few levels deep).

FixedQueueGauge is a gauge with a size set by hand, for tests (`traqmilter explain`
samples the configured MTA's real gauge once).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("traqmilter.queue")

POSTFIX_QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")
# Postfix's hash_queue_depth is at most a few levels; deeper directories are not its.
MAX_DEPTH = 4


@dataclass
class FixedQueueGauge:
    """A queue gauge whose size is whatever it was set to."""

    size: int = 0


class QueueUnreadable(OSError):
    """A queue directory could not be read; the sample is not trustworthy."""


def count_queue_files(queue_directory: str, queues: tuple[str, ...] = POSTFIX_QUEUES) -> int:
    """Message files in the given queues of queue_directory. A queue directory that does not
    exist counts 0 (a fresh install); one that cannot be read raises QueueUnreadable."""
    if not os.path.isdir(queue_directory):
        raise QueueUnreadable(f"{queue_directory}: not a directory")
    total = 0
    for queue in queues:
        total += _count_tree(os.path.join(queue_directory, queue), MAX_DEPTH, top=True)
    return total


def _count_tree(path: str, depth: int, *, top: bool) -> int:
    try:
        entries = os.scandir(path)
    except FileNotFoundError:
        return 0  # a queue not created yet, or a hash subdirectory removed while we scan
    except OSError as exc:
        raise QueueUnreadable(f"{path}: {exc.strerror or exc}") from exc
    count = 0
    with entries:
        try:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    count += 1
                elif depth > 0 and entry.is_dir(follow_symlinks=False):
                    count += _count_tree(entry.path, depth - 1, top=False)
        except FileNotFoundError:
            if top:
                raise QueueUnreadable(f"{path}: vanished while counting") from None
        except OSError as exc:
            raise QueueUnreadable(f"{path}: {exc.strerror or exc}") from exc
    return count


def count_sendmail_queue_files(queue_directory: str) -> int:
    """Messages (qf* control files) in Sendmail's queue_directory, its qf/ subdirectory and
    every q*/ (and q*/qf/) queue directory below it; raises QueueUnreadable when
    queue_directory itself cannot be read."""
    if not os.path.isdir(queue_directory):
        raise QueueUnreadable(f"{queue_directory}: not a directory")
    total, subdirectories = _scan_sendmail_dir(queue_directory, top=True)
    for name in subdirectories:
        path = os.path.join(queue_directory, name)
        count, nested = _scan_sendmail_dir(path, top=False)
        total += count
        if name != "qf" and "qf" in nested:
            total += _scan_sendmail_dir(os.path.join(path, "qf"), top=False)[0]
    return total


def _scan_sendmail_dir(path: str, *, top: bool) -> tuple[int, list[str]]:
    """qf* regular files in path, and the subdirectories to descend into: at the top every
    q* directory (qf/ and queue groups), below it only qf/. Below the top a directory that
    vanished counts 0."""
    try:
        entries = os.scandir(path)
    except FileNotFoundError:
        if top:
            raise QueueUnreadable(f"{path}: vanished while counting") from None
        return 0, []
    except OSError as exc:
        raise QueueUnreadable(f"{path}: {exc.strerror or exc}") from exc
    count = 0
    subdirectories: list[str] = []
    with entries:
        try:
            for entry in entries:
                if entry.name.startswith("qf") and entry.is_file(follow_symlinks=False):
                    count += 1
                elif (
                    entry.name.startswith("q")
                    and (top or entry.name == "qf")
                    and entry.is_dir(follow_symlinks=True)
                ):
                    subdirectories.append(entry.name)
        except FileNotFoundError:
            if top:
                raise QueueUnreadable(f"{path}: vanished while counting") from None
        except OSError as exc:
            raise QueueUnreadable(f"{path}: {exc.strerror or exc}") from exc
    return count, subdirectories


class QueueGauge(abc.ABC):
    """An MTA's queue size as last sampled; subclasses say how the queue is counted."""

    def __init__(
        self,
        queue_directory: str,
        sample_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_directory = queue_directory
        self.sample_interval = sample_interval
        self._clock = clock
        self.size = 0  # read by the engine on every RCPT; never computed on read
        self.sampled_at: float | None = None  # clock() of the last good sample
        self._failing = False

    def configure(self, queue_directory: str, sample_interval: float) -> None:
        """Take a reloaded config's queue settings; the next sample uses them."""
        self.queue_directory = queue_directory
        self.sample_interval = sample_interval

    @abc.abstractmethod
    def count(self) -> int:
        """Count the queue now; raises QueueUnreadable when it cannot be read."""

    def sample(self) -> int:
        """Count the queue now and store the result in .size; returns .size. On failure the
        previous value stays (logged once per run of failures)."""
        started = self._clock()
        try:
            size = self.count()
        except QueueUnreadable as exc:
            if not self._failing:
                log.warning("queue size not sampled, keeping %d: %s", self.size, exc)
                self._failing = True
            return self.size
        if self._failing:
            log.info("queue size sampled again: %d", size)
            self._failing = False
        self.size = size
        self.sampled_at = started
        return size

    async def run_periodically(self, stop_event: asyncio.Event) -> None:
        """Sample now and every sample_interval seconds until stop_event is set. The scan
        runs in the default executor so the event loop does not wait for the disk."""
        while not stop_event.is_set():
            try:
                await asyncio.to_thread(self.sample)
            except Exception:  # a bug, not an unreadable queue (sample() keeps those quiet)
                log.exception("queue size not sampled")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_event.wait(), timeout=self.sample_interval)

    def start_thread(self, stop_event: threading.Event) -> threading.Thread:
        """Sample now and every sample_interval seconds in a daemon thread until stop_event
        is set; returns the started thread (join it after setting the event)."""

        def loop() -> None:
            while not stop_event.is_set():
                self.sample()
                stop_event.wait(self.sample_interval)

        thread = threading.Thread(target=loop, name="queue gauge", daemon=True)
        thread.start()
        return thread


class PostfixQueueGauge(QueueGauge):
    """Postfix's queue size (incoming, active, deferred, hold, maildrop) as last sampled."""

    def count(self) -> int:
        return count_queue_files(self.queue_directory)


class SendmailQueueGauge(QueueGauge):
    """Sendmail's queue size (qf* files) as last sampled."""

    def count(self) -> int:
        return count_sendmail_queue_files(self.queue_directory)
