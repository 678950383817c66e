"""policyd throughput and latency, side by side with a do-nothing policy server (the floor).

    .venv/bin/python bench/policyd_bench.py [--quick] [--requests N] [--rounds R] [--uvloop]
        [--mailboxes N] [--mix default|unknown|known] [--servers floor,policyd-sqlite,...]

--quick (under a minute): 20,000 requests per run, one round, the 4-attempt memory run.

Each server runs in its own process on loopback:
  floor           the goal's reference: a do-nothing asyncio policy server written the
                  plain way (asyncio streams; reads each request up to its empty line,
                  splits it into its attributes, answers DUNNO). The issue puts this floor
                  at about 46,000 requests/s here; it measures 47-49,000;
  transport       the least any asyncio policy server can do: a BufferedProtocol that
                  finds request ends and answers DUNNO, reading no attribute (115,000/s);
                  it shows what the event loop and the kernel cost, not a policy server;
  policyd-none    policyd's server and codec, with a handler that answers DUNNO unasked;
  policyd-dict    policyd: PolicyServer + PolicyAdapter + Engine, with an in-memory
                  directory of 100,000 mailboxes;
  policyd-sqlite  the same with the SQLite store (traqmilter/directory/sqlite.py) holding
                  100,000 mailboxes, when that module exists;
  policyd-state   policyd-dict with the default state store, `state.sqlite` (blocks, and
                  the milter's deferred recipients, which policyd looks up in the file
                  when it counts an unknown recipient), as `traqmilter policyd` runs it;
  policyd-sqlite-compact  the same with directory.sqlite_compact_index: the memory index
                  holds hashes of the keys, and SQLite confirms every known recipient the
                  lookup cache has not seen;
  policyd-redis   policyd-dict with the attack state shared on Redis (state.backend: redis):
                  a private redis-server (pinned beside the load generator, as a Redis on
                  another host would not take the server's CPU), the table's journal, and
                  the store's sync every SYNC_SECONDS in a background thread, as
                  `traqmilter policyd` runs it. Needs redis-server (Debian redis-server).
The load generator, in another process, keeps 10 persistent connections and sends Postfix
3.7-sized RCPT requests closed-loop (send, wait for the reply, send the next). The mix: 70%
known recipients, 10% remote domains, 5% unknown recipients from many clients, 15% from 20
harvesters that cross the dictionary-attack threshold (5) early in every run and are then
answered 450.

--mailboxes sets the directory's size (known recipients are drawn from all of them);
--mix unknown sends only unknown recipients of a local domain from clients seen once (the
dictionary-attack path, never blocked), --mix known only known recipients; --servers runs
only the servers named (the floor always runs: the ratios are to it).

Rounds alternate the server order; the figures are medians over rounds. With two or more
CPUs the servers are pinned to CPU 0 and the load generator to CPU 1, so that they do not
compete. Also measured: the same runs with 200 idle connections held open (Postfix keeps
one per smtpd process), the in-process cost of each hot-path stage, and the memory of an
AttackTable tracking 1,000,000 distinct clients (in a fresh process).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer  # noqa: E402 - after the path is set

# Set by main() for the spawned servers and load generator (--mailboxes, --mix).
MAILBOXES = int(os.environ.get("TRAQMILTER_BENCH_MAILBOXES", "100000"))
MIX = os.environ.get("TRAQMILTER_BENCH_MIX", "default")
CONNECTIONS = 10
IDLE_CONNECTIONS = 200
WARMUP_REQUESTS = 3_000
HARVESTERS = 20
SERVER_CPU, LOAD_CPU = 0, 1
SQLITE_MODULE = "traqmilter.directory.sqlite"
REDIS_URL_VARIABLE = "TRAQMILTER_BENCH_REDIS_URL"  # how the spawned server finds Redis
STATE_DIR_VARIABLE = "TRAQMILTER_BENCH_STATE_DIR"

# A Postfix 3.7 RCPT request: the attributes smtpd sends, in its order (about 680 bytes).
REQUEST_HEAD = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=%s\nclient_name=mail.sender.example\nclient_port=54321\n"
    b"reverse_client_name=mail.sender.example\nserver_address=192.0.2.25\nserver_port=25\n"
    b"helo_name=mail.sender.example\nsender=%s\nrecipient=%s\nrecipient_count=0\n"
)
REQUEST_TAIL = (
    b"queue_id=\ninstance=1c3f.66a1b2c3.9f1e.0\nsize=12345\netrn_domain=\nstress=\n"
    b"sasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
    b"ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
    b"encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n"
    b"compatibility_level=3.6\nmail_version=3.7.11\n\n"
)


def mailbox_addresses() -> list[str]:
    half = MAILBOXES // 2
    return [f"user{i}@example.com" for i in range(half)] + [
        f"user{i}@example.org" for i in range(half, MAILBOXES)
    ]


def build_requests(count: int, run_id: int, seed: int = 7) -> list[bytes]:
    """The request mix of one run. Addresses that are counted (unknown recipients) are new
    in every run, so each run sees the harvesters cross the threshold afresh."""
    import random

    rng = random.Random(seed + run_id)
    legit_clients = [b"198.18.%d.%d" % (i // 250, i % 250 + 1) for i in range(1000)]
    network = b"100.%d.%d" % (64 + run_id // 250 % 64, run_id % 250)  # in 100.64.0.0/10
    harvesters = [b"%s.%d" % (network, h + 1) for h in range(HARVESTERS)]
    requests = []
    for n in range(count):
        roll = {"default": rng.random(), "known": 0.0, "unknown": 0.84}[MIX]
        sender = b"sender%d@sender.example" % rng.randrange(5000)
        if roll < 0.70:
            i = rng.randrange(MAILBOXES)
            domain = b"example.com" if i < MAILBOXES // 2 else b"example.org"
            recipient, client = b"user%d@%s" % (i, domain), rng.choice(legit_clients)
        elif roll < 0.80:
            recipient = b"someone%d@remote%d.example" % (rng.randrange(1000), rng.randrange(50))
            client = rng.choice(legit_clients)
        elif roll < 0.85:
            serial = run_id * count + n  # a client seen once: never blocked
            recipient = b"typo%d@example.com" % rng.randrange(1000 if MIX == "default" else count)
            client = b"10.%d.%d.%d" % (serial >> 16 & 255, serial >> 8 & 255, serial & 255)
        else:
            recipient, client = b"guess%d@example.com" % n, rng.choice(harvesters)
        requests.append(REQUEST_HEAD % (client, sender, recipient) + REQUEST_TAIL)
    return requests


# --- servers ---------------------------------------------------------------------------


async def floor_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The do-nothing policy server: reads every request into its attributes (as any
    policy server must before it can decide) and answers DUNNO."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            request = await reader.readuntil(b"\n\n")
            attributes = dict(line.split("=", 1) for line in request.decode().split("\n") if line)
            if "request" not in attributes:
                break
            writer.write(b"action=DUNNO\n\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass  # EOF, or not a policy request: close, as any policy server would
    writer.close()


class TransportProtocol(asyncio.BufferedProtocol):
    """The bare transport: policyd's transport handling, no request parsing, no decisions."""

    def __init__(self) -> None:
        self._view = memoryview(bytearray(8192))
        self._pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self._view[:nbytes])
        if self._pending:
            data = self._pending + data
        requests = data.count(b"\n\n")
        if requests:
            assert self.transport is not None
            self.transport.write(b"action=DUNNO\n\n" * requests)
            data = data[data.rfind(b"\n\n") + 2 :]
        self._pending = data


class DictDirectory:
    """The in-memory fake directory: a set of normalised keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = frozenset(keys)

    def contains(self, key: str) -> bool:
        return key in self.keys


class Queue:
    size = 0


def build_policyd_handler(
    directory_kind: str, sqlite_path: str, shared: Any = None
) -> Callable[..., str]:
    """The real adapter and engine; directory_kind "none" instead answers DUNNO without
    deciding (policyd's server and codec alone). `shared`: a block store (RedisBlockStore)
    that follows the table and persists its blocks."""
    from policyd.adapter import PolicyAdapter
    from traqmilter.core.attack import AttackTable, Block
    from traqmilter.core.engine import Directory, Engine
    from traqmilter.core.settings import Config, DomainPolicy

    if directory_kind == "none":
        return lambda request, notes=None: "DUNNO"
    config = Config(domains={"example.com": DomainPolicy(), "example.org": DomainPolicy()})
    directory: Directory
    if directory_kind == "sqlite":
        from traqmilter.directory.sqlite import SqliteDirectory

        directory = SqliteDirectory(sqlite_path, create=False)
        # As in a policyd that has served its first lookup: the memory index is read.
        directory.load_index()
    elif directory_kind == "sqlite-compact":
        from traqmilter.directory.sqlite import SqliteDirectory

        directory = SqliteDirectory(sqlite_path, create=False, compact_index=True)
        directory.load_index()
    else:
        directory = DictDirectory(mailbox_addresses())
    da = config.dictionary_attack
    attacks = AttackTable(
        threshold=da.threshold,
        window_seconds=da.window,
        block_seconds=da.block,
        ipv6_prefix=da.ipv6_prefix,
        max_clients=da.max_clients,
    )
    blocks: list[Block] = []
    engine = Engine(config, directory, attacks, Queue(), time.time)
    if shared is None:
        return PolicyAdapter(engine, blocks.append)
    shared.share(attacks, time.time())
    return PolicyAdapter(engine, shared.save)


def pin(cpu: int) -> None:
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def server_main(kind: str, sqlite_path: str, use_uvloop: bool, port_pipe: Connection) -> None:
    pin(SERVER_CPU)
    if use_uvloop:
        import uvloop  # not a dependency: pip install uvloop to compare

        uvloop.install()

    async def serve() -> None:
        if kind == "floor":
            server = await asyncio.start_server(floor_connection, "127.0.0.1", 0, backlog=1024)
            port = server.sockets[0].getsockname()[1]
        elif kind == "transport":
            loop = asyncio.get_running_loop()
            server = await loop.create_server(TransportProtocol, "127.0.0.1", 0, backlog=1024)
            port = server.sockets[0].getsockname()[1]
        else:
            from policyd.server import PolicyServer

            shared = None
            directory_kind = kind.removeprefix("policyd-")
            if kind == "policyd-state":
                from traqmilter.state import SqliteBlockStore

                shared = SqliteBlockStore.in_state_dir(os.environ[STATE_DIR_VARIABLE])
                directory_kind = "dict"
            if kind == "policyd-redis":
                from traqmilter.core.settings import StateSettings
                from traqmilter.state_redis import RedisBlockStore

                url = os.environ[REDIS_URL_VARIABLE]
                shared = RedisBlockStore(StateSettings(backend="redis", url=url), 1_000_000)
                directory_kind = "dict"
            handler = build_policyd_handler(directory_kind, sqlite_path, shared)
            if shared is not None:  # what `traqmilter policyd` runs beside its server
                from policyd.main import _every

                table = handler.engine.attacks  # type: ignore[attr-defined]
                asyncio.get_running_loop().create_task(
                    _every(lambda: shared.sync_seconds, lambda: shared.follow(table, time.time()))
                )
            policy_server = PolicyServer(
                handler, listen="inet:127.0.0.1:0", max_connections=2000, idle_timeout=3600
            )
            await policy_server.start()
            port = policy_server.port
            from policyd.main import settle_heap

            settle_heap()  # as `traqmilter policyd` does once it serves
        port_pipe.send(port)
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(serve())


# --- load generator ----------------------------------------------------------------------


@dataclass
class RunResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    replies: dict[str, int]
    server_cpu: float = 0.0  # CPU seconds per wall second: 1.0 means the server is the limit
    server_us_per_request: float = 0.0  # server CPU per request: unaffected by a slow client
    load_cpu: float = 0.0


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ask(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("server closed the connection")
        reply += chunk
    return reply


def drive(port: int, requests: list[bytes], connections: int, server_pid: int) -> RunResult:
    """Closed loop over persistent connections: each sends its next request as soon as the
    reply to the previous one is complete."""
    socks = [connect(port) for _ in range(connections)]
    server_cpu_before, load_cpu_before = process_cpu_seconds(server_pid), time.process_time()
    poller = select.epoll()
    by_fd = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = sock
    total = len(requests)
    latencies = [0] * total
    in_flight: dict[int, tuple[int, int]] = {}
    partial: dict[int, bytes] = {}
    tally: Counter[bytes] = Counter()
    clock = time.perf_counter_ns
    started = clock()
    sent = 0
    for sock in socks[:total]:
        sock.send(requests[sent])
        in_flight[sock.fileno()] = (sent, clock())
        sent += 1
    done = 0
    while done < total:
        for fd, _ in poller.poll():
            sock = by_fd[fd]
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed a connection during the run")
            if fd in partial:
                data = partial.pop(fd) + data
            if not data.endswith(b"\n\n"):
                partial[fd] = data
                continue
            now = clock()
            index, sent_at = in_flight.pop(fd)
            latencies[index] = now - sent_at
            tally[data[7:10]] += 1
            done += 1
            if sent < total:
                sock.send(requests[sent])
                in_flight[fd] = (sent, clock())
                sent += 1
    elapsed_ns = clock() - started
    server_cpu = process_cpu_seconds(server_pid) - server_cpu_before
    load_cpu = time.process_time() - load_cpu_before
    poller.close()
    for sock in socks:
        sock.close()
    latencies.sort()
    return RunResult(
        requests_per_second=total / (elapsed_ns / 1e9),
        p50_ms=latencies[total // 2] / 1e6,
        p99_ms=latencies[min(total - 1, int(total * 0.99))] / 1e6,
        replies={key.decode(): count for key, count in sorted(tally.items())},
        server_cpu=server_cpu / (elapsed_ns / 1e9),
        server_us_per_request=server_cpu / total * 1e6,
        load_cpu=load_cpu / (elapsed_ns / 1e9),
    )


def load_main(commands: Connection) -> None:
    """Serve measurement commands from the parent: (port, request count, run id, idle)."""
    pin(LOAD_CPU)
    while True:
        command = commands.recv()
        if command is None:
            return
        port, server_pid, count, run_id, idle_count = command
        idle = [connect(port) for _ in range(idle_count)]
        for sock in idle:  # like an smtpd process that asked once and now idles
            ask(sock, build_requests(1, run_id)[0])
        drive(port, build_requests(WARMUP_REQUESTS, run_id + 100_000), CONNECTIONS, server_pid)
        result = drive(port, build_requests(count, run_id), CONNECTIONS, server_pid)
        for sock in idle:
            sock.close()
        commands.send(result)


# --- in-process measurements ------------------------------------------------------------


def attack_memory_main(attempts_per_client: int, results: Connection) -> None:
    """RSS of an AttackTable after recording 1,000,000 distinct IPv4 clients."""
    from traqmilter.core.attack import AttackTable, client_key

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    before = rss_mb()
    table = AttackTable(threshold=5, window_seconds=600, block_seconds=3600)
    now = 1_700_000_000.0
    clients = 1_000_000
    for attempt in range(attempts_per_client):
        for i in range(clients):
            key = client_key(f"{10 + (i >> 16)}.{i >> 8 & 255}.{i & 255}.1", 64)
            assert key is not None
            table.record_unknown(key, now + attempt)
    after = rss_mb()
    results.send((len(table), before, after))


def hot_path_costs() -> dict[str, float]:
    """Microseconds per request for each stage, in this process (no sockets); the best of
    three passes over 5,000 requests of the mix."""
    import timeit

    from policyd.codec import PolicyDecoder, PolicyRequest, encode_reply

    handler = build_policyd_handler("dict", "")
    requests = build_requests(5000, 999)
    decoder = PolicyDecoder()
    decoded = [item for r in requests for item in decoder.feed(r)]
    assert all(isinstance(item, PolicyRequest) for item in decoded)
    actions = [handler(r) for r in decoded]

    def best(stage: Callable[[], object]) -> float:
        return min(timeit.repeat(stage, number=1, repeat=3)) / len(requests) * 1e6

    return {
        "decode": best(lambda: [decoder.feed(r) for r in requests]),
        "adapter+engine": best(lambda: [handler(r) for r in decoded]),
        "encode": best(lambda: [encode_reply(a) for a in actions]),
    }


# --- the run -------------------------------------------------------------------------------


def start_server(
    ctx: Any, kind: str, sqlite_path: str, use_uvloop: bool
) -> tuple[multiprocessing.process.BaseProcess, int]:
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(
        target=server_main, args=(kind, sqlite_path, use_uvloop, child_end), daemon=True
    )
    process.start()
    if not parent_end.poll(120):
        raise RuntimeError(f"{kind} server did not start")
    port: int = parent_end.recv()
    return process, port


def start_redis() -> RedisServer | None:
    """A private redis-server on a unix socket, pinned to the load generator's CPU."""
    if shutil.which("redis-server") is None:
        return None
    server = RedisServer().start()
    assert server.process is not None
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(server.process.pid, {LOAD_CPU})
    return server


def redis_memory(clients: int = 1_000_000, attempts: int = 4) -> tuple[float, float, int]:
    """Redis used_memory (INFO memory) before and after `clients` distinct IPv4 clients
    counted `attempts` times each through RedisBlockStore's own script, in MB; and the
    number of keys."""
    from traqmilter.core.attack import AttackTable, client_key
    from traqmilter.core.settings import StateSettings
    from traqmilter.state_redis import RedisBlockStore

    with RedisServer() as server:
        admin = server.client()
        before = int(admin.info("memory")["used_memory"]) / 1e6
        store = RedisBlockStore(StateSettings(backend="redis", url=server.url), clients)
        table = AttackTable(threshold=5, window_seconds=600, block_seconds=3600)
        store.share(table, time.time())
        now = time.time()
        batch = 20_000
        for start in range(0, clients, batch):
            for i in range(start, min(start + batch, clients)):
                key = client_key(f"{10 + (i >> 16)}.{i >> 8 & 255}.{i & 255}.1", 64)
                assert key is not None
                for attempt in range(attempts):
                    table.record_unknown(key, now + attempt)
            store.follow(table, now + attempts)
            table.clear()  # the local table is not measured here; Redis is
        assert store.up
        after = int(admin.info("memory")["used_memory"]) / 1e6
        keys = int(admin.dbsize())
        store.close()
    return before, after, keys


def redis_propagation(rounds: int = 30) -> list[float]:
    """Two hosts (a table and a RedisBlockStore each, synced every SYNC_SECONDS by a thread
    of their own as the daemons do) and a harvester alternating between them, faster
    than a sync: seconds from its (threshold + 1)-th attempt until both tables block it,
    per round."""
    import threading

    from traqmilter.core.attack import AttackTable, client_key
    from traqmilter.core.settings import StateSettings
    from traqmilter.state_redis import RedisBlockStore

    with RedisServer() as server:
        hosts = []
        stop = threading.Event()
        for _ in range(2):
            table = AttackTable(threshold=5, window_seconds=600, block_seconds=3600)
            store = RedisBlockStore(StateSettings(backend="redis", url=server.url), 1000)
            store.share(table, time.time())

            def follow(table: AttackTable = table, store: RedisBlockStore = store) -> None:
                while not stop.wait(store.sync_seconds):
                    store.follow(table, time.time())

            threading.Thread(target=follow, daemon=True).start()
            hosts.append((table, store))
        delays = []
        for n in range(rounds):
            key = client_key(f"192.0.2.{n + 1}", 64)
            assert key is not None
            for attempt in range(6):  # threshold 5: the 6th starts the block
                table, store = hosts[attempt % 2]
                block = table.record_unknown(key, time.time())
                if block is not None:
                    store.save(block)
            started = time.perf_counter()
            while any(t.blocked_until(key, time.time()) is None for t, _ in hosts):
                time.sleep(0.0005)
            delays.append(time.perf_counter() - started)
        stop.set()
        for _, store in hosts:
            store.close()
    return delays


def build_sqlite(directory: str) -> str:
    from traqmilter.directory.sqlite import SqliteDirectory

    path = os.path.join(directory, "directory.sqlite")
    store = SqliteDirectory(path)
    store.bulk_add(mailbox_addresses())
    store.close()
    return path


def receive(end: Connection, process: multiprocessing.process.BaseProcess) -> Any:
    """The next message from a child, or an error if the child died first."""
    while not end.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"{process.name} exited with code {process.exitcode}")
    return end.recv()


def run_line(label: str, r: RunResult) -> str:
    return (
        f"  {label:34} {r.requests_per_second:8.0f} req/s  p50 {r.p50_ms:.3f} ms  "
        f"p99 {r.p99_ms:.3f} ms  server {r.server_us_per_request:4.1f} us/req  "
        f"cpu server {r.server_cpu:.2f} load {r.load_cpu:.2f}  {r.replies}"
    )


def main() -> int:
    global MAILBOXES, MIX
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run every server on uvloop")
    parser.add_argument("--skip-memory", action="store_true", help="skip the AttackTable run")
    parser.add_argument(
        "--quick", action="store_true", help="20,000 requests, 1 round (under a minute)"
    )
    parser.add_argument("--mailboxes", type=int, default=MAILBOXES)
    parser.add_argument("--mix", choices=("default", "unknown", "known"), default="default")
    parser.add_argument("--servers", help="comma-separated servers to run (the floor always)")
    args = parser.parse_args()
    MAILBOXES, MIX = args.mailboxes, args.mix
    os.environ["TRAQMILTER_BENCH_MAILBOXES"], os.environ["TRAQMILTER_BENCH_MIX"] = (
        str(MAILBOXES),
        MIX,
    )
    if args.quick:
        args.requests, args.rounds = min(args.requests, 20_000), 1
    ctx = multiprocessing.get_context("spawn")

    loop_name = "uvloop" if args.uvloop else "asyncio"
    import traqmilter.core.engine

    build = "compiled" if (traqmilter.core.engine.__file__ or "").endswith(".so") else "interpreted"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, loop {loop_name}, "
        f"policyd hot path {build}, "
        f"{args.requests} requests per run over {CONNECTIONS} connections, "
        f"medians of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}"
    )
    if os.getloadavg()[0] > 0.5:
        print("note: other processes are busy on this machine; expect noisy figures")
    costs = hot_path_costs()
    stages = ", ".join(f"{stage} {us:.1f}" for stage, us in costs.items())
    print(f"policyd hot path in one process, us per request: {stages}")

    with tempfile.TemporaryDirectory(prefix="policyd-bench-") as scratch:
        kinds = ["floor", "transport", "policyd-none", "policyd-dict", "policyd-state"]
        os.environ[STATE_DIR_VARIABLE] = scratch
        sqlite_path = ""
        if importlib.util.find_spec(SQLITE_MODULE) is not None:
            started = time.perf_counter()
            sqlite_path = build_sqlite(scratch)
            build_seconds = time.perf_counter() - started
            print(f"SQLite directory: {MAILBOXES} mailboxes built in {build_seconds:.1f}s")
            kinds += ["policyd-sqlite", "policyd-sqlite-compact"]
        else:
            print(f"note: {SQLITE_MODULE} is absent; skipping the SQLite variant")
        wanted = args.servers.split(",") if args.servers else None
        redis = start_redis() if wanted is None or "policyd-redis" in wanted else None
        if redis is not None:
            os.environ[REDIS_URL_VARIABLE] = redis.url
            kinds.append("policyd-redis")
        elif wanted is None:
            print("note: redis-server is absent; skipping the Redis variant")
        if wanted is not None:
            kinds = [k for k in kinds if k == "floor" or k in wanted]
        servers = {kind: start_server(ctx, kind, sqlite_path, args.uvloop) for kind in kinds}
        load_end, load_child_end = ctx.Pipe()
        load = ctx.Process(target=load_main, args=(load_child_end,), daemon=True, name="load")
        load.start()

        scenarios = [(kind, 0) for kind in kinds]
        if "policyd-dict" in kinds:
            scenarios += [("floor", IDLE_CONNECTIONS), ("policyd-dict", IDLE_CONNECTIONS)]
        results: dict[tuple[str, int], list[RunResult]] = {s: [] for s in scenarios}
        run_id = 0
        try:
            for round_number in range(args.rounds):
                order = scenarios if round_number % 2 == 0 else scenarios[::-1]
                for kind, idle in order:
                    run_id += 1
                    process, port = servers[kind]
                    load_end.send((port, process.pid, args.requests, run_id, idle))
                    result: RunResult = receive(load_end, load)
                    results[(kind, idle)].append(result)
                    label = f"round {round_number + 1} {kind} +{idle} idle"
                    print(run_line(label, result), flush=True)
            load_end.send(None)
            load.join(30)
        finally:
            for process, _ in [*servers.values(), (load, 0)]:
                process.terminate()
                process.join(30)
            if redis is not None:
                redis.close()

    def median(kind: str, idle: int, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results[(kind, idle)]))

    print(
        f"\n{'server':22} {'idle':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'best p99':>8}"
        f" {'x floor':>8} {'us/req':>7} {'x floor':>8} {'x transp':>8}"
    )
    for kind, idle in scenarios:
        rps = median(kind, idle, "requests_per_second")
        ratio = rps / median("floor", idle, "requests_per_second")
        p50, p99 = median(kind, idle, "p50_ms"), median(kind, idle, "p99_ms")
        best_p99 = min(r.p99_ms for r in results[(kind, idle)])
        cost = median(kind, idle, "server_us_per_request")
        cost_ratio = median("floor", idle, "server_us_per_request") / cost
        transport = (
            f"{median('transport', idle, 'server_us_per_request') / cost:8.2f}"
            if ("transport", idle) in results
            else f"{'':8}"
        )
        print(
            f"{kind:22} {idle:4} {rps:9.0f} {p50:8.3f} {p99:8.3f} {best_p99:8.3f}"
            f" {ratio:8.2f} {cost:7.1f} {cost_ratio:8.2f} {transport}"
        )
    print(
        "(us/req: server CPU per request; its ratio is the throughput ratio when both "
        "servers, not the load generator, are the limit. x floor: against the goal's "
        "do-nothing policy server; x transp: against the bare transport, for scale. best "
        "p99: the lowest of the rounds; a round whose 'cpu server' is under 0.95 lost its "
        "CPU to another process, and its p99 shows that stall)"
    )
    for kind in ("floor", "policyd-dict") if "policyd-dict" in kinds else ():
        with_idle = median(kind, IDLE_CONNECTIONS, "requests_per_second")
        ratio = with_idle / median(kind, 0, "requests_per_second")
        print(f"{kind}: throughput with {IDLE_CONNECTIONS} idle connections / without: {ratio:.2f}")

    if shutil.which("redis-server") is not None and "policyd-redis" in kinds:
        delays = sorted(redis_propagation())
        print(
            f"Redis, a harvester alternating between two hosts: both block it "
            f"{statistics.median(delays) * 1000:.0f} ms (median) after its 6th attempt, "
            f"at most {delays[-1] * 1000:.0f} ms over {len(delays)} rounds (goal: within 1 s)"
        )
    if not args.skip_memory and shutil.which("redis-server") is not None and wanted is None:
        before, after, keys = redis_memory()
        print(
            f"Redis, 1,000,000 clients with 4 attempts each: used_memory {before:.1f} -> "
            f"{after:.1f} MB ({(after - before) * 1e6 / 1_000_000:.0f} bytes per client, "
            f"{keys} keys; each expires `window` after its newest attempt)"
        )
    if not args.skip_memory:
        for attempts in (5,) if args.quick else (1, 5):
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(
                target=attack_memory_main, args=(attempts, child_end), name="attack-memory"
            )
            process.start()
            tracked, before, after = receive(parent_end, process)
            process.join()
            print(
                f"AttackTable, {tracked} clients with {attempts} attempt(s) each: process RSS "
                f"{after:.0f} MB, of which the table {after - before:.0f} MB (target < 256 MB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
