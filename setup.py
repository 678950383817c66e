"""Build hook: compile policyd's hot path with mypyc.

Every metadata field lives in pyproject.toml; this file only adds the compiled modules.
mypyc turns these type-checked modules (mypy --strict, as all of traqmilter) into C
extensions from the same source: no second implementation, about a fifth less CPU per
policy request (bench/policyd_bench.py). Everything else stays interpreted.

TRAQMILTER_PURE_PYTHON=1 at install time skips the compilation: the same code then runs
interpreted, only slower. An editable install puts the compiled modules beside their
sources, so after editing one of HOT_PATH, install again (tests/conftest.py refuses to run
against a stale build).
"""

import os

from setuptools import setup

HOT_PATH = [
    "traqmilter/core/address.py",
    "traqmilter/core/replies.py",
    "traqmilter/core/attack.py",
    "traqmilter/core/engine.py",
    "policyd/codec.py",
    "policyd/adapter.py",
    "policyd/server.py",
]

ext_modules = []
if os.environ.get("TRAQMILTER_PURE_PYTHON") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_PATH, opt_level="3", group_name="traqmilter_hot")

setup(ext_modules=ext_modules)
