"""traqmilter's own SPF check (bounce.spf_check) against a DNS server on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.support.dns_server import DnsServer
from traqmilter.core.settings import BounceSettings
from traqmilter.spf import PyspfChecker, spf_checker

RECORDS = {
    ("pass.example", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("fail.example", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
    ("soft.example", "TXT"): ['"v=spf1 ~all"'],
    ("broken.example", "TXT"): ['"v=spf1 ip4:not-an-address -all"'],
    ("inc.example", "TXT"): ['"v=spf1 include:pass.example -all"'],
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(RECORDS) as server:
        yield server


@pytest.mark.parametrize(
    ("sender", "result"),
    [
        ("<alice@pass.example>", "pass"),
        ("alice@Pass.Example", "pass"),
        ("<alice@inc.example>", "pass"),
        ("<eve@fail.example>", "fail"),
        ("<eve@soft.example>", "softfail"),
        ("<eve@broken.example>", "permerror"),
        ("<eve@nowhere.example>", "none"),
    ],
)
def test_results(dns: DnsServer, sender: str, result: str) -> None:
    assert PyspfChecker(3, dns.address).check("127.0.0.1", sender, "client.test") == result


def test_results_are_remembered(dns: DnsServer) -> None:
    now = [0.0]
    checker = PyspfChecker(3, dns.address, clock=lambda: now[0])
    assert checker.check("127.0.0.1", "<a@pass.example>", "h") == "pass"
    asked = len(dns.asked())
    assert checker.check("127.0.0.1", "<a@pass.example>", "h") == "pass"
    assert len(dns.asked()) == asked
    now[0] = 10_000.0  # past CACHE_SECONDS: asked again
    assert checker.check("127.0.0.1", "<a@pass.example>", "h") == "pass"
    assert len(dns.asked()) > asked


def test_no_answer_is_temperror_within_the_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        checker = PyspfChecker(1, f"127.0.0.1:{port}")
        assert checker.check("127.0.0.1", "<a@pass.example>", "h") == "temperror"
    finally:
        silent.close()


def test_off_unless_configured() -> None:
    assert spf_checker(BounceSettings()) is None
    assert isinstance(spf_checker(BounceSettings(spf_check=True)), PyspfChecker)
