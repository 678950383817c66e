"""What setup.py compiles, and whether the compiled modules are current."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def hot_path_modules() -> list[str]:
    """The dotted names of setup.py's HOT_PATH (read, not run: setup.py builds)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "HOT_PATH" for target in node.targets
        ):
            paths = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise AssertionError("setup.py has no HOT_PATH list")


def stale_compiled_modules() -> list[str]:
    """Sources edited after their compiled module was built: tests would run old code."""
    stale = []
    for package in ("traqmilter", "policyd"):
        for compiled in (ROOT / package).rglob("*.so"):
            source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
            if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
                stale.append(str(source.relative_to(ROOT)))
    return sorted(stale)
