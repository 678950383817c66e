"""Dictionary-attack arithmetic: sliding window, blocks, bounds, IPv6 networks."""

import pytest

from traqmilter.core.attack import (
    MAX_WINDOW_SECONDS,
    AttackTable,
    Block,
    DeferredRetries,
    _unpack,
    client_key,
    key_text,
    recipient_token,
)


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


# --------------------------------------------------------------------------- split retries
# The milter defers a recipient to a separate transaction with 452 4.5.3; the client sends
# it again. The deferred attempt counts; its retry must not count a second time.

ZED = recipient_token("zed@example.org")


def test_a_deferred_recipient_counts_once_and_its_retry_not_again() -> None:
    t = table(threshold=2)
    assert t.record_unknown(7, 1000, ZED) is None  # the 452 attempt: counted
    t.note_deferred(7, ZED, 1000)
    assert t.record_unknown(7, 1300, ZED) is None  # the retry: excused
    assert t.record_unknown(7, 1301, recipient_token("amy@example.org")) is None
    # two counted so far (zed once, amy): the third unknown is past the threshold
    assert t.record_unknown(7, 1302, recipient_token("bob@example.org")) is not None


def test_the_excuse_serves_one_retry_only_and_the_452_attempt_always_counts() -> None:
    t = table(threshold=100)
    t.record_unknown(7, 1000, ZED)
    t.note_deferred(7, ZED, 1000)
    t.record_unknown(7, 1001, ZED)  # excused
    # deferred again at once (the retry met another split): no second excuse in the window
    t.note_deferred(7, ZED, 1001)
    t.record_unknown(7, 1002, ZED)
    t.record_unknown(7, 1003, ZED)
    assert t.record_unknown(7, 1004) is None
    assert len(_unpack_of(t, 7)) == 4  # 1000, 1002, 1003, 1004: only 1001 was excused


def _unpack_of(t: AttackTable, key: int) -> list[int]:
    return _unpack(t._attempts[key])


def test_the_excuse_is_the_deferred_clients_and_recipients_alone() -> None:
    t = table(threshold=100)
    t.note_deferred(7, ZED, 1000)
    t.record_unknown(8, 1001, ZED)  # another client: counted
    t.record_unknown(7, 1002, recipient_token("amy@example.org"))  # another recipient
    t.record_unknown(7, 1003)  # no recipient named (an old caller): counted
    assert len(_unpack_of(t, 8)) == 1 and len(_unpack_of(t, 7)) == 2
    t.record_unknown(7, 1004, ZED)  # the retry itself, still excused
    assert len(_unpack_of(t, 7)) == 2


def test_the_excuse_ends_with_the_window() -> None:
    """A retry later than the window counts again; the deferred attempt has left the
    window by then, so the two are never counted together."""
    t = table(threshold=100, window_seconds=600)
    t.record_unknown(7, 1000, ZED)
    t.note_deferred(7, ZED, 1000)
    t.record_unknown(7, 1600, ZED)
    assert _unpack_of(t, 7) == [1600]
    # and a new deferral may be made once the old one ended
    t.note_deferred(7, ZED, 1601)
    t.record_unknown(7, 1602, ZED)
    assert _unpack_of(t, 7) == [1600]


def test_deferred_retries_are_bounded_oldest_first() -> None:
    retries = DeferredRetries(max_entries=100)
    for n in range(1000):
        retries.defer(n, ZED, 5000, 1000)
    assert len(retries) <= 100
    assert retries.excuse(999, ZED, 1001)  # the newest are kept
    assert not retries.excuse(0, ZED, 1001)  # the oldest forgotten: its retry counts


def test_recipient_token_is_a_fixed_size_digest_of_any_text() -> None:
    hostile = "\udcff\x00" + "x" * 100_000 + "@example.org"
    assert len(recipient_token(hostile)) == 32
    assert recipient_token("a@example.org") != recipient_token("b@example.org")
    assert "example" not in recipient_token("a@example.org")
