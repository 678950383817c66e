"""The installed hot path is the compiled one (unless installed with TRAQMILTER_PURE_PYTHON)."""

import importlib
import os

from tests.support.build import hot_path_modules


def test_hot_path_is_compiled_as_installed() -> None:
    pure = os.environ.get("TRAQMILTER_PURE_PYTHON") == "1"
    modules = hot_path_modules()
    assert "traqmilter.core.engine" in modules and "policyd.codec" in modules
    for name in modules:
        location = importlib.import_module(name).__file__ or ""
        assert location.endswith(".py") == pure, (name, location)
