"""Loaded by every Python process the tests start (conftest puts this directory on
PYTHONPATH): installs the test-environment guard of tests/support/etc_guard.py there too."""

import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc_guard.py")
_spec = importlib.util.spec_from_file_location("_traqmilter_test_etc_guard", _path)
if _spec is not None and _spec.loader is not None:
    _guard = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _guard
    _spec.loader.exec_module(_guard)
    _guard.install()
