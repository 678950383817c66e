"""Directory scale benchmark (SPEC section 8): a SQLite store of N mailboxes.

Measures bulk-load time and file size, open time (start-up), single-lookup latency
(median, p99) for known and unknown keys, throughput from several threads with the
store's one-connection-plus-lock design against a connection per thread, and the RSS of
a fresh process that opens the store and looks up. Optionally (--map-keys) the same for
a Postfix hash: table followed through `postmap -s`. Last, how long `traqmilter policyd`
takes from exec to accepting connections with that store (median of 5 starts).
The two memory indexes (keyindex.py: the set of the keys, the default, and the compact
index of their hashes, directory.sqlite_compact_index) are measured side by side, each in
fresh processes, rounds
alternating their order (--index-runs, medians): RSS it adds, time to read it, lookups per
second for unknown keys, known keys seen for the first time and known keys seen again.
--index-only runs that part alone (after the bulk load).
With --postgresql, the same mailboxes in the PostgreSQL store on a private server started
here (tests/support/postgresql.py, loopback TCP, same machine): load time and lookup
latency on a cache miss (a round trip) and a cache hit, beside SQLite's.

    .venv/bin/python bench/directory_bench.py [--mailboxes 1000000] [--map-keys 0]
                                              [--postgresql] [--no-sqlite]
                                              [--index-runs 5] [--index-only]

Never run by the test suite; numbers go in the report, not in assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from traqmilter.directory import PostfixMapSource, SqliteDirectory  # noqa: E402
from traqmilter.directory.sqlite import CONTAINS_SQL  # noqa: E402
from traqmilter.postfix_tools import find_program, postfix_command  # noqa: E402

DOMAINS = [f"domain{n}.example" for n in range(100)]


def address(n: int) -> str:
    return f"user{n:07d}@{DOMAINS[n % len(DOMAINS)]}"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def latencies_us(lookup: Callable[[str], bool], keys: list[str]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        lookup(key)
        out.append((clock() - start) / 1000)
    return out


def summary(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[int(len(values) * 0.99)]
    return f"median {statistics.median(values):.1f} us, p99 {p99:.1f} us"


class PerThreadConnections:
    """The alternative design: one sqlite3 connection per thread (threading.local)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def contains(self, key: str) -> bool:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = sqlite3.connect(self.path, isolation_level=None)
        at = key.rfind("@")
        return conn.execute(CONTAINS_SQL, (key, key[at:])).fetchone() is not None


def threaded_rate(lookup: Callable[[str], bool], keys: list[str], threads: int) -> float:
    per_thread = len(keys) // threads
    barrier = threading.Barrier(threads + 1)

    def work(part: list[str]) -> None:
        barrier.wait()
        for key in part:
            lookup(key)

    workers = [
        threading.Thread(target=work, args=(keys[i * per_thread : (i + 1) * per_thread],))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - start)


def child_open_and_lookup(path: str, count: int) -> None:
    """Run in a fresh process: start-up time and RSS of a daemon that only has the store."""
    before = rss_mb()
    start = time.perf_counter()
    store = SqliteDirectory(path, create=False)
    opened = time.perf_counter() - start
    rss_open = rss_mb()
    start = time.perf_counter()
    store.load_index()  # what the daemon's first lookup starts in the background
    index_seconds = time.perf_counter() - start
    rng = random.Random(2)
    keys = [address(rng.randrange(count)) for _ in range(100_000)]
    for key in keys:
        store.contains(key)
    print(
        json.dumps(
            {
                "open_seconds": opened,
                "index_seconds": index_seconds,
                "index_keys": store.index_size(),
                "rss_open_mb": rss_open,
                "rss_before_mb": before,
                "rss_after_mb": rss_mb(),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    store.close()


INDEXES = {"set": False, "hashed": True}  # variant: compact_index


def child_index(path: str, count: int, variant: str) -> None:
    """Run in a fresh process: one memory index variant's cost and lookup rates."""
    rng = random.Random(4)
    lookups = 100_000
    # Fresh str objects for every lookup, as a daemon parses each request anew (a str
    # caches its hash).
    unknown = [f"nobody{n}@{DOMAINS[n % len(DOMAINS)]}" for n in range(lookups)]
    known_first = [address(n) for n in rng.sample(range(count), lookups)]
    again = [address(n) for n in rng.sample(range(count), 10_000)]
    known_again = [key.encode().decode() for _ in range(lookups // len(again)) for key in again]
    store = SqliteDirectory(path, create=False, compact_index=INDEXES[variant])
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    assert store.load_index()
    build = time.perf_counter() - start
    gc.collect()
    with_index = rss_mb()
    for key in again:  # known_again: seen before (the cache holds them, where one is used)
        assert store.contains(key)
    rates = {}
    for name, keys, want in (
        ("unknown", unknown, False),
        ("known_again", known_again, True),  # before known_first fills the cache
        ("known_first", known_first, True),
    ):
        lookup = store.contains
        start = time.perf_counter()
        found = sum(map(lookup, keys))
        rates[name] = len(keys) / (time.perf_counter() - start)
        assert found == (len(keys) if want else 0), (variant, name, found)
    gc.collect()
    print(
        json.dumps(
            {
                "index_mb": with_index - before,
                "build_seconds": build,
                "after_lookups_mb": rss_mb() - before,
                "keys": store.index_size(),
                **rates,
            }
        )
    )
    store.close()


def bench_index(path: str, count: int, runs: int) -> None:
    """The compact index against the set of strings, side by side, medians of runs."""
    results: dict[str, list[dict[str, float]]] = {v: [] for v in INDEXES}
    for run in range(runs):
        order = list(INDEXES) if run % 2 == 0 else list(INDEXES)[::-1]
        for variant in order:
            done = subprocess.run(
                [sys.executable, __file__, "--child-index", path, "--mailboxes", str(count),
                 "--variant", variant],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(done.stdout)
            results[variant].append(result)
            print(
                f"index run {run + 1} {variant:6}: +{result['index_mb']:.1f} MB, read in "
                f"{result['build_seconds']:.2f} s, lookups/s unknown {result['unknown']:,.0f} "
                f"known first {result['known_first']:,.0f} again {result['known_again']:,.0f}; "
                f"+{result['after_lookups_mb']:.1f} MB after the lookups",
                flush=True,
            )

    def median(variant: str, field: str) -> float:
        return statistics.median(r[field] for r in results[variant])

    print(f"\nmemory index, {count} mailboxes, medians of {runs} runs (hashed / set):")
    rows = [
        ("RSS added by the index, MB", "index_mb", "{:.1f}"),
        ("RSS added after 300k lookups, MB", "after_lookups_mb", "{:.1f}"),
        ("read (build) seconds", "build_seconds", "{:.2f}"),
        ("lookups/s, unknown", "unknown", "{:,.0f}"),
        ("lookups/s, known, first time", "known_first", "{:,.0f}"),
        ("lookups/s, known, seen before", "known_again", "{:,.0f}"),
    ]
    print(f"  {'':34} {'set':>12} {'hashed':>12} {'hashed/set':>10}")
    for label, field, form in rows:
        old, new = median("set", field), median("hashed", field)
        print(f"  {label:34} {form.format(old):>12} {form.format(new):>12} {new / old:10.3f}")


def bench_sqlite(workdir: Path, count: int, index_runs: int, index_only: bool) -> None:
    path = str(workdir / "directory.sqlite")
    store = SqliteDirectory(path)
    start = time.perf_counter()
    store.bulk_add(address(n) for n in range(count))
    load = time.perf_counter() - start
    store.close()
    size = sum(os.path.getsize(p) for p in Path(workdir).glob("directory.sqlite*"))
    print(f"sqlite: {count} mailboxes bulk-loaded in {load:.1f} s; file {size / 1e6:.0f} MB")
    bench_index(path, count, index_runs)
    if index_only:
        return

    done = subprocess.run(
        [sys.executable, __file__, "--child", path, "--mailboxes", str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    child = json.loads(done.stdout)
    print(
        f"sqlite: open (start-up) {child['open_seconds'] * 1000:.1f} ms; memory index of "
        f"{child['index_keys']} keys read in {child['index_seconds']:.2f} s; "
        f"RSS of a fresh process {child['rss_before_mb']:.0f} MB before open, "
        f"{child['rss_open_mb']:.0f} MB after open, "
        f"{child['rss_after_mb']:.0f} MB with the index + 100k lookups "
        f"(max {child['maxrss_mb']:.0f} MB)"
    )

    indexed = SqliteDirectory(path, create=False)
    indexed.load_index()
    rng = random.Random(1)
    known = [address(rng.randrange(count)) for _ in range(200_000)]
    unknown = [f"nobody{n}@{DOMAINS[n % len(DOMAINS)]}" for n in range(200_000)]
    print(f"index lookup, known:    {summary(latencies_us(indexed.contains, known))}")
    print(f"index lookup, unknown:  {summary(latencies_us(indexed.contains, unknown))}")
    indexed.close()

    # The rest measures SQLite itself: what lookups cost while the index is being re-read.
    store = SqliteDirectory(path, create=False, memory_index=False)
    for key in known[:20_000]:  # warm the page cache and the statement cache
        store.contains(key)
    print(f"sqlite lookup, known:   {summary(latencies_us(store.contains, known))}")
    print(f"sqlite lookup, unknown: {summary(latencies_us(store.contains, unknown))}")
    hits = known[:20_000]
    for key in hits:  # now in the lookup cache (65,536 answers)
        store.contains(key)
    print(f"sqlite lookup, cache hit: {summary(latencies_us(store.contains, hits))}")

    per_thread = PerThreadConnections(path)
    for threads in (1, 4, 16):
        lock_rate = threaded_rate(store.contains, known, threads)
        local_rate = threaded_rate(per_thread.contains, known, threads)
        print(
            f"sqlite {threads:2d} threads: one connection + lock {lock_rate:,.0f}/s; "
            f"connection per thread {local_rate:,.0f}/s"
        )
    start = time.perf_counter()
    for _ in range(200):
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(CONTAINS_SQL, ("a@b", "@b")).fetchone()
        conn.close()
    print(
        "sqlite: opening a connection and its first lookup (per new milter thread): "
        f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us"
    )
    store.close()
    bench_policyd_start(workdir, path)


def bench_policyd_start(workdir: Path, sqlite_path: str) -> None:
    """Exec to listening, as an admin restarting policyd sees it (config check included)."""
    port, socketmap_port = free_port(), free_port()
    config = workdir / "traqmilter.yaml"
    config.write_text(
        f"state_dir: {workdir}/state\n"
        f"directory: {{sqlite: {sqlite_path}}}\n"
        f"domains: {{{', '.join(f'{d}: {{}}' for d in DOMAINS)}}}\n"
        f"postmaster: {address(0)}\n"
        f'policyd: {{listen: "inet:127.0.0.1:{port}", '
        f'socketmap_listen: "inet:127.0.0.1:{socketmap_port}"}}\n'
    )
    argv = [sys.executable, "-m", "traqmilter", "-c", str(config), "policyd"]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"policyd exited {process.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.005)
            times.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait()
    print(
        f"policyd start to listening: median {statistics.median(times):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bench_map(workdir: Path, count: int) -> None:
    source = workdir / "vmailbox"
    with open(source, "w") as f:
        for n in range(count):
            f.write(f"{address(n)}\tx\n")
    old = time.time() - 60
    os.utime(source, (old, old))
    config_dir = workdir / "postfix-config"  # a private instance: empty main.cf, defaults
    config_dir.mkdir(exist_ok=True)
    (config_dir / "main.cf").write_text("")
    postmap = find_program("postmap")
    assert postmap is not None, "postmap (Debian package postfix) is required"
    start = time.perf_counter()
    subprocess.run(postfix_command(postmap, str(config_dir), f"hash:{source}"), check=True)
    print(f"hash map: postmap of {count} keys {time.perf_counter() - start:.1f} s")
    before = rss_mb()
    start = time.perf_counter()
    table = PostfixMapSource(f"hash:{source}", config_dir=str(config_dir), background=False)
    print(
        f"hash map: first load {time.perf_counter() - start:.1f} s, "
        f"RSS +{rss_mb() - before:.0f} MB, {len(table)} keys"
    )
    rng = random.Random(3)
    known = [address(rng.randrange(count)) for _ in range(200_000)]
    print(f"hash map lookup, known: {summary(latencies_us(table.contains, known))}")
    table.close()


def bench_postgresql(count: int) -> None:
    """The PostgreSQL store on a private server: misses are round trips, hits the cache."""
    from tests.support.postgresql import new_database, private_cluster
    from traqmilter.directory.postgresql import PostgresDirectory

    with private_cluster() as cluster:
        database = new_database(cluster)
        store = PostgresDirectory(database.conninfo)
        start = time.perf_counter()
        store.bulk_add(address(n) for n in range(count))
        print(f"postgresql: {count} mailboxes bulk-loaded in {time.perf_counter() - start:.1f} s")
        with psycopg_connect(database.conninfo) as conn:
            conn.execute("VACUUM ANALYZE mailboxes")
        if not store.wait_listening(10):
            raise SystemExit("postgresql: the cache listener did not connect")
        rng = random.Random(1)
        known = list(dict.fromkeys(address(rng.randrange(count)) for _ in range(20_000)))
        unknown = [f"nobody{n}@{DOMAINS[n % len(DOMAINS)]}" for n in range(20_000)]
        for key in unknown[:2000]:  # warm the server's buffers and the connection
            store.contains(key.replace("nobody", "warm"))
        print(f"postgresql lookup, known, miss:   {summary(latencies_us(store.contains, known))}")
        print(f"postgresql lookup, unknown, miss: {summary(latencies_us(store.contains, unknown))}")
        print(f"postgresql lookup, known, hit:    {summary(latencies_us(store.contains, known))}")
        print(f"postgresql lookup, unknown, hit:  {summary(latencies_us(store.contains, unknown))}")
        stats = store.stats
        print(
            f"postgresql: {stats.cache_hits} cache hits, {stats.known + stats.unknown} "
            f"round trips, {stats.errors} errors"
        )
        store.close()


def psycopg_connect(conninfo: str) -> Any:
    import psycopg

    return psycopg.connect(conninfo, autocommit=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=1_000_000)
    parser.add_argument("--map-keys", type=int, default=0)
    parser.add_argument("--postgresql", action="store_true", help="also the PostgreSQL store")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite part")
    parser.add_argument("--index-runs", type=int, default=5, help="runs of the index comparison")
    parser.add_argument("--index-only", action="store_true", help="only the index comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-index", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_open_and_lookup(args.child, args.mailboxes)
        return
    if args.child_index:
        child_index(args.child_index, args.mailboxes, args.variant)
        return
    print(
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus"
    )
    with tempfile.TemporaryDirectory(prefix="directory-bench-") as workdir:
        if not args.no_sqlite:
            bench_sqlite(Path(workdir), args.mailboxes, args.index_runs, args.index_only)
        if args.postgresql:
            bench_postgresql(args.mailboxes)
        if args.map_keys:
            bench_map(Path(workdir), args.map_keys)


if __name__ == "__main__":
    main()
