"""Reload under load: while several persistent connections send policy requests in a loop,
policyd is sent SIGHUP again and again. Every request gets a reply on the connection it
was sent on, a client blocked before stays blocked, and attempts counted before the
reloads still count after them."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.daemon_world import (
    PolicyConnection,
    is_block,
    make_directory,
    rcpt_request,
    unknown_until_blocked,
    wait_for,
    write_config,
)
from tests.support.daemon_process import DaemonProcess
from tests.support.postfix import free_loopback_port

WORKERS = 4
RELOADS = 5
REQUESTS_PER_RELOAD = 200  # answered after each SIGHUP before the next one is sent
THRESHOLD = 4
BLOCKED = "192.0.2.66"
COUNTING = "192.0.2.77"


@dataclass
class Worker:
    """One smtpd-like client: a persistent connection, a loop of requests."""

    port: int
    index: int
    sent: int = 0
    answered: int = 0
    unexpected: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            connection = PolicyConnection(port=self.port)
            try:
                while not stop.is_set():
                    self.exchange(connection)
            finally:
                connection.close()
        except BaseException as exc:  # noqa: BLE001 -- reported by the test, not lost here
            self.error = exc

    def exchange(self, connection: PolicyConnection) -> None:
        # Alternate a known recipient from an innocent client and an unknown one from the
        # blocked client: the first must pass, the second must stay blocked.
        n = self.sent
        if n % 2:
            request, want_block = rcpt_request(f"nobody{n}@example.com", BLOCKED), True
        else:
            client = f"198.51.100.{self.index * 50 + n % 50 + 1}"
            request, want_block = rcpt_request("admin@example.com", client), False
        self.sent += 1
        action = connection.ask(request)
        self.answered += 1
        if is_block(action) != want_block or (not want_block and action != "DUNNO"):
            self.unexpected.append(action)


def test_reload_under_load_loses_no_request_and_keeps_blocks(tmp_path: Path) -> None:
    make_directory(tmp_path)
    port = free_loopback_port()
    policyd = (
        f'  listen: "inet:127.0.0.1:{port}"\n'
        f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    )
    config = tmp_path / "traqmilter.yaml"
    write_config(config, root=tmp_path, threshold=THRESHOLD, policyd=policyd)

    with DaemonProcess(config, "policyd", port) as daemon:
        setup = PolicyConnection(port=port)
        unknown_until_blocked(setup, BLOCKED)
        for n in range(THRESHOLD):  # the threshold: one attempt short of a block
            assert setup.ask(rcpt_request(f"counted{n}@example.com", COUNTING)).startswith("550")

        stop = threading.Event()
        workers = [Worker(port, index) for index in range(WORKERS)]
        threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
        for thread in threads:
            thread.start()

        def answered() -> int:
            return sum(w.answered for w in workers)

        def failed() -> bool:
            return any(w.error is not None for w in workers)

        try:
            for reload in range(1, RELOADS + 1):
                # Each reload really changes the config (the text, not the threshold).
                extra = f"# reload {reload}\n"
                write_config(
                    config, root=tmp_path, threshold=THRESHOLD, policyd=policyd, extra=extra
                )
                before = answered()
                daemon.signal(signal.SIGHUP)
                # wait_for calls the conditions before the loop moves on (B023).
                logged = "policyd: reloaded configuration"
                wait_for(lambda: daemon.log().count(logged) == reload, f"reload {reload}")  # noqa: B023
                wait_for(
                    lambda: answered() >= before + REQUESTS_PER_RELOAD or failed(),  # noqa: B023
                    f"requests after reload {reload}",
                )
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)

        for worker in workers:
            assert worker.error is None, f"worker {worker.index}: {worker.error!r}"
            assert worker.sent == worker.answered
            assert worker.unexpected == []
        assert answered() >= RELOADS * REQUESTS_PER_RELOAD
        # The attempts counted before the reloads still count: one more blocks.
        assert is_block(setup.ask(rcpt_request("counted-last@example.com", COUNTING)))
        assert is_block(setup.ask(rcpt_request("again@example.com", BLOCKED)))
        setup.close()
        assert daemon.stop() == 0
        assert "reload refused" not in daemon.log()
        assert "Traceback" not in daemon.log()
