"""PostgresCluster: a private PostgreSQL server for tests, never the machine's own.

initdb makes a cluster in a fresh temp directory; `postgres` runs in the foreground as a
child of the test process (its pid is ours to stop), on 127.0.0.1 at a free port and on a
unix socket inside the temp directory. PostgreSQL refuses to run as root: as root, the
cluster belongs to the Debian `postgres` user and the server is started through setpriv
(which execs, so the pid we hold is the postmaster's). The server dies with the test run
even when pytest is killed: it gets SIGINT, its fast shutdown (tests/support/children.py).

Authentication is as a deployment would have it: the superuser connects over the unix
socket (trust, local only), every other role over TCP with a scram-sha-256 password.
Durability is off (fsync, synchronous_commit): a test cluster is thrown away.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import children
from tests.support.fixtures import require
from tests.support.postfix import free_loopback_port

SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.02


def postgres_bindir() -> Path | None:
    """Where initdb and postgres are (Debian: /usr/lib/postgresql/VERSION/bin), newest
    version first; None when PostgreSQL is not installed."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    return candidates[0].parent if candidates else None


def postgres_unavailable_reason() -> str | None:
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "no `postgres` user to run the server as (apt-get install postgresql)"
    return None


class PostgresCluster:
    """A private cluster below `root` (made and removed by the caller). Use as a context
    manager, or start() and stop(); stop() and start() may alternate (an outage)."""

    def __init__(self, root: Path) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed")
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.log_path = root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_loopback_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = pwd.getpwnam(SUPERUSER) if os.geteuid() == 0 else None
        self._roles: set[str] = set()

    # --- life cycle

    def _owner_options(self) -> list[str]:
        """setpriv's options that run a program as the cluster's owner (none unless root)."""
        if self._owner is None:
            return []
        return [f"--reuid={self._owner.pw_uid}", f"--regid={self._owner.pw_gid}", "--init-groups"]

    def _as_owner(self, argv: list[str]) -> list[str]:
        options = self._owner_options()
        return ["setpriv", *options, "--", *argv] if options else argv

    def init(self) -> None:
        self.root.chmod(0o755)
        for directory in (self.data, self.socket_dir):
            directory.mkdir(mode=0o700)
        if self._owner is not None:
            for path in (self.data, self.socket_dir):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        subprocess.run(
            self._as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
            cwd="/",
        )

    def start(self) -> PostgresCluster:
        if self._process is not None:
            raise RuntimeError("already started")
        if not (self.data / "PG_VERSION").exists():
            self.init()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes it until stop()
        with log:
            self._process = children.spawn(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    f"port={self.port}",
                    "-c",
                    f"unix_socket_directories={self.socket_dir}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                credentials=self._owner_options(),
                death_signal=signal.SIGINT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd="/",
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log_text()[-4000:]}")
            try:
                psycopg.connect(self.admin_conninfo(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready in {START_TIMEOUT_SECONDS} s:\n"
                        f"{self.log_text()[-4000:]}"
                    ) from None
                time.sleep(POLL_SECONDS * 5)

    def stop(self, *, mode: signal.Signals = signal.SIGINT) -> None:
        """Stop the server (SIGINT: fast shutdown; SIGQUIT: immediate, as a crash) and wait
        until every process of it has gone (its backends are in its process group); safe
        to call more than once."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed then
            children.stop(process, mode, timeout=STOP_TIMEOUT_SECONDS)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- roles and databases

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """The superuser over the unix socket (trust: local only)."""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def conninfo(self, user: str, password: str, dbname: str) -> str:
        """A password role over loopback TCP, as a deployment connects."""
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def admin(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit: CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(self.admin_conninfo(dbname), autocommit=True) as conn:
            conn.execute(statement.encode())

    def ensure_role(self, name: str, password: str) -> None:
        if name not in self._roles:
            self.admin(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
            self._roles.add(name)

    def create_database(self, name: str, owner: str) -> None:
        self.admin(f"CREATE DATABASE {name} OWNER {owner}")

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def private_cluster() -> Iterator[PostgresCluster]:
    """A started cluster in a fresh temp directory; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="traqmilter-postgres-"))
    try:
        with PostgresCluster(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- pytest fixtures (imported into tests/conftest.py) ---------------------------------

OWNER_ROLE, OWNER_PASSWORD = "traqmilter", "traqmilter-test-secret"
READER_ROLE, READER_PASSWORD = "postfix_reader", "reader-test-secret"
_database_numbers = itertools.count(1)


def require_postgres() -> None:
    """A private PostgreSQL can run (Debian postgresql, installed by scripts/setup --test)."""
    require(postgres_unavailable_reason())


@dataclass(frozen=True)
class PgDatabase:
    """A fresh database of the session's cluster, with traqmilter's schema applied."""

    cluster: PostgresCluster
    name: str

    @property
    def conninfo(self) -> str:
        """traqmilter's role (owner: reads and writes), over loopback TCP."""
        return self.cluster.conninfo(OWNER_ROLE, OWNER_PASSWORD, self.name)

    @property
    def reader_conninfo(self) -> str:
        """A read-only role, as Postfix's pgsql: maps use."""
        return self.cluster.conninfo(READER_ROLE, READER_PASSWORD, self.name)


def new_database(cluster: PostgresCluster, *, migrate: bool = True) -> PgDatabase:
    """Create a database owned by traqmilter's role (the roles are made on first use),
    apply the schema with traqmilter's own migration, and let the reader SELECT."""
    from traqmilter.directory.postgresql import migrate as apply_schema

    cluster.ensure_role(OWNER_ROLE, OWNER_PASSWORD)
    cluster.ensure_role(READER_ROLE, READER_PASSWORD)
    database = PgDatabase(cluster, f"traqmilter_test_{os.getpid()}_{next(_database_numbers)}")
    cluster.create_database(database.name, OWNER_ROLE)
    if migrate:
        apply_schema(database.conninfo)
        cluster.admin(
            f"GRANT SELECT ON domains, mailboxes, aliases TO {READER_ROLE}", database.name
        )
    return database


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private cluster for the whole session (start-up is paid once)."""
    require_postgres()
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_database(postgres_cluster: PostgresCluster) -> Iterator[PgDatabase]:
    """A fresh, migrated database for one test; dropped afterwards."""
    database = new_database(postgres_cluster)
    yield database
    postgres_cluster.drop_database(database.name)
