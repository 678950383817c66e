"""The action limits: bounded sliding-window counters, the twin of the attack table."""

from traqmilter.core.limits import SlidingWindowCounter

NOW = 1_750_000_000.0


def test_sliding_window_counter_is_bounded() -> None:
    counter = SlidingWindowCounter(limit=2, window_seconds=10, max_keys=3)
    for key in "abcd":
        counter.record(key, NOW)
    assert len(counter) == 3 and counter.count("a", NOW) == 0
    counter.record("b", NOW + 1)
    assert not counter.allows("b", NOW + 2)
    assert counter.allows("b", NOW + 10.5)
