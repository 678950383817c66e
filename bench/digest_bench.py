"""The digest counts in the state store under a flood (docs/notifications.md): what the
milter's digest thread pays to store a batch of events, SQLite against Redis, and what a
session thread pays to record one (memory only).

    .venv/bin/python bench/digest_bench.py              # 5 rounds, a private redis-server
    .venv/bin/python bench/digest_bench.py --rounds 3 --events 20000

A round records `events` forward events of one domain, each to a new unknown address
(the flood a dictionary attack makes), with notifications.max_tracked at its default,
then stores them as the digest thread does: in batches of `batch` events (one batch is
what arrives in one SAVE_SECONDS). Figures are medians over rounds, each store fresh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.redis_server import RedisServer
from traqmilter.core.digest import DigestBook, DigestEvent
from traqmilter.core.settings import Action, NotificationSettings, StateSettings
from traqmilter.state import STATE_FILE_NAME, DigestStore, SqliteBlockStore
from traqmilter.state_redis import RedisBlockStore

MAX_TRACKED = NotificationSettings().max_tracked


def events(count: int, start: int) -> list[DigestEvent]:
    return [
        DigestEvent(
            "admin@example.com",
            "fwd.example",
            Action.FORWARD,
            f"guess{start + n}@fwd.example",
            f"spam{n % 50}@remote.example",
            f"192.0.2.{n % 200}",
        )
        for n in range(count)
    ]


def store_round(store: DigestStore, total: int, batch: int) -> tuple[float, float]:
    """Seconds to record every event (memory), seconds to store them (batches)."""
    record = store_seconds = 0.0
    period = 3600 * int(time.time() // 3600)
    for start in range(0, total, batch):
        flood = events(batch, start)
        began = time.perf_counter()
        book = DigestBook(max_tracked=MAX_TRACKED)
        for event in flood:
            book.add(event)
        record += time.perf_counter() - began
        began = time.perf_counter()
        store.add_digest(book.rows(period), max_tracked=MAX_TRACKED, expires=time.time() + 3600)
        store_seconds += time.perf_counter() - began
    return record, store_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"sqlite": [], "redis": []}
    with RedisServer() as redis:
        for n in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                sqlite = SqliteBlockStore(str(Path(tmp) / STATE_FILE_NAME))
                settings = StateSettings(backend="redis", url=redis.url, key_prefix=f"b{n}:")
                shared = RedisBlockStore(settings, max_blocks=1000)
                order = [("sqlite", sqlite), ("redis", shared)]
                for name, store in order if n % 2 == 0 else order[::-1]:
                    results[name].append(store_round(store, args.events, args.batch))
                sqlite.close()
                shared.close()
    print(
        f"{args.events} events, batches of {args.batch}, max_tracked {MAX_TRACKED}, "
        f"medians of {args.rounds} rounds"
    )
    for name, rounds in results.items():
        record = statistics.median(r for r, _ in rounds) / args.events * 1e6
        stored = statistics.median(s for _, s in rounds) / args.events * 1e6
        per_batch = statistics.median(s for _, s in rounds) / (args.events / args.batch) * 1e3
        print(
            f"{name:6}  record {record:5.2f} us/event (memory)   store {stored:6.2f} us/event, "
            f"{per_batch:6.2f} ms/batch   -> {1e6 / stored:9.0f} events/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
