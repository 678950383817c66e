"""Build hook: compile policyd's hot path with mypyc.

Every metadata field lives in pyproject.toml; this file only adds the compiled modules.
mypyc turns these type-checked modules (mypy --strict, as all of traqmilter) into C
extensions from the same source: no second implementation, about a fifth less CPU per
policy request (bench/policyd_bench.py); the SQLite store's key index looks up as fast as
the set of strings it replaced (bench/directory_bench.py). Everything else stays
interpreted.

TRAQMILTER_PURE_PYTHON=1 at install time skips the compilation (and removes the compiled
modules an earlier editable install left in the tree): the same code then runs
interpreted, only slower. An editable install puts the compiled modules beside their
sources, so after editing one of HOT_PATH, install again (tests/conftest.py refuses to run
against a stale build).
"""

import os
from pathlib import Path

from setuptools import setup

HOT_PATH = [
    "traqmilter/core/address.py",
    "traqmilter/core/replies.py",
    "traqmilter/core/attack.py",
    "traqmilter/core/engine.py",
    # Outside traqmilter/directory/: mypyc checks a module's package __init__ too, and
    # that one imports psycopg, which the isolated build environment does not have.
    "traqmilter/keyindex.py",
    "policyd/codec.py",
    "policyd/adapter.py",
    "policyd/server.py",
]

GROUP = "traqmilter_hot"

ext_modules = []
if os.environ.get("TRAQMILTER_PURE_PYTHON") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_PATH, opt_level="3", group_name=GROUP)
else:
    # An earlier compiled editable install left its modules beside the sources, where
    # Python would still import them instead of the source: take them away.
    here = Path(__file__).resolve().parent
    built = [here / path for path in HOT_PATH]
    for stale in [m for p in built for m in p.parent.glob(f"{p.stem}.cpython-*.so")] + list(
        here.glob(f"{GROUP}__mypyc.cpython-*.so")
    ):
        stale.unlink()

setup(ext_modules=ext_modules)
