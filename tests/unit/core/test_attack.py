"""Dictionary-attack arithmetic: sliding window, blocks, bounds, IPv6 networks."""

from traqmilter.core.attack import AttackTable, Block, client_key, key_text


def table(**kw: int) -> AttackTable:
    args = {
        "threshold": 3,
        "window_seconds": 600,
        "block_seconds": 3600,
        "ipv6_prefix": 64,
        "max_clients": 1000,
    } | kw
    return AttackTable(**args)  # type: ignore[arg-type]


def test_threshold_within_window_blocks() -> None:
    t = table()
    key = client_key("192.0.2.1", 64)
    assert key is not None
    assert t.record_unknown(key, 1000) is None
    assert t.record_unknown(key, 1100) is None
    block = t.record_unknown(key, 1200)
    assert block == Block("192.0.2.1", 1200 + 3600, 3)
    assert t.blocked_until(key, 1201) == 4800
    assert t.blocked_until(key, 4800) is None  # expired exactly at `until`


def test_attempts_outside_window_do_not_count() -> None:
    t = table()
    key = client_key("192.0.2.1", 64)
    assert key is not None
    for now in (0, 700, 1400, 2100):  # each 700 s apart: never 3 within 600 s
        assert t.record_unknown(key, now) is None
    assert t.blocked_until(key, 2100) is None


def test_ipv6_counted_per_prefix() -> None:
    a = client_key("2001:db8:1:2::1", 64)
    b = client_key("2001:db8:1:2:ffff::9", 64)
    c = client_key("2001:db8:1:3::1", 64)
    assert a == b != c
    assert a is not None and key_text(a, 64) == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7", 64) == client_key("192.0.2.7", 64)
    assert client_key("unknown", 64) is None


def test_memory_bound_evicts_least_recent_but_keeps_blocks() -> None:
    t = table(max_clients=1000, threshold=2)
    first = client_key("10.0.0.1", 64)
    assert first is not None
    t.record_unknown(first, 0)
    t.record_unknown(first, 1)  # blocked
    for i in range(5000):
        t.record_unknown(client_key(f"10.1.{i // 256}.{i % 256}", 64) or 0, 2)
    assert len(t) <= 1000
    assert t.blocked_until(first, 3) is not None


def test_restore_and_clear() -> None:
    t = table()
    t.restore(
        [Block("192.0.2.9", 5000, 5), Block("2001:db8::/64", 10, 5), Block("junk", 9e9, 1)], now=100
    )
    assert [b.client for b in t.blocks(100)] == ["192.0.2.9"]
    assert t.clear("192.0.2.9") == 1
    assert t.blocks(100) == []
    assert t.clear("not-an-ip") == 0
