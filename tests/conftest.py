"""Shared pytest fixtures: the real-Postfix harness and the outside-world capture server."""

import pytest

from tests.support.build import stale_compiled_modules
from tests.support.fixtures import capture_server, postfix_factory  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled_modules()
    if stale:
        raise pytest.UsageError(
            f"{', '.join(stale)} changed after mypyc compiled it; the tests would run the old "
            "code. Rebuild: .venv/bin/pip install -e '.[test]' (TRAQMILTER_PURE_PYTHON=1 to "
            "install without compiling)"
        )
