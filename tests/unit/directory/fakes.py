"""Test doubles for the recipient directory, shared by every test that needs one.

InMemoryDirectory passes the same contract suite as the real sources
(tests/unit/directory/test_contract.py), so a test that uses it sees real semantics.
"""

from __future__ import annotations

from collections.abc import Iterable

from traqmilter.core.engine import DirectoryUnavailable


class InMemoryDirectory:
    """Known keys in a set; "@domain" makes a whole domain known. Records every lookup.

    unavailable=True makes every lookup raise DirectoryUnavailable, like a store that is
    locked or a map that was never readable.
    """

    def __init__(self, keys: Iterable[str] = (), *, unavailable: bool = False) -> None:
        self.keys = set(keys)
        self.unavailable = unavailable
        self.lookups: list[str] = []
        self.closed = False

    def contains(self, key: str) -> bool:
        self.lookups.append(key)
        if self.unavailable or self.closed:
            raise DirectoryUnavailable("in-memory directory made unavailable")
        if key in self.keys:
            return True
        at = key.rfind("@")
        return at > 0 and key[at:] in self.keys

    def add(self, key: str) -> None:
        self.keys.add(key)

    def discard(self, key: str) -> None:
        self.keys.discard(key)

    def close(self) -> None:
        self.closed = True
