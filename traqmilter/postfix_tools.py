"""Postfix's own commands, run against the Postfix instance the config names.

Every Postfix command traqmilter runs goes through postfix_command(), which passes
postfix.config_dir with -c: what traqmilter reads never depends on whether (or how) the
machine's default instance in /etc/postfix is configured. Postfix still reads its
dynamic map registry (dynamicmaps.cf and dynamicmaps.cf.d, for lmdb: and sqlite:) from
its compiled-in meta_directory, whatever -c says; that is part of the installed package,
not of an instance's configuration.
"""

from __future__ import annotations

import os
import shutil

SBIN_PATH = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"


def find_program(name: str) -> str | None:
    """The path of a Postfix command (postmap, postconf, ...): PATH first, then sbin."""
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN_PATH)


def postfix_command(program: str, config_dir: str, *arguments: str) -> list[str]:
    """The argv that runs `program` against the instance whose main.cf is in config_dir."""
    return [program, "-c", config_dir, *arguments]


def main_cf_problem(config_dir: str) -> str | None:
    """Why Postfix commands cannot run against config_dir, or None when main.cf is there."""
    main_cf = os.path.join(config_dir, "main.cf")
    if os.path.isfile(main_cf):
        return None
    if not os.path.isdir(config_dir):
        return f"{config_dir} is not a directory"
    return f"{config_dir} has no main.cf (no Postfix instance is configured there)"
