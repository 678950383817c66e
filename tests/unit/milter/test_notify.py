"""The digest timer and hand-over (to a real loopback SMTP capture server), the
on_create hook runner (real processes: success, failure, timeout, missing program), and
the milter handing both their events without ever failing a message for them."""

from __future__ import annotations

import email
import email.policy
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import Milter
import pytest

from tests.support.capture import CaptureServer
from tests.unit.milter.milter_support import Conversation, make_config, make_deployment
from traqmilter.core.digest import DigestEvent
from traqmilter.core.settings import Action, DomainPolicy, NotificationSettings
from traqmilter.milter.notify import GRACE_SECONDS, RETRY_SECONDS, Digester, HookRunner
from traqmilter.milter.submit import SmtpSubmitter
from traqmilter.state import STATE_FILE_NAME, SqliteBlockStore

NOTIFY = "admin@example.com"


def event(address: str, notify: str = NOTIFY) -> DigestEvent:
    return DigestEvent(notify, "fwd.example", Action.FORWARD, address, "s@r.example", "127.0.0.1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteBlockStore]:
    """The embedded state store (tests/integration/test_digest_store.py: Redis too)."""
    opened = SqliteBlockStore(str(tmp_path / STATE_FILE_NAME))
    yield opened
    opened.close()


def smtp(server: CaptureServer) -> SmtpSubmitter:
    return SmtpSubmitter(f"inet:127.0.0.1:{server.port}", timeout=10)


def test_flush_sends_one_digest_per_address_with_a_null_sender(store: SqliteBlockStore) -> None:
    clock = Clock()
    with CaptureServer() as server:
        digester = Digester(
            NotificationSettings, smtp(server), store, hostname="mx.example", clock=clock
        )
        assert digester.flush() == 0  # nothing happened: no message
        digester.record([event("x@fwd.example"), event("x@fwd.example"), event("y@fwd.example")])
        digester.record([event("z@fwd.example", notify="other@example.com")])
        assert digester.flush() == 0  # the period (0 to 3600) is not over
        clock.now = 3600 + GRACE_SECONDS
        assert digester.flush() == 2
        transactions = server.wait_for(2, timeout=10)
        assert digester.flush() == 0  # sent once: the counts are gone from the store
        assert store.pending_digests(7200, clock.now) == []
    assert {t.mail_from for t in transactions} == {""}
    mine = next(t for t in transactions if t.rcpt_tos == [NOTIFY])
    message = email.message_from_bytes(mine.data, policy=email.policy.default)
    assert message["Auto-Submitted"] == "auto-generated"
    body = message.get_content().replace("\r\n", "\n")
    assert "     2  x@fwd.example\n         1  y@fwd.example" in body
    assert "z@fwd.example" not in body
    assert "Thu, 01 Jan 1970 00:00:00 +0000 to Thu, 01 Jan 1970 01:00:00 +0000" in body


def test_a_refused_digest_stays_and_goes_out_with_the_next_attempt(
    store: SqliteBlockStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with CaptureServer(rcpt_reply=lambda _a: "550 5.1.1 no") as refusing, CaptureServer() as taking:
        submitter = smtp(refusing)
        digester = Digester(
            NotificationSettings, submitter, store, hostname="mx.example", clock=clock
        )
        digester.record([event("x@fwd.example")])
        clock.now = 3600 + GRACE_SECONDS
        with caplog.at_level(logging.ERROR, "traqmilter.milter"):
            assert digester.flush() == 0
        assert "digest to admin@example.com not handed over (kept" in caplog.text
        assert digester.kept == 1
        assert digester.next_flush(clock.now) == clock.now + RETRY_SECONDS  # soon, not in 1 h
        digester.record([event("y@fwd.example")])  # the next period's
        clock.now = 7200 + GRACE_SECONDS
        digester.submitter = smtp(taking)
        assert digester.flush() == 1  # both periods in one digest
        (digest,) = taking.wait_for(1, timeout=10)
        assert digester.flush() == 0 and digester.kept == 0
    assert b"x@fwd.example" in digest.data and b"y@fwd.example" in digest.data
    assert b"00:00:00 +0000 to Thu, 01 Jan 1970 02:00:00 +0000" in digest.data


def test_a_digest_refused_again_and_again_is_tried_less_often_up_to_once_a_period(
    store: SqliteBlockStore,
) -> None:
    # A notify mailbox removed after start-up: each attempt is refused for good, and under
    # Sendmail each one also mails its postmaster a report.
    clock = Clock()
    with CaptureServer(rcpt_reply=lambda _a: "550 5.1.1 no") as refusing, CaptureServer() as taking:
        digester = Digester(
            NotificationSettings, smtp(refusing), store, hostname="mx.example", clock=clock
        )
        digester.record([event("x@fwd.example")])
        clock.now = 3600 + GRACE_SECONDS
        waits, dues = [], []
        for _attempt in range(10):
            assert digester.flush() == 0 and digester.kept == 1
            dues.append(digester.next_flush(clock.now))
            waits.append(dues[-1] - clock.now)
            clock.now = dues[-1]
        assert waits[:5] == [RETRY_SECONDS * 2**n for n in range(5)]  # 1, 2, 4, 8, 16 min
        # Past the period, one attempt a period, at its end, as if nothing had failed.
        assert all((due - GRACE_SECONDS) % 3600 == 0 for due in dues[6:])
        assert all(wait <= 3600 for wait in waits)
        digester.submitter = smtp(taking)  # the mailbox is back: the backoff starts over
        assert digester.flush() == 1 and digester.failed_flushes == 0
        assert (digester.next_flush(clock.now) - GRACE_SECONDS) % 3600 == 0


def test_a_restarted_digester_sends_what_the_last_one_recorded(tmp_path: Path) -> None:
    clock = Clock()
    path = str(tmp_path / STATE_FILE_NAME)
    with CaptureServer() as server:
        first = SqliteBlockStore(path)
        digester = Digester(NotificationSettings, smtp(server), first, clock=clock)
        digester.record([event("before@fwd.example")])
        assert digester.save()
        first.close()  # the process ends (killed: what it stored is all there is)
        again = SqliteBlockStore(path)
        clock.now = 3600 + GRACE_SECONDS
        restarted = Digester(NotificationSettings, smtp(server), again, clock=clock)
        assert restarted.flush() == 1
        (digest,) = server.wait_for(1, timeout=10)
        again.close()
    assert b"before@fwd.example" in digest.data


def test_while_another_process_holds_the_claim_nothing_is_sent(store: SqliteBlockStore) -> None:
    clock = Clock()
    with CaptureServer() as server:
        one = Digester(NotificationSettings, smtp(server), store, hostname="a", clock=clock)
        two = Digester(NotificationSettings, smtp(server), store, hostname="b", clock=clock)
        one.record([event("x@fwd.example")])
        two.record([event("x@fwd.example")])
        assert one.save()  # its thread stores within SAVE_SECONDS
        clock.now = 3600 + GRACE_SECONDS
        assert store.claim_digests(one.holder, 60, clock.now)  # one is sending
        assert two.flush() == 0
        store.release_digests(one.holder)
        assert two.flush() == 1  # both processes' events, in one digest
        assert one.flush() == 0
        (digest,) = server.wait_for(1, timeout=10)
    assert b"     2  x@fwd.example" in digest.data


def test_timer_stores_at_once_and_flushes_after_the_period(store: SqliteBlockStore) -> None:
    delivered = threading.Event()

    class Submitter:
        def __init__(self) -> None:
            self.digests: list[object] = []

        def submit(self, digest: object) -> None:
            self.digests.append(digest)
            delivered.set()

    submitter = Submitter()
    digester = Digester(
        lambda: NotificationSettings(period=1), submitter, store, hostname="mx.example"
    )
    stop = threading.Event()
    timer = threading.Thread(target=digester.run, args=(stop,))
    timer.start()
    try:
        digester.record([event("x@fwd.example")])
        assert delivered.wait(10)
    finally:
        stop.set()
        timer.join(10)
    assert not timer.is_alive()
    assert len(submitter.digests) == 1


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook"
    path.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_hook_gets_the_address_as_argument_and_in_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = script(
        tmp_path,
        f"open({str(out)!r}, 'w').write(sys.argv[1] + ' ' + sys.argv[2] + ' ' "
        "+ os.environ['TRAQMILTER_ADDRESS'])",
    )
    runner = HookRunner(lambda: 10)
    assert runner.run_one((hook, "--new"), "newbie@shop.example")
    assert out.read_text() == "--new newbie@shop.example newbie@shop.example"


def test_hook_failure_and_timeout_are_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = script(tmp_path, "print('disk full', file=sys.stderr); sys.exit(3)")
    runner = HookRunner(lambda: 1)
    with caplog.at_level(logging.ERROR, "traqmilter.milter"):
        assert not runner.run_one((failing,), "a@shop.example")
        assert not runner.run_one((str(tmp_path / "missing"),), "b@shop.example")
        sleeper = script(tmp_path, "time.sleep(30)")
        assert not runner.run_one((sleeper,), "c@shop.example")
    assert "for a@shop.example exited with 3: disk full" in caplog.text
    assert "missing for b@shop.example" in caplog.text
    assert "for c@shop.example: killed after 1s" in caplog.text


def test_hooks_run_on_their_own_thread_and_a_full_queue_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    hook = script(tmp_path, f"open({str(out)!r}, 'a').write(sys.argv[1] + chr(10))")
    runner = HookRunner(lambda: 10, size=1)
    runner.submit((hook,), "one@shop.example")
    with caplog.at_level(logging.ERROR, "traqmilter.milter"):
        runner.submit((hook,), "two@shop.example")  # the queue holds one: skipped at once
    assert "on_create for two@shop.example skipped" in caplog.text
    stop = threading.Event()
    worker = threading.Thread(target=runner.run, args=(stop,))
    worker.start()
    stop.set()
    runner.close()
    worker.join(10)
    assert not worker.is_alive()
    assert out.read_text() == "one@shop.example\n"


def test_the_milter_hands_events_and_hooks_over_after_the_message(tmp_path: Path) -> None:
    policy = DomainPolicy(
        action=Action.CREATE, template="bob", notify=NOTIFY, on_create=("/bin/true", "-x")
    )
    config = make_config(domains={"shop.example": policy})
    recorded: list[DigestEvent] = []
    hooks: list[tuple[tuple[str, ...], str]] = []
    deployment = make_deployment(
        tmp_path,
        config,
        digests=recorded.extend,
        hooks=lambda argv, address: hooks.append((argv, address)),
    )
    outcome = Conversation(deployment.service).send("s@remote.example", ["newbie+x@shop.example"])
    assert outcome.eom == Milter.CONTINUE
    assert [(e.action, e.address, e.notify) for e in recorded] == [
        (Action.CREATE, "newbie@shop.example", NOTIFY)
    ]
    assert hooks == [(("/bin/true", "-x"), "newbie@shop.example")]


def test_a_failing_digest_or_hook_never_fails_the_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = DomainPolicy(
        action=Action.CREATE, template="bob", notify=NOTIFY, on_create=("/bin/true",)
    )

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    deployment = make_deployment(
        tmp_path, make_config(domains={"shop.example": policy}), digests=broken, hooks=broken
    )
    with caplog.at_level(logging.ERROR, logger="traqmilter.milter"):
        outcome = Conversation(deployment.service).send("s@remote.example", ["new@shop.example"])
    assert outcome.eom == Milter.CONTINUE and outcome.reply is None
    assert deployment.store.get_mailbox("new@shop.example") is not None
    assert "4QUEUEID: milter: digest or on_create not recorded" in caplog.text
