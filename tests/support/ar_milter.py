"""A stand-in for this host's upstream verifier (OpenDKIM, OpenDMARC, an SPF milter), for
tests: a pymilter milter that adds one Authentication-Results header per message, under the
authserv-id it is given, saying spf=pass for envelope senders of the given domains and
spf=fail for any other.

Run as its own process (libmilter allows one milter per process):
    python -m tests.support.ar_milter PORT AUTHSERV_ID PASSING_DOMAIN...
It listens on 127.0.0.1:PORT until SIGTERM. verifier_milter() starts and stops one.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Milter

from tests.support import children
from tests.support.postfix import free_loopback_port

REPO = Path(__file__).resolve().parents[2]
LISTEN_SECONDS = 20.0


class Verifier(Milter.Base):  # type: ignore[misc]
    authserv_id = ""
    passing: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.sender = ""

    def envfrom(self, sender: str, *params: str) -> Any:
        self.sender = sender.strip("<>")
        return Milter.CONTINUE

    def eom(self) -> Any:
        domain = self.sender.rpartition("@")[2].lower()
        result = "pass" if domain in self.passing else "fail"
        self.addheader(
            "Authentication-Results",
            f"{self.authserv_id}; spf={result} smtp.mailfrom={self.sender or 'postmaster'}",
        )
        return Milter.CONTINUE


def main(argv: list[str]) -> None:
    port, authserv_id, *passing = argv
    Verifier.authserv_id = authserv_id
    Verifier.passing = frozenset(d.lower() for d in passing)
    Milter.factory = Verifier
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("ar-verifier", f"inet:{port}@127.0.0.1", 30)


@contextlib.contextmanager
def verifier_milter(authserv_id: str, *passing: str) -> Iterator[int]:
    """The stand-in verifier as its own process on a loopback port (yielded)."""
    port = free_loopback_port()
    process = children.spawn(
        [sys.executable, "-m", "tests.support.ar_milter", str(port), authserv_id, *passing],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + LISTEN_SECONDS
        while True:
            assert process.poll() is None, "the verifier milter exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the verifier milter did not listen"
                time.sleep(0.05)
        yield port
    finally:
        children.kill(process)  # a stand-in: no state to flush


if __name__ == "__main__":
    main(sys.argv[1:])
