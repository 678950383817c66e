"""Shared pytest fixtures: the real-Postfix harness and the outside-world capture server;
the test-environment guard (tests/support/etc_guard.py) for this process and its children."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import etc_guard
from tests.support.build import stale_compiled_modules
from tests.support.fixtures import (  # noqa: F401
    capture_server,
    postfix_factory,
    redis_prefix,
    redis_server,
)
from tests.support.hook import on_create_hooks  # noqa: F401
from tests.support.postgresql import pg_database, postgres_cluster  # noqa: F401

GUARD_SITE = Path(__file__).resolve().parent / "support" / "guard_site"


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled_modules()
    if stale:
        raise pytest.UsageError(
            f"{', '.join(stale)} changed after mypyc compiled it; the tests would run the old "
            "code. Rebuild: .venv/bin/pip install -e '.[test]' (TRAQMILTER_PURE_PYTHON=1 to "
            "install without compiling)"
        )
    etc_guard.install()
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD_SITE), *filter(None, [inherited])])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Stop the run after a test that used the machine's Postfix configuration, even if the
    test (or the code under test) caught the guard's error; checked once its fixtures are
    torn down (tests of the guard itself forget what they tripped on purpose)."""
    yield
    if call.when == "teardown" and etc_guard.violations:
        item.session.shouldfail = etc_guard.violations[0]
