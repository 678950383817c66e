"""The queue gauge: counting Postfix's queues cheaply, sampling in the background."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from traqmilter.queue_gauge import (
    FixedQueueGauge,
    PostfixQueueGauge,
    QueueUnreadable,
    SendmailQueueGauge,
    count_queue_files,
    count_sendmail_queue_files,
)

# Files a Postfix queue directory holds (path relative to queue_directory).
COUNTED = [
    "incoming/4XyZ1a2b3c",
    "active/4XyZ1a2b3d",
    "active/4XyZ1a2b3e",
    "deferred/A/A1B2C3D4E5",  # hash_queue_names: deferred is hashed by default
    "deferred/F/F1B2C3D4E5",
    "deferred/F/3/F3B2C3D4E5",  # hash_queue_depth 2
    "hold/4XyZ1a2b3f",
    "maildrop/ABCDEF123",
]
NOT_COUNTED = [
    "bounce/A/A1B2C3D4E5",  # logs, not messages
    "defer/A/A1B2C3D4E5",
    "corrupt/4XyZ9",
    "saved/4XyZ9",
    "trace/4XyZ9",
    "pid/master.pid",
]


def make_queue(root: Path, files: list[str]) -> Path:
    for name in ("incoming", "active", "deferred", "hold", "maildrop"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_counts_the_message_queues_recursively(tmp_path: Path) -> None:
    make_queue(tmp_path, COUNTED + NOT_COUNTED)
    assert count_queue_files(str(tmp_path)) == len(COUNTED)


def test_symlinks_are_not_followed_or_counted(tmp_path: Path) -> None:
    make_queue(tmp_path, ["active/4XyZ1"])
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    make_queue(outside, COUNTED)
    (tmp_path / "active" / "link-to-file").symlink_to(outside / "active" / "4XyZ1a2b3d")
    (tmp_path / "deferred" / "B").symlink_to(outside / "deferred" / "A")
    assert count_queue_files(str(tmp_path)) == 1


def test_a_queue_not_created_yet_counts_zero(tmp_path: Path) -> None:
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / "4XyZ1").write_bytes(b"")
    assert count_queue_files(str(tmp_path)) == 1


@pytest.mark.parametrize(
    ("label", "breakage"),
    [
        ("queue directory missing", "missing"),
        ("a queue is not a directory", "file"),
    ],
)
def test_unreadable_queue_raises(tmp_path: Path, label: str, breakage: str) -> None:
    root = tmp_path / "spool"
    if breakage == "file":
        make_queue(root, [])
        (root / "deferred").rmdir()
        (root / "deferred").write_bytes(b"")
    with pytest.raises(QueueUnreadable):
        count_queue_files(str(root))


def test_never_sampled_gauge_reports_zero(tmp_path: Path) -> None:
    gauge = PostfixQueueGauge(str(make_queue(tmp_path, COUNTED)), 10)
    assert (gauge.size, gauge.sampled_at) == (0, None)


def test_sample_stores_the_size(tmp_path: Path) -> None:
    clock = FakeClock()
    gauge = PostfixQueueGauge(str(make_queue(tmp_path, COUNTED)), 10, clock)
    assert gauge.sample() == len(COUNTED)
    assert (gauge.size, gauge.sampled_at) == (len(COUNTED), 50.0)


def test_failed_samples_keep_the_last_value_and_log_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_queue(tmp_path / "spool", COUNTED)
    clock = FakeClock()
    gauge = PostfixQueueGauge(str(root), 10, clock)
    gauge.sample()
    root.rename(tmp_path / "moved")
    clock.now += 10
    with caplog.at_level(logging.INFO, logger="traqmilter.queue"):
        for _ in range(3):
            assert gauge.sample() == len(COUNTED)
        assert gauge.size == len(COUNTED)  # reading it does no I/O and cannot fail
        assert gauge.sampled_at == 50.0
        (tmp_path / "moved").rename(root)
        (root / "hold" / "another").write_bytes(b"")
        assert gauge.sample() == len(COUNTED) + 1
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_thread_samples_at_once_and_stops(tmp_path: Path) -> None:
    gauge = PostfixQueueGauge(str(make_queue(tmp_path, COUNTED)), 3600)
    stop = threading.Event()
    thread = gauge.start_thread(stop)
    _wait_until(lambda: gauge.sampled_at is not None, "the first sample")
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert gauge.size == len(COUNTED)


def test_asyncio_task_samples_at_once_and_stops(tmp_path: Path) -> None:
    gauge = PostfixQueueGauge(str(make_queue(tmp_path, COUNTED)), 3600)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(gauge.run_periodically(stop))
        while gauge.sampled_at is None:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert gauge.size == len(COUNTED)


def test_asyncio_task_samples_again_after_the_interval(tmp_path: Path) -> None:
    root = make_queue(tmp_path, COUNTED)
    gauge = PostfixQueueGauge(str(root), 0.01)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(gauge.run_periodically(stop))
        while gauge.size != len(COUNTED):
            await asyncio.sleep(0.005)
        (root / "active" / "one-more").write_bytes(b"")
        while gauge.size != len(COUNTED) + 1:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(asyncio.wait_for(run(), 30))


def test_fixed_gauge() -> None:
    gauge = FixedQueueGauge(41_000)
    assert gauge.size == 41_000
    gauge.size = 0
    assert FixedQueueGauge().size == 0


# ------------------------------------------------------------------------- Sendmail

# A Sendmail queue: one qf (control) file per message, with its df (data) file beside it or
# in a df/ subdirectory; q1, q2 are further queue directories (QUEUE_DIR=/var/spool/mqueue/q*).
SENDMAIL_COUNTED = [
    "qfAB12C3D4000001",
    "qfAB12C3D4000002",
    "qf/qfAB12C3D4000003",  # the qf/ df/ xf/ subdirectory layout
    "q1/qfAB12C3D4000004",
    "q2/qf/qfAB12C3D4000005",
]
SENDMAIL_NOT_COUNTED = [
    "dfAB12C3D4000001",  # message bodies, one per qf
    "dfAB12C3D4000002",
    "df/dfAB12C3D4000003",
    "q1/dfAB12C3D4000004",
    "q2/df/dfAB12C3D4000005",
    "xfAB12C3D4000001",  # transcript
    "tfAB12C3D4000009",  # a qf being written
    "hfAB12C3D4000008",  # quarantined
    "QfAB12C3D4000007",  # lost (unreadable) queue file
    "sm-client.pid",
    "q1/qf-nested/qfAB12C3D4000010",  # below a queue group only qf/ counts
    "qf/qf/qfAB12C3D4000011",
    "other/qfAB12C3D4000012",  # not a q* directory
]


def make_files(root: Path, files: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


def test_sendmail_counts_qf_files_in_every_documented_place(tmp_path: Path) -> None:
    make_files(tmp_path, SENDMAIL_COUNTED + SENDMAIL_NOT_COUNTED)
    assert count_sendmail_queue_files(str(tmp_path)) == len(SENDMAIL_COUNTED)
    # The Postfix gauge sees none of Sendmail's queue: the reason the role chooses the gauge.
    assert count_queue_files(str(tmp_path)) == 0


def test_sendmail_follows_linked_queue_subdirectories_but_not_linked_files(
    tmp_path: Path,
) -> None:
    # Sendmail documents qf/ and queue directories as possibly links to other disks.
    root = make_files(tmp_path / "mqueue", ["qfAB12C3D4000001"])
    disk = make_files(tmp_path / "disk2", ["qfAB12C3D4000002", "qfAB12C3D4000003"])
    (root / "qf").symlink_to(disk)
    (root / "qfAB12C3D4000099").symlink_to(disk / "qfAB12C3D4000002")
    assert count_sendmail_queue_files(str(root)) == 3


def test_sendmail_empty_queue_counts_zero_and_missing_raises(tmp_path: Path) -> None:
    assert count_sendmail_queue_files(str(make_files(tmp_path / "mqueue", []))) == 0
    with pytest.raises(QueueUnreadable):
        count_sendmail_queue_files(str(tmp_path / "missing"))


def test_sendmail_gauge_samples_qf_files_and_keeps_the_last_good_value(tmp_path: Path) -> None:
    root = make_files(tmp_path / "mqueue", SENDMAIL_COUNTED + SENDMAIL_NOT_COUNTED)
    clock = FakeClock()
    gauge = SendmailQueueGauge(str(root), 10, clock)
    assert gauge.sample() == len(SENDMAIL_COUNTED)
    assert (gauge.size, gauge.sampled_at) == (len(SENDMAIL_COUNTED), clock.now)
    (root / "qfAB12C3D4000001").unlink()
    clock.now += 10
    assert gauge.sample() == len(SENDMAIL_COUNTED) - 1
    root.rename(tmp_path / "gone")
    clock.now += 10
    assert gauge.sample() == len(SENDMAIL_COUNTED) - 1
    assert gauge.sampled_at == clock.now - 10


def test_sendmail_gauge_runs_in_a_thread_like_the_postfix_one(tmp_path: Path) -> None:
    gauge = SendmailQueueGauge(str(make_files(tmp_path, SENDMAIL_COUNTED)), 3600)
    stop = threading.Event()
    thread = gauge.start_thread(stop)
    try:
        # The first sample is taken at once; the next would be an hour later.
        _wait_until(lambda: gauge.sampled_at is not None, "the first sample")
    finally:
        stop.set()
        thread.join()
    assert gauge.size == len(SENDMAIL_COUNTED)
