"""Dictionary-attack arithmetic: sliding window, blocks, bounds, IPv6 networks."""

import pytest

from traqmilter.core.attack import MAX_WINDOW_SECONDS, AttackTable, Block, client_key, key_text


def table(**kw: int) -> AttackTable:
    args = {
        "threshold": 3,
        "window_seconds": 600,
        "block_seconds": 3600,
        "ipv6_prefix": 64,
        "max_clients": 1000,
    } | kw
    return AttackTable(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 50])
def test_threshold_attempts_are_allowed_and_the_next_one_blocks(threshold: int) -> None:
    """threshold: N means what Postfix's own limits mean: N unknown recipients within the
    window get their honest answer; the N+1-th starts the block."""
    t = table(threshold=threshold)
    for attempt in range(threshold):
        assert t.record_unknown(7, 1000 + attempt) is None, attempt + 1
        assert t.blocked_until(7, 1000 + attempt) is None
    now = 1000 + threshold
    assert t.record_unknown(7, now) == Block("0.0.0.7", now + 3600, threshold + 1)
    assert t.blocked_until(7, now) == now + 3600


def test_threshold_within_window_blocks() -> None:
    t = table()
    key = client_key("192.0.2.1", 64)
    assert key is not None
    assert t.record_unknown(key, 1000) is None
    assert t.record_unknown(key, 1100) is None
    assert t.record_unknown(key, 1150) is None
    block = t.record_unknown(key, 1200)
    assert block == Block("192.0.2.1", 1200 + 3600, 4)
    assert t.blocked_until(key, 1201) == 4800
    assert t.blocked_until(key, 4800) is None  # expired exactly at `until`


def test_attempts_outside_window_do_not_count() -> None:
    t = table()
    key = client_key("192.0.2.1", 64)
    assert key is not None
    for now in (0, 700, 1400, 2100, 2800):  # each 700 s apart: never 4 within 600 s
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
    t.record_unknown(first, 1)
    assert t.record_unknown(first, 1) is not None  # blocked
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


def test_packed_attempts_count_exactly_at_the_window_edge() -> None:
    """Attempt times are packed into one int: ages up to the window survive exactly."""
    window = 7 * 86400  # the largest window the config allows
    t = table(threshold=4, window_seconds=window)
    key = 1
    start = 1_700_000_000
    assert t.record_unknown(key, start) is None
    assert t.record_unknown(key, start + 1) is None
    assert t.record_unknown(key, start + 2) is None
    assert t.record_unknown(key, start + window - 1) is None
    assert t.record_unknown(key, start + window) is None  # `start` has left the window
    # start + 1, aged window - 1 seconds, still counts:
    assert t.record_unknown(key, start + window) == Block("0.0.0.1", start + window + 3600, 5)


def test_many_attempts_round_trip_through_the_packing() -> None:
    t = table(threshold=50, window_seconds=600)
    for second in range(50):
        assert t.record_unknown(7, 1000 + second * 11) is None
    assert t.record_unknown(7, 1000 + 50 * 11) == Block("0.0.0.7", 1000 + 50 * 11 + 3600, 51)


def test_a_clock_stepping_back_still_counts_every_attempt() -> None:
    t = table(threshold=3)
    assert t.record_unknown(9, 5000) is None
    assert t.record_unknown(9, 4990) is None
    assert t.record_unknown(9, 4995) is None
    assert t.record_unknown(9, 4993) == Block("0.0.0.9", 4993 + 3600, 4)


def test_window_longer_than_the_packing_allows_is_refused() -> None:
    with pytest.raises(ValueError, match="window_seconds"):
        table(window_seconds=MAX_WINDOW_SECONDS + 1)


def test_a_full_table_forgets_the_least_recently_counted_in_one_batch() -> None:
    t = table(max_clients=1000, threshold=3)
    for key in range(1000):
        assert t.record_unknown(key, 10) is None
    assert t.record_unknown(0, 11) is None  # counted again: now the most recent
    assert t.record_unknown(5000, 12) is None  # one too many: 1 + 1000 // 100 forgotten
    assert len(t) == 1000 - 10
    for now in (13, 14, 15):  # keys 1..11 were forgotten: three more attempts do not block
        assert t.record_unknown(11, now) is None
    assert t.record_unknown(12, 13) is None  # kept: its fourth attempt blocks
    assert t.record_unknown(12, 14) is None
    assert t.record_unknown(12, 15) is not None
    assert t.record_unknown(0, 14) is None
    assert t.record_unknown(0, 15) is not None


def test_adopt_takes_a_larger_shared_window_and_judges_the_next_attempt_on_it() -> None:
    table = AttackTable(threshold=3, window_seconds=600, block_seconds=3600)
    key = client_key("192.0.2.40", 64)
    assert key is not None
    assert table.record_unknown(key, 1000.0) is None
    table.adopt(key, [990, 995, 1000], 1001.0)  # every host's attempts: 3 in all
    block = table.record_unknown(key, 1002.0)
    assert block is not None and block.attempts == 4
    # A smaller or stale window changes nothing; a blocked client is left alone.
    other = client_key("192.0.2.41", 64)
    assert other is not None
    table.record_unknown(other, 1000.0)
    table.record_unknown(other, 1000.0)
    table.adopt(other, [1000], 1001.0)
    table.adopt(other, [1, 2, 3], 1001.0)  # long out of the window
    assert table.record_unknown(other, 1002.0) is None  # 3 of its own, not past 3
    table.adopt(key, [1000, 1001, 1002, 1003], 1004.0)
    assert table.blocked_until(key, 1004.0) == 1002.0 + 3600
