"""Recipient sources that follow an existing installation: Postfix lookup tables and plain
address lists, re-read when their file changes.

Each source keeps its keys in memory as a frozenset, so a lookup is a set probe. Changes
are noticed without I/O per lookup: at most once per reload_check_interval, the lookup
that finds the interval over does one stat() of the file (mtime, size, inode). When that
signature changed (or the last read failed), the file is re-read in a background thread
while lookups go on answering from the previous set; the new set replaces it in one
reference assignment, so lookups never wait for a reload and take no lock. refresh()
does the same check at once and can wait for the result (for SIGHUP, `check`, tests).

Failure semantics: a reload that fails (file gone, unreadable, postmap error) keeps the
last good set and logs once per distinct error; if the source was never loaded, contains()
raises DirectoryUnavailable, so the engine tempfails instead of calling anyone unknown.
Failed reads are retried every interval even if the file did not change.

Key semantics follow Postfix's virtual(5) for the virtual domains traqmilter serves:
"user@domain" is that address; "@domain" makes every address of the domain known (a
catch-all); a key without "@" ("user", or a bare domain as in a virtual alias domain's
declaration line) is ignored, because Postfix applies bare "user" keys only to
$myorigin/$mydestination, which traqmilter does not know. Postfix folds the keys of
indexed tables to lower case when it builds and queries them, so PostfixMapSource
compares case-insensitively whatever case_sensitive_local_parts says; address lists
follow that setting.

BUGS: a map rewritten in place is re-read when its signature changes; a read that
overlaps the rewrite can see part of it, and is corrected by the next check, since the
signature then differs again. Memory is about 140 bytes per key (a million-key table:
140 MB, read in 3.5 s), the price of lookups without I/O. postmap reads a text table only
once it is a second or two old, so a texthash: edit is seen a few seconds later.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from traqmilter.core.address import AddressError, normalise_domain, parse_address
from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.postfix_tools import find_program, postfix_command

log = logging.getLogger("traqmilter.directory")

# Indexed file types whose keys `postmap -s` can list, and the suffix of the file that
# changes when the table is rebuilt. texthash is read by postmap -s too (checked on Postfix
# 3.7.11), so Postfix's own parser decides what a key is.
MAP_FILE_SUFFIX = {
    "hash": ".db",
    "btree": ".db",
    "lmdb": ".lmdb",
    "cdb": ".cdb",
    "dbm": ".pag",
    "sdbm": ".pag",
    "texthash": "",
}
POSTMAP_TIMEOUT_SECONDS = 120.0
# An already-normal lower-case address: skips the full parser for the usual key.
_PLAIN_ADDRESS = re.compile(r"[a-z0-9_][a-z0-9._+=-]*@[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")

# A bare local part as Postfix's local tables hold them (aliases, user names).
_BARE_LOCAL_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]*")

# What postalias adds to an aliases database for NIS: not recipients.
_NIS_KEYS = frozenset({"YP_LAST_MODIFIED", "YP_MASTER_NAME"})

Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


@dataclass(frozen=True, slots=True)
class LoadResult:
    keys: frozenset[str]
    ignored: int  # entries that are not addresses (bare names, malformed keys)


def normalise_entry(entry: str, *, fold_case: bool, bare: bool = False) -> str | None:
    """The lookup key of one table or list entry, or None when it names no address.
    bare=True keeps a bare local part ("user", a key of a local domain's table)."""
    if _PLAIN_ADDRESS.fullmatch(entry) and ".." not in entry:
        return entry
    if entry.startswith("@"):
        try:
            return "@" + normalise_domain(entry[1:])
        except AddressError:
            return None
    if "@" not in entry:
        if bare and _BARE_LOCAL_PART.fullmatch(entry) and entry not in _NIS_KEYS:
            return entry.lower() if fold_case else entry
        return None
    try:
        return parse_address(entry, delimiters="", fold_case=fold_case).key
    except AddressError:
        return None


class _WatchedSource(ABC):
    """A set of known keys loaded from one file and re-loaded when that file changes."""

    def __init__(
        self,
        name: str,
        watched_path: str,
        *,
        reload_check_interval: float,
        clock: Callable[[], float],
        background: bool,
    ) -> None:
        self.name = name
        self.watched_path = watched_path
        self.reload_check_interval = reload_check_interval
        self._clock = clock
        self._background = background
        self._keys: frozenset[str] | None = None  # None: never loaded
        self.ignored = 0  # entries of the last good read that name no address
        self._signature: Signature | None = None
        self._last_error: str | None = None
        self._reload_lock = threading.Lock()  # held by the one running reload; lookups never wait
        self._reloader: threading.Thread | None = None
        self._closed = False
        self._next_check = clock() + reload_check_interval
        # Keys of a local domain's table (local_recipient_maps): a bare "user" key makes
        # user@ every domain the source is asked about known (a scope limits which).
        self.bare_keys = False

    # The first load happens in the subclass constructor, once its fields are set.
    def _first_load(self) -> None:
        self.refresh(wait=True)

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    @property
    def last_error(self) -> str | None:
        """Why the last check or read failed; None after a good one."""
        return self._last_error

    def __len__(self) -> int:
        keys = self._keys
        return 0 if keys is None else len(keys)

    def contains(self, key: str) -> bool:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.reload_check_interval
            self._check(wait=not self._background)
        keys = self._keys
        if keys is None:
            raise DirectoryUnavailable(f"{self.name}: not loaded: {self._last_error}")
        key = self._lookup_form(key)
        if key in keys:
            return True
        at = key.rfind("@")
        if at <= 0:
            return False
        return key[at:] in keys or (self.bare_keys and key[:at] in keys)

    def _lookup_form(self, key: str) -> str:
        return key

    def refresh(self, *, wait: bool = True) -> None:
        """Check the file now and re-read it if it changed or the last read failed."""
        if wait:
            self.join_reload()
        self._next_check = self._clock() + self.reload_check_interval
        self._check(wait=wait)

    def join_reload(self, timeout: float | None = None) -> None:
        """Wait for a background reload in progress (tests, shutdown)."""
        reloader = self._reloader
        if reloader is not None:
            reloader.join(timeout)

    def close(self) -> None:
        self._closed = True
        self.join_reload(POSTMAP_TIMEOUT_SECONDS)

    def _check(self, *, wait: bool) -> None:
        # Whoever takes the reload lock checks; a background reader inherits it and
        # releases it when done, so there is never more than one reader per source.
        if self._closed or not self._reload_lock.acquire(blocking=False):
            return
        handed_over = False
        try:
            try:
                st = os.stat(self.watched_path)
            except OSError as exc:
                self._failed(f"cannot stat {self.watched_path}: {exc.strerror or exc}")
                return
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature == self._signature and self._last_error is None:
                return
            if wait:
                self._reload(signature)
                return
            reloader = threading.Thread(
                target=self._reload_and_release,
                args=(signature,),
                name=f"reload {self.name}",
                daemon=True,
            )
            self._reloader = reloader
            reloader.start()
            handed_over = True
        finally:
            if not handed_over:
                self._reload_lock.release()

    def _reload_and_release(self, signature: Signature) -> None:
        try:
            self._reload(signature)
        finally:
            self._reload_lock.release()

    def _reload(self, signature: Signature) -> None:
        started = time.monotonic()
        try:
            result = self._load()
        except (OSError, UnicodeError, ValueError, subprocess.SubprocessError) as exc:
            self._failed(str(exc))
            return
        self._keys, self.ignored = result.keys, result.ignored
        # The signature from before the read: a change during the read shows up as a
        # different signature at the next check, and is read again.
        self._signature = signature
        recovered = self._last_error is not None
        self._last_error = None
        log.info(
            "%s: loaded %d keys (%d entries that name no address ignored) in %.2fs%s",
            self.name,
            len(result.keys),
            result.ignored,
            time.monotonic() - started,
            " after an error" if recovered else "",
        )

    def _failed(self, error: str) -> None:
        if error != self._last_error:
            if self._keys is None:
                log.error("%s: %s; lookups tempfail until it can be read", self.name, error)
            else:
                log.warning(
                    "%s: %s; keeping the last good set of %d keys",
                    self.name,
                    error,
                    len(self._keys),
                )
        self._last_error = error

    @abstractmethod
    def _load(self) -> LoadResult:
        """Read the whole file; raise OSError, UnicodeError or ValueError when it cannot."""


class PostfixMapSource(_WatchedSource):
    """The keys of a Postfix indexed table (hash:, btree:, lmdb:, cdb:, texthash:, ...),
    listed with `postmap -c CONFIG_DIR -s TYPE:PATH` (no shell, with a timeout), where
    config_dir is the configuration directory of the Postfix instance that owns the table."""

    def __init__(
        self,
        spec: str,
        *,
        config_dir: str,
        reload_check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        postmap: str | None = None,
        timeout: float = POSTMAP_TIMEOUT_SECONDS,
        bare_keys: bool = False,
    ) -> None:
        map_type, colon, path = spec.partition(":")
        if not colon or map_type not in MAP_FILE_SUFFIX:
            raise ValueError(
                f"{spec!r}: not a Postfix table traqmilter can list; use one of "
                + ", ".join(f"{t}:/path" for t in MAP_FILE_SUFFIX)
            )
        if not os.path.isabs(path) or "\x00" in path:
            raise ValueError(f"{spec!r}: the table's path must be absolute")
        self.spec = spec
        self.config_dir = config_dir
        self.timeout = timeout
        self._postmap = postmap or find_program("postmap")
        super().__init__(
            spec,
            path + MAP_FILE_SUFFIX[map_type],
            reload_check_interval=reload_check_interval,
            clock=clock,
            background=background,
        )
        self.bare_keys = bare_keys
        self._first_load()

    def _lookup_form(self, key: str) -> str:
        return key.lower()  # Postfix folds queries of fixed-case tables too

    def _load(self) -> LoadResult:
        return list_table(
            self._postmap, self.config_dir, self.spec, timeout=self.timeout, bare=self.bare_keys
        )


def list_table(
    postmap: str | None, config_dir: str, spec: str, *, timeout: float, bare: bool = False
) -> LoadResult:
    """The keys of a table as `postmap -c CONFIG_DIR -s SPEC` lists them, folded to lower
    case as Postfix folds them. Raises OSError (and subprocess.TimeoutExpired)."""
    if postmap is None:
        raise OSError("postmap not found (install Postfix or add /usr/sbin to PATH)")
    done = subprocess.run(
        postfix_command(postmap, config_dir, "-s", spec),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise OSError(f"postmap -s {spec} failed: {reason}")
    keys: set[str] = set()
    ignored = 0
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        entry = line.split("\t", 1)[0].strip()
        key = normalise_entry(entry, fold_case=True, bare=bare) if entry else None
        if key is None:
            ignored += 1
        else:
            keys.add(key)
    return LoadResult(frozenset(keys), ignored)


class PasswdSource(_WatchedSource):
    """Postfix's unix:passwd.byname: every user name of the password database is a local
    recipient (bare keys). Read with pwd.getpwall(), so NSS sources count as Postfix's
    getpwnam() sees them; re-read when /etc/passwd changes (NSS-only users are seen at
    the next reload)."""

    def __init__(
        self,
        *,
        reload_check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        watched_path: str = "/etc/passwd",
    ) -> None:
        super().__init__(
            "unix:passwd.byname",
            watched_path,
            reload_check_interval=reload_check_interval,
            clock=clock,
            background=background,
        )
        self.bare_keys = True
        self._first_load()

    def _lookup_form(self, key: str) -> str:
        return key.lower()  # local(8) folds the local part before it looks it up

    def _load(self) -> LoadResult:
        keys: set[str] = set()
        ignored = 0
        for entry in pwd.getpwall():
            key = normalise_entry(entry.pw_name, fold_case=True, bare=True)
            if key is None:
                ignored += 1
            else:
                keys.add(key)
        return LoadResult(frozenset(keys), ignored)


class AddressListSource(_WatchedSource):
    """A plain file of known addresses: one per line ("@domain" for a whole domain),
    "#" starts a comment line or a comment after the address, blank lines are skipped."""

    def __init__(
        self,
        path: str,
        *,
        fold_case: bool = True,
        reload_check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        if not os.path.isabs(path) or "\x00" in path:
            raise ValueError(f"{path!r}: an address list's path must be absolute")
        self.path = path
        self.fold_case = fold_case
        super().__init__(
            path,
            path,
            reload_check_interval=reload_check_interval,
            clock=clock,
            background=background,
        )
        self._first_load()

    def _load(self) -> LoadResult:
        with open(self.path, encoding="utf-8") as f:
            return parse_address_list(f, fold_case=self.fold_case, name=self.path)


def parse_address_list(lines: Iterable[str], *, fold_case: bool, name: str = "") -> LoadResult:
    keys: set[str] = set()
    ignored = 0
    for number, line in enumerate(lines, 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        # An address has no unquoted white space, so what follows it must be a comment.
        trailing_ok = len(fields) == 1 or fields[1].lstrip().startswith("#")
        key = normalise_entry(fields[0], fold_case=fold_case) if trailing_ok else None
        if key is None:
            ignored += 1
            if ignored <= 3:
                log.warning("%s line %d: not an address, ignored", name, number)
        else:
            keys.add(key)
    return LoadResult(frozenset(keys), ignored)
