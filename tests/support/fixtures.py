"""pytest fixtures for tests against a real Postfix (import them into tests/conftest.py).

- `capture_server`: a running CaptureServer (the outside world), per test.
- `redis_server` (one per session) and `redis_prefix` (one per test): a private Redis.
- `postfix_factory`: builds PostfixInstance objects in fresh 0755 directories, starts them,
  and stops and removes them all at teardown, whatever the test did.
require() stops a test whose real part is missing: a failure as root (CI), a skip otherwise;
require_sendmail() and require_postfix() use it; require_postfix() and postfix_root() also
serve module-scoped fixtures that start one Postfix for many tests
(`with PostfixInstance(...) as postfix:`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.capture import CaptureServer
from tests.support.postfix import PostfixInstance, postfix_unavailable_reason
from tests.support.redis_server import RedisServer
from tests.support.sendmail import sendmail_unavailable_reason


def require(reason: str | None) -> None:
    """Stop the calling test when a real part it needs is missing (`reason` says which).
    As root, as CI runs, `scripts/setup --test` installs every part, so a missing one fails
    the test: a skip would hide it. Only a developer without root, who cannot run a private
    Postfix, Sendmail or PostgreSQL at all, sees a skip."""
    if reason is None:
        return
    if os.geteuid() != 0:
        pytest.skip(reason)
    pytest.fail(reason)


def require_postfix() -> None:
    """A private Postfix can run: root, Debian postfix and postfix-sqlite installed."""
    require(postfix_unavailable_reason())


def require_sendmail() -> None:
    """A private Sendmail can run: root, and Debian's Sendmail unpacked by
    `scripts/setup --test`."""
    require(sendmail_unavailable_reason())


@contextlib.contextmanager
def open_tmp_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp (sticky, world-writable), owned by us, mode 0755: other
    users (Postfix's unprivileged daemons, a daemon that dropped root) can reach what is in
    it, which they cannot below pytest's tmp_path (a 0700 directory). Removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def postfix_root() -> contextlib.AbstractContextManager[Path]:
    """A directory for a private Postfix instance (open_tmp_dir)."""
    return open_tmp_dir("traqmilter-postfix-")


class PostfixFactory(Protocol):
    def __call__(self, *, sqlite_path: Path, **settings: Any) -> PostfixInstance: ...


@pytest.fixture
def capture_server() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


@pytest.fixture
def postfix_factory(capture_server: CaptureServer) -> Iterator[PostfixFactory]:
    """Start PostfixInstances relaying to `capture_server` (relay_port may be overridden);
    each gets its own directory. All are stopped and removed at teardown."""
    require_postfix()
    with contextlib.ExitStack() as stack:

        def start(*, sqlite_path: Path, **settings: Any) -> PostfixInstance:
            root = stack.enter_context(postfix_root())
            settings.setdefault("relay_port", capture_server.port)
            return stack.enter_context(
                PostfixInstance(root / "postfix", sqlite_path=sqlite_path, **settings)
            )

        yield start


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session (tests that stop or pause Redis make
    their own). Tests keep apart by key prefix: `redis_prefix`."""
    with RedisServer(tcp=True) as server:
        yield server


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses."""
    return f"t{next(_prefixes)}-{request.node.name[:40]}:"


_prefixes = itertools.count()
