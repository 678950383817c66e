"""`directory.postfix: auto`: the domains and recipients an existing Postfix already knows.

At start and at every reload, discover_postfix() reads main.cf through
`postconf -c CONFIG_DIR -hx` (postfix.config_dir; $name expanded by Postfix itself) and
follows each recipient table the way traqmilter.core.postfix_conf classifies it:
- listable tables (hash, btree, lmdb, cdb, texthash, inline, ...): the existing
  PostfixMapSource, keys in memory, re-read when the file changes;
- unix:passwd.byname: PasswdSource (pwd);
- static:VALUE: every address of its class is known;
- anything else (regexp, pcre, ldap, mysql, pgsql, sqlite, tcp, socketmap): AskedTable,
  `postmap -q` per address, in a bounded pool, answers cached. An error is an error
  (lookups tempfail, check names it), never an empty table.
Each table is wrapped in a ScopedTable that limits it to the domains of its class (a bare
"user" key of local_recipient_maps is a recipient of the mydestination domains only) and
names it for `check` and `explain` ("virtual_mailbox_maps hash:/etc/postfix/vmailbox").

Without a main.cf in CONFIG_DIR there is no Postfix to read: discovery says so
(`available` False, `reason`), and the caller serves the SQLite store alone.

BUGS: an asked table costs one postmap process (a few milliseconds) per address the
cache does not hold, and policyd waits for it; a dictionary attack's fresh addresses all
miss the cache. `check` says so for each asked table; a listable copy of the table in
directory.postfix_maps, or the directory configured explicitly, avoids it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from traqmilter.core.address import AddressError, normalise_domain
from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.core.postfix_conf import (
    DOMAIN_PARAMETERS,
    LISTABLE_TYPES,
    PARAMETERS,
    TableAccess,
    TableSpec,
    is_table,
    query_keys,
    recipient_tables,
    split_list,
    strip_proxy,
)
from traqmilter.directory.maps import (
    MAP_FILE_SUFFIX,
    POSTMAP_TIMEOUT_SECONDS,
    PasswdSource,
    PostfixMapSource,
    list_table,
)
from traqmilter.postfix_tools import find_program, main_cf_problem, postfix_command

log = logging.getLogger("traqmilter.directory")

POSTCONF_TIMEOUT_SECONDS = 30.0
QUERY_TIMEOUT_SECONDS = 10.0  # one postmap -q; beyond it the lookup tempfails
QUERY_WORKERS = 4  # postmap -q processes at once, whatever number of sessions ask
QUERY_CACHE_ENTRIES = 10000


class FixedKeys:
    """Keys known once and for all: an inline: table (listed once) or static: (every key)."""

    def __init__(self, name: str, keys: frozenset[str], *, everything: bool = False) -> None:
        self.name = name
        self.keys = keys
        self.everything = everything

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, key: str) -> bool:
        if self.everything or key in self.keys:
            return True
        at = key.rfind("@")
        return at > 0 and (key[at:] in self.keys or key[:at] in self.keys)

    def close(self) -> None:
        pass


class AskedTable:
    """A table that cannot be listed, asked with `postmap -c DIR -q KEY TABLE` for the keys
    Postfix would look up. QUERY_WORKERS processes at most run at once; answers (found or
    not) are remembered for cache_seconds, QUERY_CACHE_ENTRIES at most."""

    def __init__(
        self,
        table: str,
        *,
        config_dir: str,
        local_domains: frozenset[str],
        pool: concurrent.futures.ThreadPoolExecutor,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        postmap: str | None = None,
        timeout: float = QUERY_TIMEOUT_SECONDS,
    ) -> None:
        self.name = table
        self.table = table
        self.map_type = table.partition(":")[0]
        self.config_dir = config_dir
        self.local_domains = local_domains
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.last_error: str | None = None
        self._pool = pool
        self._clock = clock
        self._postmap = postmap or find_program("postmap")
        self._cache: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def contains(self, key: str) -> bool:
        key = key.lower()  # Postfix folds the address before it asks a table
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        domain = key.rpartition("@")[2]
        keys = query_keys(key, local=domain in self.local_domains, map_type=self.map_type)
        try:
            found = self._pool.submit(self._ask, keys).result(self.timeout * len(keys) + 1)
        except (
            OSError,
            subprocess.SubprocessError,
            concurrent.futures.TimeoutError,
            concurrent.futures.CancelledError,  # the pool ended by a reload meanwhile
            RuntimeError,  # submitted after that
        ) as exc:
            self.last_error = str(exc) or type(exc).__name__
            raise DirectoryUnavailable(f"{self.name}: {self.last_error}") from None
        self.last_error = None
        with self._lock:
            if len(self._cache) >= QUERY_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = (found, now + self.cache_seconds)
        return found

    def _ask(self, keys: Sequence[str]) -> bool:
        if self._postmap is None:
            raise OSError("postmap not found (install Postfix or add /usr/sbin to PATH)")
        for key in keys:
            done = subprocess.run(
                postfix_command(self._postmap, self.config_dir, "-q", key, self.table),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
            errors = [
                line
                for line in done.stderr.decode("utf-8", "replace").splitlines()
                if "fatal:" in line or "error:" in line
            ]
            if done.returncode == 0 and not errors:
                return True
            # postmap -q exits 1 both for "not found" and for a table it cannot open;
            # only a clean exit 1 means not found.
            if done.returncode != 1 or errors:
                reason = errors[-1] if errors else f"exit status {done.returncode}"
                raise OSError(f"postmap -q failed: {reason}")
        return False

    def close(self) -> None:
        pass  # the pool belongs to the discovery

    def probe(self) -> None:
        """Ask once for an address that cannot exist, so an unreachable table is named at
        start (and by check) instead of at the first unknown recipient."""
        with contextlib.suppress(DirectoryUnavailable):
            self.contains("traqmilter-probe@probe.invalid")


@dataclass
class ScopedTable:
    """One recipient table of main.cf, asked only about the domains of its class."""

    spec: TableSpec
    source: PostfixMapSource | PasswdSource | FixedKeys | AskedTable
    domains: frozenset[str] | None  # None: every served domain (virtual_alias_maps)

    @property
    def name(self) -> str:
        return f"{self.spec.parameter} {self.spec.spec}"

    def contains(self, key: str) -> bool:
        if self.domains is not None and key.rpartition("@")[2] not in self.domains:
            return False
        return self.source.contains(key)

    def close(self) -> None:
        self.source.close()

    @property
    def last_error(self) -> str | None:
        return getattr(self.source, "last_error", None)

    def describe(self) -> str:
        """How the table is followed, for `traqmilter check`."""
        source = self.source
        access = self.spec.access
        if self.last_error:
            state = f"UNAVAILABLE: {self.last_error} (lookups tempfail until it answers)"
        elif access is TableAccess.ASKED:
            state = (
                "cannot be listed: each address is asked with postmap -q (a process per "
                "uncached address; list the recipients explicitly for speed)"
            )
        elif access is TableAccess.STATIC:
            state = "static: every address of its domains is known"
        elif access is TableAccess.PASSWD:
            state = f"{len(source)} users (pwd)"  # type: ignore[arg-type]
        else:
            state = f"{len(source)} keys (postmap -s)"  # type: ignore[arg-type]
        return f"{self.name}: {state}"


@dataclass
class PostfixDiscovery:
    """What `directory.postfix: auto` found in one Postfix configuration directory."""

    config_dir: str
    available: bool = False
    reason: str = ""  # why nothing was discovered (available False)
    local_domains: tuple[str, ...] = ()  # mydestination
    virtual_mailbox_domains: tuple[str, ...] = ()
    virtual_alias_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()  # never served; outbox only, explicitly
    tables: list[ScopedTable] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be followed
    pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def served_domains(self) -> tuple[str, ...]:
        """The local domains traqmilter serves for this Postfix, in main.cf order."""
        seen: dict[str, None] = {}
        for domain in (
            *self.local_domains,
            *self.virtual_mailbox_domains,
            *self.virtual_alias_domains,
        ):
            seen.setdefault(domain, None)
        return tuple(seen)

    def summary(self) -> list[str]:
        """What was discovered, one line each, for `traqmilter check` and the log."""
        if not self.available:
            return [f"postfix: {self.config_dir}: {self.reason}"]
        lines = [f"postfix: {self.config_dir}/main.cf (read with postconf)"]
        for label, domains in (
            ("local domains (mydestination)", self.local_domains),
            ("virtual mailbox domains", self.virtual_mailbox_domains),
            ("virtual alias domains", self.virtual_alias_domains),
            ("relay domains (not served as local; action outbox only)", self.relay_domains),
        ):
            lines.append(f"  {label}: {', '.join(domains) if domains else '(none)'}")
        lines.append(f"  recipient tables: {len(self.tables)}")
        lines.extend(f"    {table.describe()}" for table in self.tables)
        lines.extend(f"  note: {problem}" for problem in self.problems)
        return lines

    def close(self) -> None:
        for table in self.tables:
            table.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def read_postconf(
    config_dir: str, names: Sequence[str], *, postconf: str | None = None
) -> dict[str, str]:
    """The values of main.cf parameters, $name expanded, as the instance in config_dir
    has them (defaults included). Raises OSError."""
    program = postconf or find_program("postconf")
    if program is None:
        raise OSError("postconf not found (install Postfix or add /usr/sbin to PATH)")
    try:
        done = subprocess.run(
            postfix_command(program, config_dir, "-hx", *names),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=POSTCONF_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.SubprocessError as exc:
        raise OSError(f"postconf: {exc}") from None
    values = done.stdout.decode("utf-8", "replace").splitlines()
    if done.returncode != 0 or len(values) != len(names):
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise OSError(f"postconf -c {config_dir} failed: {reason}")
    return dict(zip(names, (value.strip() for value in values), strict=True))


def discover_postfix(
    config_dir: str,
    *,
    reload_check_interval: float,
    clock: Callable[[], float] = time.monotonic,
) -> PostfixDiscovery:
    """Read the Postfix instance in config_dir and open a source for each recipient table.
    Never raises for what it cannot follow: that goes to `problems` (and the lookups it
    concerns tempfail), or, with no main.cf at all, to `reason`."""
    discovery = PostfixDiscovery(config_dir)
    missing = main_cf_problem(config_dir)
    if missing:
        discovery.reason = missing
        return discovery
    try:
        values = read_postconf(config_dir, PARAMETERS)
    except OSError as exc:
        discovery.reason = str(exc)
        return discovery
    discovery.available = True
    postmap = find_program("postmap")
    domains: dict[str, tuple[str, ...]] = {}
    for parameter in DOMAIN_PARAMETERS:
        domains[parameter] = _domain_list(
            parameter, values[parameter], config_dir, postmap, discovery.problems
        )
    discovery.local_domains = domains["mydestination"]
    discovery.virtual_mailbox_domains = domains["virtual_mailbox_domains"]
    discovery.virtual_alias_domains = domains["virtual_alias_domains"]
    # A domain of another class as well is of that class (Postfix resolves the local and
    # virtual classes first; with compatibility_level < 2, relay_domains = $mydestination).
    served = set(discovery.served_domains)
    discovery.relay_domains = tuple(d for d in domains["relay_domains"] if d not in served)
    local = frozenset(discovery.local_domains)
    scope = {
        "local_recipient_maps": local,
        "virtual_mailbox_maps": frozenset(discovery.virtual_mailbox_domains),
        "virtual_alias_maps": None,
    }
    specs = recipient_tables(values)
    if not values["local_recipient_maps"] and local:
        # Postfix's documented meaning of an empty local_recipient_maps: every address
        # of the local domains is accepted; traqmilter must not call one unknown.
        specs.append(
            TableSpec("local_recipient_maps", "(empty)", "static:(empty)", TableAccess.STATIC)
        )
    try:
        for spec in specs:
            source = _open_table(
                spec,
                config_dir=config_dir,
                local=local,
                discovery=discovery,
                reload_check_interval=reload_check_interval,
                clock=clock,
            )
            if source is not None:
                discovery.tables.append(ScopedTable(spec, source, scope[spec.parameter]))
    except BaseException:
        discovery.close()
        raise
    for table in discovery.tables:
        if isinstance(table.source, AskedTable):
            table.source.probe()
    return discovery


def _open_table(
    spec: TableSpec,
    *,
    config_dir: str,
    local: frozenset[str],
    discovery: PostfixDiscovery,
    reload_check_interval: float,
    clock: Callable[[], float],
) -> PostfixMapSource | PasswdSource | FixedKeys | AskedTable | None:
    bare = spec.parameter == "local_recipient_maps"
    if spec.access is TableAccess.PASSWD:
        return PasswdSource(reload_check_interval=reload_check_interval, clock=clock)
    if spec.access is TableAccess.STATIC:
        return FixedKeys(spec.table, frozenset(), everything=True)
    if spec.access is TableAccess.LISTED:
        if spec.map_type in MAP_FILE_SUFFIX:
            try:
                return PostfixMapSource(
                    spec.table,
                    config_dir=config_dir,
                    reload_check_interval=reload_check_interval,
                    clock=clock,
                    bare_keys=bare,
                )
            except ValueError as exc:  # a relative path: Postfix would not open it either
                discovery.problems.append(f"{spec.parameter}: {exc}")
                return None
        try:  # inline:{...}: no file to follow; listed once per start or reload
            result = list_table(
                find_program("postmap"),
                config_dir,
                spec.table,
                timeout=POSTMAP_TIMEOUT_SECONDS,
                bare=bare,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            discovery.problems.append(f"{spec.parameter} {spec.spec}: {exc}")
        else:
            return FixedKeys(spec.table, result.keys)
    return AskedTable(
        spec.table,
        config_dir=config_dir,
        local_domains=local,
        pool=_pool(discovery),
        cache_seconds=reload_check_interval,
        clock=clock,
    )


def _pool(discovery: PostfixDiscovery) -> concurrent.futures.ThreadPoolExecutor:
    if discovery.pool is None:
        discovery.pool = concurrent.futures.ThreadPoolExecutor(
            QUERY_WORKERS, thread_name_prefix="postmap-q"
        )
    return discovery.pool


def _domain_list(
    parameter: str, value: str, config_dir: str, postmap: str | None, problems: list[str]
) -> tuple[str, ...]:
    """The domain names of a main.cf domain list: names, /file/name lists and listable
    tables; an element that names no domain traqmilter can enumerate is a problem."""
    found: dict[str, None] = {}
    for item in split_list(value):
        names: list[str]
        if item.startswith("/"):
            try:
                with open(item, encoding="utf-8") as f:
                    names = split_list(
                        " ".join(line for line in f if not line.lstrip().startswith("#"))
                    )
            except (OSError, UnicodeError) as exc:
                problems.append(f"{parameter}: {item}: {exc}")
                continue
        elif is_table(item):
            table = strip_proxy(item)
            if table.partition(":")[0] not in LISTABLE_TYPES:
                problems.append(
                    f"{parameter}: {item} cannot be listed, so the domains it declares "
                    "are not served; if it declares any, name them under `domains`"
                )
                continue
            try:
                listed = list_table(postmap, config_dir, table, timeout=60, bare=True).keys
                # A recipient table used as a domain list (the defaults $virtual_*_maps):
                # Postfix looks the domain up as a key, so only keys without @ declare one.
                names = [key for key in listed if "@" not in key]
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"{parameter}: {item}: {exc}")
                continue
        else:
            names = [item]
        for name in names:
            try:
                found.setdefault(normalise_domain(name.lstrip(".")), None)
            except AddressError:
                problems.append(f"{parameter}: {name!r} is not a domain name, ignored")
    return tuple(found)
