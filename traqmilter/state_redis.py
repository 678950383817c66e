"""Dictionary-attack state shared by several MX hosts on one Redis server (state.backend:
redis; docs/scale-out.md has the topology and the design note).

Decisions never wait for Redis. Each daemon keeps deciding with its own AttackTable, as on
one host; the table's journal lists every attempt it counted, and follow() -- called every
SYNC_SECONDS by the daemon's background task (policyd) or thread (milter) -- sends them to
Redis in one pipeline, where a Lua script merges them into the client's shared window
atomically. When the shared count reaches the table's own rule (AttackTable.blocks_at),
the host that sent the attempt starts the block, here and on Redis; the other hosts see
the generation move on their next sync and load the blocks. When it is one attempt short,
the client is marked hot and every host takes its shared window into its table
(AttackTable.adopt), so the next attempt is judged on the total wherever it lands. So a
block set on one host is honoured on every other within about two SYNC_SECONDS, and a
harvester that spreads its guesses over the hosts is counted once.

Keys, all under state.key_prefix (P):
  P a:CLIENT          the client's newest attempt times in the window, 4-byte big-endian
                      seconds, newest first, at most AttackTable.stamps_kept of them;
                      expires `window` after the newest (so an idle client costs nothing)
  P blocks            sorted set CLIENT -> until; ended blocks are dropped by every write,
                      and beyond max_clients those that end first (the local table's rule)
  P block-attempts    hash CLIENT -> attempts that started the block (for `blocks list`)
  P generation        counter moved by every change of the blocks: hosts poll it
  P epoch             a token written once and never expiring: when it is gone, the
                      server lost its data (restarted empty, flushed) and every host
                      writes back the blocks it holds
  P hot               sorted set CLIENT -> when its window ends, of clients one attempt
                      from a block; P hot-generation moves with it
  P r:NAME:KEY        the milter's DSN and create windows (ActionLimits), packed alike;
                      P created-total counts the mailboxes `create` made on every host
  P deferred          sorted set "CLIENT TOKEN" -> until: recipients a milter deferred to
                      a separate transaction (core.attack.RetryExcuses; TOKEN is the
                      recipient's digest), at most MAX_DEFERRED_RETRIES
  P d:PERIOD NOTIFY   hash of one period's digest counts for one notify address (the
                      two joined by a NUL): field LIST NUL DOMAIN NUL KEY -> count, and
                      NUL LIST NUL DOMAIN -> how many keys the list names (at most
                      max_tracked); expires when an unsent digest is given up
  P digests           sorted set PERIOD NUL NOTIFY -> PERIOD: the hashes not yet sent
  P digest-claim      the host sending the digests now (SET NX with an expiry)
CLIENT is Block.client's text ("192.0.2.1", "2001:db8:1:2::/64").

Trouble (Redis down, slow, restarted empty, refusing writes): the exchange fails within
state.timeout, the store logs once and reports up=False (metric state_backend_up), and
the local table goes on deciding alone -- it never lets more through and never blocks
more than one host would. Attempts of the failed batch are lost; blocks made meanwhile are
kept and written back when Redis answers again, and the blocks there are loaded. Each sync
tries again, so reconnecting needs nobody.

SECURITY: the password is read from a file (state.password_file), never from the URL or
the log. Redis holds client addresses and counts (a deferred recipient is a digest), and
-- for the administrator's digests, only for domains with a `notify` address, until the
digest is sent -- the unknown recipient addresses used, the new mailboxes and the
envelope senders.

BUGS: hosts' clocks must agree (NTP): attempt times and block ends are each host's wall
clock. Attempts counted on two hosts within one sync of each other may both be answered
before either host sees the total (the count itself is exact; the block comes one sync
later). A deferred recipient reaches the other hosts (and policyd, from the milter) within
about two SYNC_SECONDS: a retry sooner than that counts again. An excuse is used up where
it is used, so each host may excuse one retry of a deferral (after its one counted attempt).
Every change of the blocks makes each host load them all: cheap for thousands of blocks,
a growing cost per sync when hundreds of thousands are in force at once.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from traqmilter.core.attack import (
    MAX_DEFERRED_RETRIES,
    AttackTable,
    Block,
    DeferredRetries,
    key_text,
    text_key,
)
from traqmilter.core.digest_counts import DigestRow
from traqmilter.core.limits import ActionLimits
from traqmilter.core.settings import StateSettings
from traqmilter.state import StateError

log = logging.getLogger("traqmilter")

SYNC_SECONDS = 0.1
"""How often a daemon sends its counts and looks for other hosts' blocks."""
STAMP_BYTES = 4
MAX_JOURNAL = 100_000
"""Attempts one sync sends at most; beyond (a long outage, a flood) the oldest are dropped."""
REMOVE_BATCH = 500
DEFERRED_SLACK_SECONDS = 60
"""A sync reads the deferrals made since the previous one began, less this (other hosts'
clocks and late writes); those it has already are left as they are."""

# Merge new event times into a key's window. ARGV: newest stamp, window, how many stamps
# matter, then the new stamps (none: just read). Returns the packed window (4-byte
# big-endian seconds, newest first; its length / 4 is the count). Atomic (a script).
_COUNT = """
local newest, window, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local stamps = {}
local packed = redis.call('GET', KEYS[1])
if packed then
  for i = 1, #packed - 3, 4 do stamps[#stamps + 1] = struct.unpack('>I4', packed, i) end
end
for i = 4, #ARGV do stamps[#stamps + 1] = tonumber(ARGV[i]) end
table.sort(stamps, function(a, b) return a > b end)
local horizon = newest - window
local kept = {}
for _, t in ipairs(stamps) do
  if t > horizon and #kept < keep then kept[#kept + 1] = struct.pack('>I4', t) end
end
if #kept == 0 then
  redis.call('DEL', KEYS[1])
  return ''
end
packed = table.concat(kept)
if #ARGV > 3 then redis.call('SET', KEYS[1], packed, 'EX', window) end
return packed
"""

# Record a block unless one that ends later is there. KEYS: blocks, block-attempts,
# generation, the client's attempts. ARGV: client, until, attempts, now, max blocks.
_SAVE = """
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[4])
if old and tonumber(old) >= tonumber(ARGV[2]) then return 0 end
local ended = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, 1000)
for _, client in ipairs(ended) do
  redis.call('ZREM', KEYS[1], client)
  redis.call('HDEL', KEYS[2], client)
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if excess > 0 then
  local dropped = redis.call('ZPOPMIN', KEYS[1], excess)
  for i = 1, #dropped, 2 do redis.call('HDEL', KEYS[2], dropped[i]) end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local expires = math.ceil(tonumber(last[2])) + 1
redis.call('EXPIREAT', KEYS[1], expires)
redis.call('EXPIREAT', KEYS[2], expires)
redis.call('INCR', KEYS[3])
return 1
"""

# Lift one block and forget the client's counts. KEYS as _SAVE; ARGV: client.
_REMOVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('INCR', KEYS[3])
return removed
"""

# Add digest counts to one period's hash (KEYS[1]) and list it in P digests (KEYS[2]).
# ARGV: max_tracked, expires (epoch seconds), period, the hash's member name, then
# triples LIST NUL DOMAIN, KEY ('' = others), COUNT. A new key beyond max_tracked in its
# list is added to the list's others instead (core.digest_counts.DigestRow).
_ADD_DIGEST = """
local cap = tonumber(ARGV[1])
for i = 5, #ARGV, 3 do
  local list, key = ARGV[i], ARGV[i + 1]
  local field = list .. '\\0' .. key
  if key ~= '' and redis.call('HEXISTS', KEYS[1], field) == 0 then
    if tonumber(redis.call('HGET', KEYS[1], '\\0' .. list) or '0') < cap then
      redis.call('HINCRBY', KEYS[1], '\\0' .. list, 1)
    else
      field = list .. '\\0'
    end
  end
  redis.call('HINCRBY', KEYS[1], field, tonumber(ARGV[i + 2]))
end
redis.call('EXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# Claim the digests for ARGV[1] for ARGV[2] milliseconds unless another holder has them.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_ERRORS = (redis.RedisError, OSError)


class SharedRetries:
    """RetryExcuses for several hosts: decided from this host's own DeferredRetries, like
    every count here (decisions never wait for Redis); the deferrals it makes are queued
    for the next sync, which also brings in the other hosts'. Thread-safe."""

    def __init__(self, max_entries: int = MAX_DEFERRED_RETRIES) -> None:
        self.local = DeferredRetries(max_entries)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, float]] = []

    def defer(self, key: int, recipient: str, until: float, now: float) -> None:
        with self._lock:
            self.local.defer(key, recipient, until, now)
            if len(self._pending) < MAX_JOURNAL:
                self._pending.append((key, recipient, until))

    def excuse(self, key: int, recipient: str, now: float) -> bool:
        with self._lock:
            return self.local.excuse(key, recipient, now)

    def take(self) -> list[tuple[int, str, float]]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def learn(self, deferrals: list[tuple[int, str, float]], now: float) -> None:
        """Other hosts' deferrals; one this host has (perhaps used) stays as it is."""
        with self._lock:
            for key, recipient, until in deferrals:
                self.local.defer(key, recipient, until, now)


def _unpack(packed: bytes) -> list[int]:
    return [
        int.from_bytes(packed[i : i + STAMP_BYTES], "big")
        for i in range(0, len(packed), STAMP_BYTES)
    ]


def read_password(path: str) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise StateError(f"state.password_file: {path}: {exc.strerror or exc}") from None


def connect(settings: StateSettings) -> redis.Redis:
    """A client for state.url with the settings' timeout, credentials and TLS files."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry_on_timeout": False,
        # No retries inside a call (redis-py's default backs off for seconds): the next
        # sync is the retry, and trouble must show at once.
        "retry": Retry(NoBackoff(), 0),
        "password": read_password(settings.password_file),
        "username": settings.username or None,
    }
    if settings.url.startswith("rediss://"):
        options.update(
            ssl_ca_certs=settings.tls_ca_file or None,
            ssl_certfile=settings.tls_cert_file or None,
            ssl_keyfile=settings.tls_key_file or None,
        )
    try:
        return redis.Redis.from_url(settings.url, **options)
    except ValueError as exc:
        raise StateError(f"state.url: {exc}") from None


class RedisBlockStore:
    """Blocks and counts on Redis, with the local table deciding (see the module doc).
    Thread-safe: follow() runs one at a time; save() only queues."""

    backend = "redis"
    sync_seconds = SYNC_SECONDS

    def __init__(self, settings: StateSettings, max_blocks: int) -> None:
        self.settings = settings
        self.max_blocks = max_blocks
        self.redis = connect(settings)
        prefix = settings.key_prefix
        self._attempts_prefix = prefix + "a:"
        self._blocks_keys = [prefix + "blocks", prefix + "block-attempts", prefix + "generation"]
        self._epoch_key = prefix + "epoch"
        self._rates_prefix = prefix + "r:"
        self._created_key = prefix + "created-total"
        self._hot_key = prefix + "hot"
        self._hot_generation_key = prefix + "hot-generation"
        self._deferred_key = prefix + "deferred"
        self.retries = SharedRetries()
        self._deferred_read = 0.0  # when the last read of the deferrals began
        self._hot_generation: bytes | None = None
        self._limits: ActionLimits | None = None
        self._count = self.redis.register_script(_COUNT)
        self._save = self.redis.register_script(_SAVE)
        self._remove = self.redis.register_script(_REMOVE)
        self._digest_prefix = prefix + "d:"
        self._digests_key = prefix + "digests"
        self._digest_claim_key = prefix + "digest-claim"
        self._add_digest = self.redis.register_script(_ADD_DIGEST)
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)
        self._lock = threading.Lock()  # one sync at a time
        self._pending: dict[str, Block] = {}  # blocks not yet written to Redis
        self._pending_lock = threading.Lock()
        self._remote: set[str] = set()  # clients blocked on Redis at the last load
        self._epoch: bytes | None = None
        self._generation: bytes | None = None
        self._loaded = False  # whether the blocks of _generation are in the table
        self._up = True
        self.last_sync = 0.0  # when the last sync that worked started (wall clock)
        self.where = settings.url.partition("?")[0]

    @property
    def up(self) -> bool:
        return self._up

    def _keys(self, client: str) -> list[str]:
        return [*self._blocks_keys, self._attempts_prefix + client]

    # --- the daemons' side

    def share(self, table: AttackTable, now: float) -> None:
        table.journal = []
        table.retries = self.retries
        self.follow(table, now)

    def share_limits(self, limits: ActionLimits) -> None:
        """Share the bounce and create rates and the created total too (the milter's)."""
        limits.journal = []
        self._limits = limits

    def save(self, block: Block) -> None:
        """Queue a block this host made; the next sync writes it (and keeps it queued
        while Redis is away)."""
        with self._pending_lock:
            self._pending[block.client] = block
            if len(self._pending) > self.max_blocks:
                del self._pending[min(self._pending.values(), key=lambda b: b.until).client]

    def follow(
        self, table: AttackTable, now: float, guard: AbstractContextManager[object] | None = None
    ) -> bool:
        """One sync (module doc); whether it loaded blocks into `table`."""
        with self._lock:
            started = time.time()
            loaded = False
            try:
                loaded = self._exchange(table, now, guard or contextlib.nullcontext())
                self._exchange_deferrals(table, now)
                if self._limits is not None:
                    self._exchange_limits(self._limits, now, guard or contextlib.nullcontext())
            except _ERRORS as exc:
                self._went_down(exc)
            else:
                if not self._up:
                    log.info("state: Redis %s answers again; blocks merged", self.where)
                self._up = True
                self.last_sync = started
            return loaded

    def _went_down(self, exc: BaseException) -> None:
        if self._up:
            log.warning(
                "state: Redis %s failed (%s): deciding with this host's table alone until "
                "it answers again",
                self.where,
                exc,
            )
        self._up = False
        self._loaded = False  # load everything once it is back
        self._hot_generation = None

    def _exchange(
        self, table: AttackTable, now: float, guard: AbstractContextManager[object]
    ) -> bool:
        """One round: counts out, blocks both ways; whether blocks were loaded. The table
        is touched only inside `guard` (the milter's decide lock), never while waiting
        for Redis."""
        loaded = False
        with guard:
            journal = table.journal
            batch: list[tuple[int, int]] = []
            if journal is not None:
                taken = len(journal)
                batch = journal[max(0, taken - MAX_JOURNAL) : taken]
                del journal[:taken]
            window, kept = int(table.window_seconds), table.stamps_kept
            prefix, block_seconds = table.ipv6_prefix, table.block_seconds
        by_client: dict[int, list[int]] = {}
        for key, stamp in batch:
            by_client.setdefault(key, []).append(stamp)
        clients = list(by_client)
        pipe = self.redis.pipeline(transaction=False)
        for key in clients:
            stamps = by_client[key]
            client = key_text(key, prefix)
            self._count(
                keys=[self._attempts_prefix + client],
                args=[max(stamps), window, kept, *stamps],
                client=pipe,
            )
        pipe.get(self._epoch_key)
        pipe.get(self._blocks_keys[2])
        pipe.get(self._hot_generation_key)
        replies = pipe.execute()
        epoch, generation, hot_generation = replies[-3:]
        hot: dict[str, float] = {}
        with guard:
            for key, packed in zip(clients, replies, strict=False):
                count = len(packed) // STAMP_BYTES
                if table.blocks_at(count) and table.blocked_until(key, now) is None:
                    block = Block(key_text(key, prefix), now + block_seconds, count)
                    table.restore([block], now)  # this host honours it at once
                    self.save(block)
                elif table.blocks_at(count + 1):  # one more attempt, on any host, blocks
                    table.adopt(key, _unpack(packed), now)
                    hot[key_text(key, prefix)] = max(by_client[key]) + window
        if hot:
            self._mark_hot(hot, now, window)
        if epoch is None or epoch != self._epoch:
            # First contact, or the server lost its data: what this host holds goes back.
            self._epoch = self._claim_epoch(epoch)
            with guard:
                held = table.blocks(now)
            for block in held:
                self.save(block)
            self._loaded = False
        if self._write_pending(now) or not self._loaded or generation != self._generation:
            self._generation = cast("bytes | None", self.redis.get(self._blocks_keys[2]))
            stored = self.load(now)
            with guard:
                self._follow(table, stored, now)
            self._loaded = loaded = True
        if hot or hot_generation != self._hot_generation:
            self._hot_generation = hot_generation
            self._adopt_hot(table, now, prefix, guard)
        return loaded

    def _exchange_deferrals(self, table: AttackTable, now: float) -> None:
        """Send this host's deferred recipients, bring in every host's made since the last
        read (SharedRetries keeps its own state of those it has)."""
        pending = self.retries.take()
        prefix, window = table.ipv6_prefix, int(table.window_seconds)
        since = now  # the first read: every deferral in force
        if self._deferred_read:  # then those made since the last read began, less slack
            since = max(now, self._deferred_read - DEFERRED_SLACK_SECONDS + window)
        started = time.time()
        key = self._deferred_key
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", now)
        if pending:
            members = {f"{key_text(k, prefix)} {token}": until for k, token, until in pending}
            pipe.zadd(key, members, nx=True)  # a deferral in force stays the one it is
            pipe.zremrangebyrank(key, 0, -MAX_DEFERRED_RETRIES - 1)
            pipe.expire(key, window + 1)
        pipe.zrangebyscore(key, f"({since}", "+inf", withscores=True)
        rows = cast("list[tuple[bytes, float]]", pipe.execute()[-1])
        self._deferred_read = started
        learned = []
        for member, until in rows:
            client, _, token = member.decode("ascii", "replace").partition(" ")
            k = text_key(client, prefix)
            if k is not None and len(token) == 32:
                learned.append((k, token, float(until)))
        self.retries.learn(learned, now)

    def _mark_hot(self, hot: dict[str, float], now: float, window: int) -> None:
        """Tell every host which clients are one attempt from a block (their windows are
        their a: keys), so that the next attempt is judged on the total wherever it lands."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self._hot_key, hot)
        pipe.zremrangebyscore(self._hot_key, "-inf", now)
        pipe.expire(self._hot_key, window)
        pipe.incr(self._hot_generation_key)
        pipe.execute()

    def _adopt_hot(
        self, table: AttackTable, now: float, prefix: int, guard: AbstractContextManager[object]
    ) -> None:
        clients = [
            client.decode()
            for client in cast("list[bytes]", self.redis.zrangebyscore(self._hot_key, now, "+inf"))
        ]
        if not clients:
            return
        windows = cast(
            "list[bytes | None]",
            self.redis.mget([self._attempts_prefix + client for client in clients]),
        )
        with guard:
            for client, packed in zip(clients, windows, strict=True):
                key = text_key(client, prefix)
                if packed and key is not None:
                    table.adopt(key, _unpack(packed), now)

    def _exchange_limits(
        self, limits: ActionLimits, now: float, guard: AbstractContextManager[object]
    ) -> None:
        """Send this host's DSN and create events; take in every host's windows for the
        keys sent (and always the create window) and the created total."""
        with guard:
            journal = limits.journal or []
            taken = len(journal)
            batch = journal[max(0, taken - MAX_JOURNAL) : taken]
            del journal[:taken]
            counters = limits.counters()
            shape = {name: (int(c.window_seconds), c.limit) for name, c in counters.items()}
            prefix = limits.ipv6_prefix
        events: dict[tuple[str, str | int], list[int]] = {("create", limits.CREATE_KEY): []}
        for name, key, stamp in batch:
            events.setdefault((name, key), []).append(int(stamp))
        pipe = self.redis.pipeline(transaction=False)
        for (name, key), stamps in events.items():
            text = key_text(key, prefix) if isinstance(key, int) else key
            window, keep = shape[name]
            self._count(
                keys=[f"{self._rates_prefix}{name}:{text}"],
                args=[max(stamps, default=int(now)), window, keep, *stamps],
                client=pipe,
            )
        created = sum(1 for name, _key, _stamp in batch if name == "create")
        pipe.incrby(self._created_key, created)
        replies = pipe.execute()
        with guard:
            for (name, key), packed in zip(events, replies, strict=False):
                counters[name].adopt(key, _unpack(packed), now)
            limits.adopt_total(int(replies[-1]))

    def _claim_epoch(self, seen: bytes | None) -> bytes:
        if seen is None:
            self.redis.set(self._epoch_key, secrets.token_hex(8), nx=True)
        value = cast("bytes | None", self.redis.get(self._epoch_key))
        if value is None:
            raise redis.ResponseError("epoch key vanished")
        return value

    def _write_pending(self, now: float) -> bool:
        """Write the queued blocks; whether there were any."""
        with self._pending_lock:
            pending = list(self._pending.values())
        if not pending:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for block in pending:
            self._save(
                keys=self._keys(block.client),
                args=[block.client, block.until, block.attempts, now, self.max_blocks],
                client=pipe,
            )
        pipe.execute()
        with self._pending_lock:
            for block in pending:
                if self._pending.get(block.client) is block:
                    del self._pending[block.client]
        return True

    def _follow(self, table: AttackTable, stored: list[Block], now: float) -> None:
        """Lift what was lifted on Redis since the last load, restore what is there."""
        present = {block.client for block in stored}
        with self._pending_lock:
            queued = set(self._pending)
        for client in self._remote - present - queued:
            table.clear(client)
        table.restore(stored, now)
        self._remote = present

    # --- the digest counts (traqmilter.state.DigestStore)

    def add_digest(self, rows: Sequence[DigestRow], *, max_tracked: int, expires: float) -> None:
        """One script per period and notify address, in one pipeline."""
        buckets: dict[tuple[int, str], list[str | int]] = {}
        for row in rows:
            args = buckets.setdefault((row.period, row.notify), [])
            args += [f"{row.list}\0{row.domain}", row.key.replace("\0", ""), row.count]
        try:
            pipe = self.redis.pipeline(transaction=True)  # all of the batch, or none
            for (period, notify), triples in buckets.items():
                member = f"{period}\0{notify}"
                self._add_digest(
                    keys=[self._digest_prefix + member, self._digests_key],
                    args=[max_tracked, int(expires) + 1, period, member, *triples],
                    client=pipe,
                )
            pipe.execute()
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    def pending_digests(self, before: int, now: float) -> list[DigestRow]:
        try:
            members = cast(
                "list[bytes]", self.redis.zrangebyscore(self._digests_key, "-inf", f"({before}")
            )
            pipe = self.redis.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self._digest_prefix.encode() + member)
            hashes = cast("list[dict[bytes, bytes]]", pipe.execute()) if members else []
            gone = [member for member, fields in zip(members, hashes, strict=True) if not fields]
            if gone:  # expired unsent (core.digest: given up)
                self.redis.zrem(self._digests_key, *gone)
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None
        rows = []
        for member, fields in zip(members, hashes, strict=True):
            period, _, notify = member.decode("utf-8", "replace").partition("\0")
            for field, count in fields.items():
                name, domain, key = field.decode("utf-8", "replace").split("\0", 2)
                if name:  # not a list's key count
                    rows.append(DigestRow(int(period), notify, domain, name, key, int(count)))
        return sorted(rows)  # as SQLite's

    def remove_digest(self, notify: str, periods: Sequence[int]) -> None:
        members = [f"{period}\0{notify}" for period in periods]
        if not members:
            return
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(*(self._digest_prefix + member for member in members))
            pipe.zrem(self._digests_key, *members)
            pipe.execute()
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    def claim_digests(self, holder: str, seconds: float, now: float) -> bool:
        """Redis's own clock ends the claim (SET PX), whatever the hosts' clocks say."""
        try:
            return bool(
                self._claim(
                    keys=[self._digest_claim_key], args=[holder, max(1, int(seconds * 1000))]
                )
            )
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    def release_digests(self, holder: str) -> None:
        try:
            self._release(keys=[self._digest_claim_key], args=[holder])
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    # --- the CLI's side (and the loads above)

    def check(self) -> None:
        try:
            self.redis.ping()
            self.redis.get(self._epoch_key)
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    def load(self, now: float) -> list[Block]:
        """Blocks in force at `now`, the one that ends first first."""
        try:
            rows = cast(
                "list[tuple[bytes, float]]",
                self.redis.zrangebyscore(self._blocks_keys[0], f"({now}", "+inf", withscores=True),
            )
            attempts = (
                self.redis.hmget(self._blocks_keys[1], [client for client, _ in rows])
                if rows
                else []
            )
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None
        return [
            Block(client.decode(), float(until), int(count or 0))
            for (client, until), count in zip(rows, attempts, strict=True)
        ]

    def remove(self, client: str) -> bool:
        try:
            return bool(self._remove(keys=self._keys(client), args=[client]))
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None

    def clear(self) -> int:
        """Lift every block and forget every count (on every host at its next sync)."""
        try:
            lifted = int(self.redis.zcard(self._blocks_keys[0]))
            batch: list[bytes] = []
            for key in self.redis.scan_iter(match=self._attempts_prefix + "*", count=1000):
                batch.append(key)
                if len(batch) >= REMOVE_BATCH:
                    self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                self.redis.unlink(*batch)
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self._blocks_keys[0], self._blocks_keys[1])
            pipe.incr(self._blocks_keys[2])
            pipe.execute()
        except _ERRORS as exc:
            raise StateError(f"state: Redis {self.where}: {exc}") from None
        return lifted

    def close(self) -> None:
        self.redis.close()
