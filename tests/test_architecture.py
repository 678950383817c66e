"""The layering promises of STYLE.md, checked: the core is pure, policyd needs no milter."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_policyd_process_loads_no_milter_template_or_dsn_code() -> None:
    # policyd's process imports the cli, the daemon runner and its own main (a fresh
    # interpreter: this test process has imported everything). It decides and routes; it
    # never renders or submits a DSN, so none of that code may be loaded in it.
    probe = (
        "import sys, traqmilter.cli, traqmilter.daemons, policyd.main\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "policyd.server" in loaded and "traqmilter.core.engine" in loaded
    forbidden = {"jinja2", "smtplib", "Milter", "traqmilter.core.dsn", "traqmilter.core.template"}
    forbidden |= {"traqmilter.core.plan", "traqmilter.templates"}
    assert not loaded & forbidden
    assert not [m for m in loaded if m.startswith("traqmilter.milter")]
