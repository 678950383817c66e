"""The header and body collectors: counts kept whole, text bounded, no field forged."""

from traqmilter.milter.collect import BodyCollector, HeaderCollector


def test_header_collector_counts_and_bounds() -> None:
    collector = HeaderCollector()
    collector.add("Received", b"from a\n\tby b")
    collector.add("x-traqmilter-HOP", b"mx (forward)")
    collector.add("Subject", b"evil\nBcc: victim@example.com")
    summary = collector.summary()
    assert summary.received == 1 and summary.hops == 1
    assert summary.section == (
        b"Received: from a\r\n\tby b\r\nx-traqmilter-HOP: mx (forward)\r\n"
        b"Subject: evil\r\n Bcc: victim@example.com\r\n"
    )
    for _ in range(2000):
        collector.add("Received", b"x" * 100)
    summary = collector.summary()
    assert summary.truncated and len(summary.section) <= 102_400
    assert summary.received == 2001  # counted even when no longer kept


def test_body_collector_keeps_only_up_to_the_limit() -> None:
    small = BodyCollector(10)
    small.add(b"12345")
    small.add(b"67890")
    assert small.body() == b"1234567890"
    big = BodyCollector(10)
    big.add(b"12345")
    big.add(b"678901")
    big.add(b"x")
    assert big.body() is None
