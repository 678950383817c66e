"""The SQLite store's memory index (sqlite.py): a set of the keys, or a compact one of hashes.

KeySet (the default) holds every key as a str: about 117 bytes a key, 117 MB per daemon at
1,000,000 mailboxes, and every lookup is answered from memory.

HashedKeys (directory.sqlite_compact_index) keeps 51 bits of each key's hash instead, 6 to
8 bytes a key: the low bits pick a bucket (an offset into one array, a power of two of
them, one to two keys each on average), the next 32 bits are what the bucket holds. A key
whose bits are not there is certainly not a key of the store (UNKNOWN): the
dictionary-attack path, answered from memory as fast as the set answers it. A key whose
bits are there is MAYBE, since another key can share them: the caller asks the store, so
a collision costs a lookup, never a wrong answer; and so does every known recipient the
store's lookup cache has not seen. Catch-all keys ("@domain", a handful) are kept as
strings, so the catch-all probe of every lookup stays exact. Measured at 1,000,000
mailboxes (bench/README.md): 8 MB instead of 117, unknown recipients decided at the same
cost, known ones (none repeated) at 1.8-2.2x policyd's CPU per request.

The hash is Python's own hash() of the str: SipHash keyed per process (unless
PYTHONHASHSEED fixes it), so nobody outside can aim addresses at a collision, and it is
cached in the str object. Another function can be given (tests collide on purpose); it
must return an int of 64 bits at most, signed, as hash() does on 64-bit Python.

Compiled with mypyc (setup.py HOT_PATH). Building is a counting sort over arrays in pages
of their own (zeroed), in steps that call back between them, so a daemon's serving thread
gets the GIL back while a background thread builds (compiled code never hands it over by
itself).
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable, Iterable
from typing import Final, Literal

UNKNOWN: Final = 0  # certainly not a key of the store (when the index was read)
KNOWN: Final = 1  # a key of the store (HashedKeys: a catch-all of the key, or the key is one)
MAYBE: Final = 2  # the key's hash bits are the store's: only the store can say

FINGERPRINT_SHIFT: Final = 32  # fingerprint: the hash's top 32 bits (bucket: its low bits)
BUILD_STEP: Final = 16_384  # keys per step of build(): about 1 ms, compiled
FIRST_CAPACITY: Final = 1 << 16  # hashes the builder holds before it grows


def zeroed(typecode: Literal["q", "i", "I"], count: int) -> memoryview[int]:
    """count zeroed items of an array typecode ("q", "i", "I") in pages of their own (an
    anonymous mmap), not in the malloc heap: the OS takes them back when the last view
    goes, so neither the build's scratch arrays nor a dropped index leave RSS behind in
    a fragmented heap (measured: 18 MB instead of 6 at 1,000,000 keys with array.array)."""
    itemsize = 8 if typecode == "q" else 4
    pages = mmap.mmap(-1, max(count, 1) * itemsize, flags=mmap.MAP_PRIVATE)
    return memoryview(pages).cast(typecode)[:count]


class HashedKeys:
    """The built index. Immutable: lookups need no lock."""

    def __init__(
        self,
        bits: int,
        offsets: memoryview[int],
        fingerprints: memoryview[int],
        catch_alls: frozenset[str],
        hash_function: Callable[[str], int] | None,
    ) -> None:
        self._mask = (1 << bits) - 1
        self._offsets = offsets  # bucket b holds fingerprints[offsets[b]:offsets[b + 1]]
        self._fingerprints = fingerprints
        self._catch_alls = catch_alls
        self._hash_function = hash_function  # None: hash()
        self._size = len(fingerprints) + len(catch_alls)

    def __len__(self) -> int:
        """How many keys were indexed."""
        return self._size

    def nbytes(self) -> int:
        """Bytes held by the arrays (the catch-all strings aside)."""
        return (
            len(self._offsets) * self._offsets.itemsize
            + len(self._fingerprints) * self._fingerprints.itemsize
        )

    def lookup(self, key: str) -> int:
        """UNKNOWN, KNOWN or MAYBE for a lookup key, as the store's contains() would see
        it: the key itself, else its domain's catch-all "@domain"."""
        catch_alls = self._catch_alls
        if catch_alls:
            if key in catch_alls:
                return KNOWN
            at = key.rfind("@")
            if at > 0 and key[at:] in catch_alls:
                return KNOWN
        function = self._hash_function
        h = hash(key) if function is None else function(key)
        bucket = h & self._mask
        fingerprint = h >> FINGERPRINT_SHIFT
        fingerprints = self._fingerprints
        offsets = self._offsets
        for i in range(offsets[bucket], offsets[bucket + 1]):
            if fingerprints[i] == fingerprint:
                return MAYBE
        return UNKNOWN


class KeySet:
    """Every key as a str: lookups are never MAYBE."""

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str) -> int:
        keys = self._keys
        if key in keys:
            return KNOWN
        at = key.rfind("@")
        return KNOWN if at > 0 and key[at:] in keys else UNKNOWN


class KeySetBuilder:
    """Builds a KeySet, as HashedKeysBuilder builds HashedKeys."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def add(self, keys: Iterable[str]) -> None:
        self._keys.update(keys)

    def add_catch_alls(self, keys: Iterable[str]) -> None:
        self._keys.update(keys)

    def build(self, between_steps: Callable[[], object]) -> KeySet:
        keys, self._keys = self._keys, set()
        return KeySet(keys)


class HashedKeysBuilder:
    """Collects keys in chunks (add), then build() sorts their hashes into HashedKeys."""

    def __init__(self, hash_function: Callable[[str], int] | None = None) -> None:
        self._hash_function = hash_function
        self._hashes = zeroed("q", FIRST_CAPACITY)
        self._count = 0
        self._catch_alls: set[str] = set()

    def add(self, keys: Iterable[str]) -> None:
        """Keys that are not catch-alls (a catch-all is hashed too, but then looks MAYBE)."""
        function = self._hash_function
        chunk = array("q", map(hash if function is None else function, keys))
        start = self._count
        end = start + len(chunk)
        if end > len(self._hashes):
            bigger = zeroed("q", max(2 * len(self._hashes), end))
            bigger[:start] = self._hashes[:start]
            self._hashes = bigger
        self._hashes[start:end] = memoryview(chunk)
        self._count = end

    def add_catch_alls(self, keys: Iterable[str]) -> None:
        """Keys of the form "@domain"."""
        self._catch_alls.update(keys)

    def build(self, between_steps: Callable[[], object]) -> HashedKeys:
        """The index of every key added. between_steps is called about every millisecond
        (it may raise to abandon the build)."""
        count = self._count
        hashes = self._hashes[:count]
        if count >= 1 << 32:
            raise ValueError("more than 2**32 keys")
        bits = max(count.bit_length() - 1, 4)  # one to two keys a bucket
        mask = (1 << bits) - 1
        offsets = zeroed("I", (1 << bits) + 1)
        for start in range(0, count, BUILD_STEP):  # count each bucket's keys
            for i in range(start, min(start + BUILD_STEP, count)):
                offsets[(hashes[i] & mask) + 1] += 1
            between_steps()
        total = 0
        for start in range(0, len(offsets), BUILD_STEP):  # counts to starting offsets
            for b in range(start, min(start + BUILD_STEP, len(offsets))):
                total += offsets[b]
                offsets[b] = total
            between_steps()
        free = zeroed("I", len(offsets))  # the next free slot of each bucket
        free[:] = offsets
        fingerprints = zeroed("i", count)
        for start in range(0, count, BUILD_STEP):
            for i in range(start, min(start + BUILD_STEP, count)):
                h = hashes[i]
                bucket = h & mask
                fingerprints[free[bucket]] = h >> FINGERPRINT_SHIFT
                free[bucket] += 1
            between_steps()
        self._hashes = zeroed("q", 0)
        self._count = 0
        return HashedKeys(
            bits, offsets, fingerprints, frozenset(self._catch_alls), self._hash_function
        )
