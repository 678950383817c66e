"""The test environment's guard: a test that uses the machine's own Postfix configuration
fails at once, with a message that says so.

A fresh Debian 12 machine has no /etc/postfix/main.cf; a developer's machine may have one,
and a test that read it would pass there and fail on the fresh one (issue 8). Tests use a
private configuration directory instead (tests/support/postfix_config.py, or the
harness's instance). A Python audit hook (PEP 578: one string comparison per event,
and monkeypatching cannot bypass it) refuses the two ways in:
- Python code opening anything under /etc/postfix;
- starting a Postfix command (postmap, postconf, postfix, sendmail, ...) that names no
  private configuration directory (-c DIR, sendmail's -C DIR, or MAIL_CONFIG) or names
  /etc/postfix: the command would read /etc/postfix/main.cf.
The hook raises SystemPostfixConfigUsed (not an OSError, so no error handling in the
product mistakes it for a missing file) and records the violation, so conftest can stop
the run. Child Python processes (the daemons tests start) install the same hook through
guard_site/sitecustomize.py, which conftest puts on PYTHONPATH; there the error goes to
the child's stderr and the child fails.

Allowed: dynamicmaps.cf and dynamicmaps.cf.d, which Postfix reads from its compiled-in
meta_directory whatever -c says (part of the installed package, not a configuration).

BUGS: a Postfix command started through a shell (shell=True, or a script that a test
writes) is not looked into; neither is a Postfix command started by a Postfix command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM_CONFIG_DIR = "/etc/postfix"
ALLOWED = frozenset({"/etc/postfix/dynamicmaps.cf", "/etc/postfix/dynamicmaps.cf.d"})
# Postfix's commands that read main.cf, and the option that names another directory.
CONFIG_OPTION = {
    **dict.fromkeys(
        (
            "postalias",
            "postcat",
            "postconf",
            "postfix",
            "postkick",
            "postlock",
            "postlog",
            "postmap",
            "postmulti",
            "postqueue",
            "postsuper",
        ),
        "-c",
    ),
    **dict.fromkeys(("sendmail", "mailq", "newaliases"), "-C"),
}
HOW_TO_FIX = (
    "tests use a private Postfix configuration directory: "
    "tests.support.postfix_config.private_postfix_config(), postfix.config_dir in a "
    "traqmilter config, or the PostfixInstance harness"
)

violations: list[str] = []


class SystemPostfixConfigUsed(RuntimeError):
    """A test used the machine's own Postfix configuration."""


def _refuse(what: str) -> None:
    message = f"test-environment guard: {what}; {HOW_TO_FIX}"
    violations.append(message)
    raise SystemPostfixConfigUsed(message)


def _is_system_config(path: str) -> bool:
    path = os.path.normpath(path)
    return (path == SYSTEM_CONFIG_DIR or path.startswith(SYSTEM_CONFIG_DIR + "/")) and not any(
        path == allowed or path.startswith(allowed + "/") for allowed in ALLOWED
    )


def check_open(path: object) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
        name = os.fsdecode(path)
        if name.startswith(SYSTEM_CONFIG_DIR) and _is_system_config(name):
            _refuse(f"a test opened {name}, the machine's own Postfix configuration")


def config_directory(argv: Sequence[str], env: Mapping[str, str] | None) -> str | None:
    """The configuration directory a Postfix command's argv (or MAIL_CONFIG) names."""
    option = CONFIG_OPTION[os.path.basename(argv[0])]
    for index, argument in enumerate(argv[1:], 1):
        if argument == "--":
            break
        if argument == option and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith(option) and len(argument) > len(option):
            return argument[len(option) :]
    environment = os.environ if env is None else env
    value = environment.get("MAIL_CONFIG")
    return value if isinstance(value, str) else None


def check_command(argv: object, env: object) -> None:
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    if not isinstance(argv, (list, tuple)) or not argv:
        return
    words = [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else "" for a in argv]
    if os.path.basename(words[0]) not in CONFIG_OPTION:
        return
    directory = config_directory(words, env if isinstance(env, Mapping) else None)
    if directory is None or os.path.realpath(directory) == SYSTEM_CONFIG_DIR:
        _refuse(
            f"`{' '.join(words)}` would read the machine's own {SYSTEM_CONFIG_DIR}/main.cf "
            f"(configuration directory: {directory or 'not given'})"
        )


def audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        check_open(args[0])
    elif event == "subprocess.Popen":  # (executable, args, cwd, env)
        check_command(args[1], args[3])
    elif event in ("os.exec", "os.posix_spawn"):  # (path, argv, env)
        check_command(args[1], args[2])


_installed = False


def install() -> None:
    """Install the audit hook in this process (once; audit hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(audit)
        _installed = True
