"""RedisBlockStore against a real redis-server: several hosts (each its own AttackTable and
store, as each MX host's daemon has) count into one window and see one set of blocks; Redis
trouble leaves every host deciding alone, and Redis coming back is merged."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer, free_loopback_port
from traqmilter.core.attack import AttackTable, Block, client_key, recipient_token
from traqmilter.core.limits import ActionLimits
from traqmilter.core.settings import BounceSettings, Config, CreateSettings, StateSettings
from traqmilter.state import StateError
from traqmilter.state_redis import RedisBlockStore

THRESHOLD = 5


class Host:
    """One MX host's view: its table (the engine's) and its store."""

    def __init__(self, settings: StateSettings) -> None:
        self.table = AttackTable(threshold=THRESHOLD, window_seconds=600, block_seconds=3600)
        self.store = RedisBlockStore(settings, max_blocks=1000)
        self.store.share(self.table, time.time())

    def unknown(self, client: str) -> Block | None:
        """One unknown recipient from `client`, as Engine counts it."""
        key = client_key(client, 64)
        assert key is not None
        block = self.table.record_unknown(key, time.time())
        if block is not None:
            self.store.save(block)
        return block

    def blocked(self, client: str) -> bool:
        key = client_key(client, 64)
        assert key is not None
        return self.table.blocked_until(key, time.time()) is not None

    def sync(self) -> None:
        self.store.follow(self.table, time.time())


def _settings(server: RedisServer, prefix: str, **changes: object) -> StateSettings:
    return dataclasses.replace(
        StateSettings(backend="redis", url=server.url, key_prefix=prefix), **changes
    )


@pytest.fixture
def hosts(redis_server: RedisServer, redis_prefix: str) -> Iterator[tuple[Host, Host]]:
    pair = (
        Host(_settings(redis_server, redis_prefix)),
        Host(_settings(redis_server, redis_prefix)),
    )
    yield pair
    for host in pair:
        host.store.close()


def test_a_harvester_spread_over_two_hosts_is_counted_once(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    for n in range(THRESHOLD):
        host = (a, b)[n % 2]
        assert host.unknown("192.0.2.66") is None  # THRESHOLD honest answers in all
        host.sync()
    for host in (a, b):
        host.sync()  # both learn the client is one attempt from a block
        assert not host.blocked("192.0.2.66")
    # The next unknown recipient, on whichever host, starts the block there at once ...
    last = (a, b)[THRESHOLD % 2]
    block = last.unknown("192.0.2.66")
    assert block is not None and block.attempts == THRESHOLD + 1
    # ... and the other host follows at its next sync.
    last.sync()
    for host in (a, b):
        host.sync()
        assert host.blocked("192.0.2.66")
        assert [block.client for block in host.store.load(time.time())] == ["192.0.2.66"]
    assert not a.blocked("192.0.2.67") and not b.blocked("192.0.2.67")


def test_without_a_sync_between_the_total_still_blocks_one_attempt_later(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    for n in range(THRESHOLD + 1):
        assert (a, b)[n % 2].unknown("192.0.2.68") is None  # faster than any sync
    a.sync()
    b.sync()  # the total (THRESHOLD + 1) reaches Redis: the block starts on this sync
    a.sync()
    assert a.blocked("192.0.2.68") and b.blocked("192.0.2.68")


def test_an_ipv6_64_is_one_client_across_hosts(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    for n in range(THRESHOLD + 1):
        (a, b)[n % 2].unknown(f"2001:db8:5:6::{n + 1:x}")
        (a, b)[n % 2].sync()
    b.sync()
    a.sync()
    assert a.blocked("2001:db8:5:6::ffff") and b.blocked("2001:db8:5:6::1")
    assert [x.client for x in a.store.load(time.time())] == ["2001:db8:5:6::/64"]


def test_a_block_one_host_makes_reaches_the_other_and_a_clear_lifts_it_on_both(
    hosts: tuple[Host, Host], redis_server: RedisServer, redis_prefix: str
) -> None:
    a, b = hosts
    for _ in range(THRESHOLD + 1):
        block = a.unknown("198.51.100.9")
    assert block is not None and a.blocked("198.51.100.9")
    a.sync()
    b.sync()
    assert b.blocked("198.51.100.9")
    # `traqmilter blocks clear` on either host: a store of its own.
    cli = RedisBlockStore(_settings(redis_server, redis_prefix), max_blocks=1000)
    assert cli.remove("198.51.100.9") is True
    assert cli.remove("198.51.100.9") is False
    cli.close()
    for host in (a, b):
        host.sync()
        assert not host.blocked("198.51.100.9")
    # A block, then clear --all: lifted on both, counts forgotten on Redis too.
    for _ in range(THRESHOLD + 1):
        b.unknown("198.51.100.10")
    a.unknown("198.51.100.11")
    a.sync()
    b.sync()
    a.sync()
    assert a.blocked("198.51.100.10")
    cli = RedisBlockStore(_settings(redis_server, redis_prefix), max_blocks=1000)
    assert cli.clear() == 1
    assert redis_server.client().keys(f"{redis_prefix}a:*") == []
    cli.close()
    for host in (a, b):
        host.sync()
        assert not host.blocked("198.51.100.10")


def test_counts_and_blocks_expire_by_themselves(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    host = Host(_settings(redis_server, redis_prefix))
    host.unknown("203.0.113.5")
    for _ in range(THRESHOLD + 1):
        host.unknown("203.0.113.6")
    host.sync()
    client = redis_server.client()
    ttl = client.ttl(f"{redis_prefix}a:203.0.113.5")
    assert 0 < ttl <= 600
    assert client.exists(f"{redis_prefix}a:203.0.113.6") == 0  # blocked: counts dropped
    for key in ("blocks", "block-attempts"):
        assert 3500 < client.ttl(f"{redis_prefix}{key}") <= 3602
    packed = client.get(f"{redis_prefix}a:203.0.113.5")
    assert packed is not None and len(packed) == 4  # one 4-byte stamp
    host.store.close()


def test_the_window_slides_on_the_server(redis_server: RedisServer, redis_prefix: str) -> None:
    a, b = Host(_settings(redis_server, redis_prefix)), Host(_settings(redis_server, redis_prefix))
    key = client_key("192.0.2.80", 64)
    assert key is not None
    now = time.time()
    for n in range(THRESHOLD - 1):
        a.table.record_unknown(key, now - 1000 + n)  # long out of the 600 s window
    a.sync()
    b.table.record_unknown(key, now)
    b.sync()
    a.sync()
    assert not a.blocked("192.0.2.80") and not b.blocked("192.0.2.80")
    packed = redis_server.client().get(f"{redis_prefix}a:192.0.2.80")
    assert packed is not None and len(packed) == 4  # the old stamps were dropped
    for store in (a.store, b.store):
        store.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_redis_down_leaves_each_host_deciding_alone_then_merges(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="traqmilter")
    a = Host(_settings(own_server, "p:"))
    b = Host(_settings(own_server, "p:"))
    a.unknown("192.0.2.1")
    a.sync()
    own_server.kill()
    for _ in range(3):
        a.sync()
    assert a.store.up is False
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, "logged once, not at every sync"
    # Alone, a host blocks exactly as one host would: past THRESHOLD of its own attempts.
    for n in range(THRESHOLD):
        assert a.unknown("192.0.2.2") is None, n
    assert not a.blocked("192.0.2.2")
    assert a.unknown("192.0.2.2") is not None and a.blocked("192.0.2.2")
    a.sync()
    # Redis comes back empty: the block made meanwhile is written back; b learns it.
    own_server.start()
    a.sync()
    assert a.store.up is True
    assert any("answers again" in r.getMessage() for r in caplog.records)
    b.sync()
    assert b.blocked("192.0.2.2")
    assert [x.client for x in b.store.load(time.time())] == ["192.0.2.2"]
    for host in (a, b):
        host.store.close()


def test_a_restart_empty_is_noticed_and_every_host_writes_its_blocks_back(
    own_server: RedisServer,
) -> None:
    a = Host(_settings(own_server, "p:"))
    b = Host(_settings(own_server, "p:"))
    for _ in range(THRESHOLD + 1):
        a.unknown("192.0.2.3")
    a.sync()
    b.sync()
    own_server.stop()
    own_server.start()  # empty: no persistence
    b.sync()  # b never saw Redis down, and holds a's block: it writes it back
    assert [x.client for x in b.store.load(time.time())] == ["192.0.2.3"]
    a.sync()
    assert a.blocked("192.0.2.3") and b.blocked("192.0.2.3")
    for host in (a, b):
        host.store.close()


def test_a_slow_redis_holds_up_the_sync_for_at_most_the_timeout(
    own_server: RedisServer,
) -> None:
    a = Host(_settings(own_server, "p:", timeout=0.2))
    a.sync()
    sleeper = own_server.pause(5)
    a.unknown("192.0.2.4")
    a.sync()
    assert sleeper.is_alive(), "the sync gave up within its timeout, not after the sleep"
    assert a.store.up is False
    sleeper.join()
    a.sync()
    assert a.store.up is True
    a.store.close()


def test_a_redis_refusing_writes_is_trouble_too(own_server: RedisServer) -> None:
    a = Host(_settings(own_server, "p:"))
    admin = own_server.client()
    admin.config_set("min-replicas-to-write", 1)  # no replica: every write is refused
    try:
        a.unknown("192.0.2.5")
        a.sync()
        assert a.store.up is False
        with pytest.raises(StateError):
            a.store.remove("192.0.2.5")
    finally:
        admin.config_set("min-replicas-to-write", 0)
    a.sync()
    assert a.store.up is True
    a.store.close()


def test_check_names_an_unreachable_server(own_server: RedisServer) -> None:
    store = RedisBlockStore(_settings(own_server, "p:"), max_blocks=10)
    store.check()
    own_server.stop()
    with pytest.raises(StateError, match="Redis unix://"):
        store.check()
    with pytest.raises(StateError):
        store.load(time.time())
    store.close()


def test_password_from_a_file(own_server: RedisServer) -> None:
    admin = own_server.client()
    admin.config_set("requirepass", "s3cret")
    try:
        secret = own_server.dir / "password"
        secret.write_text("s3cret\n")
        good = RedisBlockStore(
            _settings(own_server, "p:", password_file=str(secret)), max_blocks=10
        )
        good.check()
        good.close()
        anonymous = RedisBlockStore(_settings(own_server, "p:"), max_blocks=10)
        with pytest.raises(StateError):
            anonymous.check()
        anonymous.close()
    finally:
        own_server.client(password="s3cret").config_set("requirepass", "")


def test_bounce_and_create_rates_and_the_created_total_are_shared(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    config = Config(
        bounce=BounceSettings(rate_per_sender=3, rate_per_client=100),
        create=CreateSettings(rate_per_hour=4, max_total=6),
    )
    limits_a, limits_b = ActionLimits(config), ActionLimits(config, created_total=5)
    a, b = Host(_settings(redis_server, redis_prefix)), Host(_settings(redis_server, redis_prefix))
    a.store.share_limits(limits_a)
    b.store.share_limits(limits_b)
    now = time.time()
    limits_a.record_dsn("<Spammer@Example.net>", "192.0.2.9", now)
    limits_a.record_dsn("spammer@example.net", "192.0.2.9", now)
    a.sync()
    assert limits_b.dsn_allowed("spammer@example.net", "192.0.2.9", now)  # b never saw it
    limits_b.record_dsn("spammer@example.net", "192.0.2.10", now)
    b.sync()  # b sends its own and takes in a's: 3 of 3
    assert not limits_b.dsn_allowed("spammer@example.net", "192.0.2.11", now)
    assert limits_b.dsn_allowed("other@example.net", "192.0.2.11", now)
    # Creation: the hourly window and the total are every host's.
    for _ in range(3):
        limits_a.record_create(now)
    a.sync()
    b.sync()  # b takes in the create window even without creating anything
    assert limits_b.create_allowed(now)
    limits_b.record_create(now)
    b.sync()
    a.sync()
    assert not limits_a.create_allowed(now) and not limits_b.create_allowed(now)
    # Every host's creations (4) on a, b's own directory count (5 + 1) on b: a host takes
    # the larger of the two, never lowering its own.
    assert (limits_a.created_total, limits_b.created_total) == (4, 6)
    assert limits_b.total_reached() and not limits_a.total_reached()
    for host in (a, b):
        host.store.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """rediss:// with the TLS files passed through: the server checks the client's
    certificate, the client the server's (a private CA for 127.0.0.1)."""
    ca_key, ca, ext = tmp_path / "ca.key", tmp_path / "ca.pem", tmp_path / "san.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=test CA", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    for name in ("server", "client"):
        key, csr = tmp_path / f"{name}.key", tmp_path / f"{name}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(key), "-out", str(csr))  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                 "-out", str(tmp_path / f"{name}.pem"))  # fmt: skip
    port = free_loopback_port()
    tls = (
        "--tls-port", str(port),
        "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with RedisServer(extra=tls) as server:
        url = f"rediss://127.0.0.1:{port}/0"
        settings = _settings(server, "tls:", url=url, tls_ca_file=str(ca))
        with_cert = dataclasses.replace(
            settings,
            tls_cert_file=str(tmp_path / "client.pem"),
            tls_key_file=str(tmp_path / "client.key"),
        )
        host = Host(with_cert)
        for _ in range(THRESHOLD + 1):
            host.unknown("192.0.2.90")
        host.sync()
        assert host.store.up
        assert [b.client for b in host.store.load(time.time())] == ["192.0.2.90"]
        host.store.close()
        no_cert = RedisBlockStore(settings, max_blocks=10)  # the server wants one
        with pytest.raises(StateError):
            no_cert.check()
        no_cert.close()


# --------------------------------------------------------------------------- deferrals

ZED = recipient_token("zed@example.org")


def test_a_recipient_deferred_on_one_host_is_excused_once_on_the_other(
    hosts: tuple[Host, Host], redis_server: RedisServer, redis_prefix: str
) -> None:
    """The milter of host a answers 452 and the client's retry reaches host b (another MX,
    or policyd of a): after a sync each, b does not count it; the deferred attempt did."""
    a, b = hosts
    key = client_key("192.0.2.90", 64)
    assert key is not None
    now = time.time()
    a.table.record_unknown(key, now, ZED)  # the 452 attempt, counted
    a.table.note_deferred(key, ZED, now)
    a.sync()
    b.sync()
    assert b.table.record_unknown(key, now + 1, ZED) is None  # the retry: excused
    assert b.table.record_unknown(key, now + 2, ZED) is None  # a second one counts
    b.sync()
    a.sync()
    for n in range(THRESHOLD - 2):  # 2 counted so far, on both hosts together
        assert a.unknown("192.0.2.90") is None, n
        a.sync()
    b.sync()
    assert not a.blocked("192.0.2.90") and not b.blocked("192.0.2.90")
    # threshold + 1 on the two hosts, the 452 and its retry as one: the block starts
    assert b.unknown("192.0.2.90") is not None
    # Redis holds a digest, never the address; the set ends with the window.
    client = redis_server.client()
    members = client.zrange(f"{redis_prefix}deferred", 0, -1)
    assert members == [f"192.0.2.90 {ZED}".encode()]
    assert b"zed" not in members[0]
    assert 0 < client.ttl(f"{redis_prefix}deferred") <= 601


def test_a_sync_brings_in_new_deferrals_only_and_keeps_a_used_excuse_used(
    hosts: tuple[Host, Host], redis_server: RedisServer, redis_prefix: str
) -> None:
    a, b = hosts
    now = time.time()
    a.table.note_deferred(7, ZED, now)
    a.sync()
    b.sync()
    assert b.table.record_unknown(7, now, ZED) is None
    assert len(b.table) == 0  # excused: nothing counted
    # Another deferral of the same recipient while the first is in force changes nothing,
    # on either host, however often they sync.
    a.table.note_deferred(7, ZED, now + 1)
    for _ in range(3):
        a.sync()
        b.sync()
    b.table.record_unknown(7, now + 2, ZED)
    assert len(b.table) == 1
    # What is not a member this code wrote is skipped, not trusted.
    redis_server.client().zadd(
        f"{redis_prefix}deferred", {"not-an-address x": now + 600, "192.0.2.1 short": now + 600}
    )
    b.sync()
    assert b.table.record_unknown(client_key("192.0.2.1", 64) or 0, now, "short") is None
    assert len(b.table) == 2  # counted: the bad member excused nothing
