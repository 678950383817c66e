"""A stand-in for this host's upstream verifier (OpenDKIM, OpenDMARC, an SPF milter), for
tests: a pymilter milter that adds one Authentication-Results header per message, under the
authserv-id it is given, saying spf=pass for envelope senders of the given domains and
spf=fail for any other.

Run as its own process (libmilter allows one milter per process):
    python -m tests.support.ar_milter PORT AUTHSERV_ID PASSING_DOMAIN...
It listens on 127.0.0.1:PORT until SIGTERM.
"""

from __future__ import annotations

import sys
from typing import Any

import Milter


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


if __name__ == "__main__":
    main(sys.argv[1:])
