"""The adapter from policy requests to the engine: what it asks, what it answers, and that
no input ever makes it answer permissively."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policyd_support import (
    NOW,
    OMIT,
    Deployment,
    PolicyClient,
    ServerThread,
    make_deployment,
    policy_request,
)

from policyd.adapter import PolicyAdapter
from policyd.codec import ErrorKind, PolicyDecoder, PolicyRequest, ProtocolViolation, encode_reply
from policyd.server import ConnectionNotes
from traqmilter.core.attack import AttackTable, Block, client_key, recipient_token
from traqmilter.core.engine import RcptDecision
from traqmilter.state import STATE_FILE_NAME, SqliteBlockStore

pytestmark = pytest.mark.timeout(120)

# DUNNO, or a refusal with a matching enhanced code: never OK, never a bare number, never empty.
SAFE_REPLY = re.compile(rb"action=(DUNNO|([45])\d\d \2\.\d{1,3}\.\d{1,3} [^\r\n\0]+)\n\n")


def request(**attributes: str) -> PolicyRequest:
    (decoded,) = PolicyDecoder().feed(policy_request(**attributes))
    assert isinstance(decoded, PolicyRequest)
    return decoded


@pytest.mark.parametrize(
    ("label", "attributes", "want"),
    [
        ("known", {}, "DUNNO"),
        (
            "unknown",
            {"recipient": "zed@example.com"},
            "550 5.1.1 User unknown",
        ),
        ("not local", {"recipient": "zed@elsewhere.example"}, "DUNNO"),
        ("other state", {"protocol_state": "MAIL", "recipient": OMIT}, "DUNNO"),
        ("lower-case state is not RCPT", {"protocol_state": "rcpt"}, "DUNNO"),
    ],
)
def test_answers(label: str, attributes: dict[str, str], want: str, deployment: Deployment) -> None:
    assert deployment.adapter(request(**attributes)) == want, label


def test_facts_come_from_the_postfix_attributes() -> None:
    """Each attribute reaches the engine as the fact of its name, shown by what the engine
    does with it (with threshold 1, a second counted unknown recipient blocks its client)."""
    deployment = make_deployment(threshold=1)
    unknown = "zed@example.com"
    # sasl_username: an authenticated client is not counted (exempt_authenticated).
    for _ in range(2):
        reply = deployment.adapter(
            request(recipient=unknown, client_address="192.0.2.7", sasl_username="u")
        )
        assert reply.startswith("550 5.1.1")
    # sender: a null sender's unknown recipient is refused but never counted.
    for _ in range(2):
        reply = deployment.adapter(
            request(recipient=unknown, client_address="192.0.2.8", sender="")
        )
        assert reply.startswith("550 5.1.1")
    assert deployment.blocks == []
    # recipient and client_address: the unknown recipient is counted against this client.
    reply = deployment.adapter(request(recipient=unknown, client_address="192.0.2.9"))
    assert reply.startswith("550 5.1.1")
    reply = deployment.adapter(request(recipient=unknown, client_address="192.0.2.9"))
    assert reply.startswith("450 4.7.1")
    assert [block.client for block in deployment.blocks] == ["192.0.2.9"]


@pytest.mark.parametrize(
    ("attributes", "kind"),
    [
        ({"request": "smtpd_other_policy"}, ErrorKind.UNSUPPORTED_REQUEST),
        ({"request": ""}, ErrorKind.UNSUPPORTED_REQUEST),
    ],
)
def test_protocol_violations(
    attributes: dict[str, str], kind: ErrorKind, deployment: Deployment
) -> None:
    with pytest.raises(ProtocolViolation) as raised:
        deployment.adapter(request(**attributes))
    assert raised.value.error.kind is kind


def test_a_request_without_recipient_has_no_opinion_counts_nothing_and_warns_once_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Postfix always sends recipient at RCPT; a client that does not is misconfigured.
    Refusing would refuse a recipient it never named: DUNNO, nothing counted, one warning
    per connection (the adapter logs; the engine decides, rule no_recipient)."""
    deployment = make_deployment(threshold=1)
    seen: list[str] = []
    adapter = PolicyAdapter(
        deployment.engine,
        deployment.blocks.append,
        on_decision=lambda request, decision: seen.append(decision.rule),
    )
    client = "192.0.2.9"
    connections = [ConnectionNotes("[127.0.0.1]:1"), ConnectionNotes("[127.0.0.1]:2")]
    with caplog.at_level(logging.WARNING, logger="policyd.adapter"):
        for notes in connections:
            for recipient in ("", OMIT, "", OMIT):
                assert adapter(request(recipient=recipient, client_address=client), notes) == (
                    "DUNNO"
                )
    assert seen == ["no_recipient"] * 8
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "[127.0.0.1]:1: RCPT request without a recipient from client 192.0.2.9" in warnings[0]
    assert "[127.0.0.1]:2: RCPT request without a recipient" in warnings[1]
    # Nothing was counted: with threshold 1, the client's first unknown recipient still
    # gets its honest answer, and only the next one blocks.
    assert deployment.blocks == []
    unknown = request(recipient="zed@example.com", client_address=client)
    assert adapter(unknown, connections[0]).startswith("550 5.1.1")
    assert adapter(unknown, connections[0]).startswith("450 4.7.1")


def test_a_new_block_is_handed_over_once_before_the_reply() -> None:
    deployment = make_deployment(threshold=2)
    attacker = {"client_address": "2001:db8:1:2::99", "recipient": "zed@example.com"}
    for _ in range(2):
        assert deployment.adapter(request(**attacker)).startswith("550 5.1.1")
    assert deployment.blocks == []
    assert deployment.adapter(request(**attacker)).startswith("450 4.7.1")
    assert deployment.blocks == [Block("2001:db8:1:2::/64", NOW + 3600, 3)]
    assert deployment.adapter(request(**attacker)).startswith("450 4.7.1")
    assert len(deployment.blocks) == 1


def test_a_failing_block_store_fails_the_request() -> None:
    deployment = make_deployment(threshold=1)

    def broken_store(block: Block) -> None:
        raise OSError("disk full")

    adapter = PolicyAdapter(deployment.engine, broken_store)
    assert adapter(request(recipient="zed@example.com")).startswith("550 5.1.1")
    with pytest.raises(OSError, match="disk full"):
        adapter(request(recipient="zed@example.com"))


def test_on_decision_sees_each_rcpt_decision(deployment: Deployment) -> None:
    seen: list[tuple[str, str]] = []

    def observe(req: PolicyRequest, decision: RcptDecision) -> None:
        seen.append((req.get("queue_id"), decision.rule))

    adapter = PolicyAdapter(deployment.engine, deployment.blocks.append, on_decision=observe)
    adapter(request(queue_id="4XyZ1", recipient="zed@example.com"))
    adapter(request(queue_id="4XyZ2"))
    adapter(request(protocol_state="DATA"))
    assert seen == [("4XyZ1", "unknown_reject"), ("4XyZ2", "known")]


ATTRIBUTE_NAMES = ["recipient", "sender", "client_address", "sasl_username", "protocol_state"]
HOSTILE_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "OK", "<>", "postmaster", "alice@example.com", "::1", "RCPT"]),
    st.from_regex(
        r"[a-zA-Z0-9.+\"\\ @<>%!-]{0,40}@(example\.com|EXAMPLE\.COM\.|elsewhere)", fullmatch=True
    ),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(ATTRIBUTE_NAMES), HOSTILE_TEXT))
def test_no_attribute_values_make_the_adapter_permissive(values: dict[str, str]) -> None:
    deployment = make_deployment(threshold=2)
    values.setdefault("protocol_state", "RCPT")
    wire = policy_request(**{k: v.replace("\n", " ") for k, v in values.items()})
    for item in PolicyDecoder().feed(wire):
        if not isinstance(item, PolicyRequest):
            continue  # a framing error is answered by closing: tempfail
        try:
            action = deployment.adapter(item)
        except ProtocolViolation:
            continue
        assert SAFE_REPLY.fullmatch(encode_reply(action)), action


def test_no_bytes_make_the_server_permissive(
    start_server: Callable[..., ServerThread], connect: Callable[..., PolicyClient]
) -> None:
    """Arbitrary bytes in attribute values, over a real socket: each reply is DUNNO or a
    4xx/5xx refusal, or the connection is closed without one."""
    deployment = make_deployment(threshold=2)
    server = start_server(deployment.adapter)
    client: list[PolicyClient] = [connect(server.port)]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        recipient=st.binary(max_size=60),
        sender=st.binary(max_size=30),
        client_address=st.binary(max_size=20),
    )
    def check(recipient: bytes, sender: bytes, client_address: bytes) -> None:
        wire = (
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient="
            + recipient.replace(b"\n", b"")
            + b"@example.com\nsender="
            + sender.replace(b"\n", b"")
            + b"\nclient_address="
            + client_address.replace(b"\n", b"")
            + b"\n\n"
        )
        reply = client[0].ask(wire)
        if reply is None:
            client[0] = connect(server.port)
            return
        assert SAFE_REPLY.fullmatch(reply), reply

    check()


def test_the_retry_of_a_recipient_the_milter_deferred_is_not_counted_again(
    tmp_path: Path,
) -> None:
    """Under Postfix policyd counts at RCPT and the milter, another process, answers 452
    after it. The milter writes the deferral to the state file; policyd's next request
    for that recipient from that client is answered as before but not counted, so
    threshold recipients deferred and retried leave the client unblocked."""
    d = make_deployment(threshold=3)
    path = str(tmp_path / STATE_FILE_NAME)
    policyd_store, milter_store = SqliteBlockStore(path), SqliteBlockStore(path)
    milter_table = AttackTable(threshold=3, window_seconds=600, block_seconds=3600)
    try:
        policyd_store.share(d.engine.attacks, NOW)
        milter_store.share(milter_table, NOW)
        key = client_key("203.0.113.5", 64)
        assert key is not None
        for n in range(3):
            zed = f"zed{n}@example.com"
            assert d.adapter(request(recipient=zed)).startswith("550 ")  # counted
            milter_table.note_deferred(key, recipient_token(zed), NOW)  # the milter's 452
            assert d.adapter(request(recipient=zed)).startswith("550 ")  # the retry: not
        assert d.blocks == []
        assert d.adapter(request(recipient="one-more@example.com")).startswith("450 4.7.1 ")
        assert [b.attempts for b in d.blocks] == [4]
    finally:
        policyd_store.close()
        milter_store.close()
