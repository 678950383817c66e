"""Files traqmilter takes instructions from must not be writable by anyone but root and
the daemon's own user, as Postfix's `postfix check` and OpenSSH's StrictModes demand.

The config file decides where mail goes, and a bounce template is text mailed to
strangers under this server's name: whoever can rewrite either can redirect mail or send
spam from here. So the config (at load: `check`, start, reload, every command) and each
bounce template (at `check`, start and reload) are refused when the file, or a directory
above it, is owned by another user or is group- or world-writable. A world-writable
directory with the sticky bit (/tmp) is accepted: there only a file's owner can rename
or remove it, and the file itself is checked.

BUGS: checked when the file is loaded; a template is read again for each DSN, and a
change of its mode between two reloads is only seen at the next reload or `check`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat

from traqmilter.core.settings import Config


def trusted_uids(config: Config) -> frozenset[int]:
    """root, the user this process runs as, and `daemon.user` (whom a daemon started as
    root becomes)."""
    uids = {0, os.geteuid()}
    if config.daemon.user:
        # An unknown user stops start-up elsewhere (daemonize.resolve_identity).
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(config.daemon.user).pw_uid)
    return frozenset(uids)


def untrusted_file_problem(path: str, trusted: frozenset[int]) -> str | None:
    """Why another user could change the file at `path` (None: nobody else can). A file
    that cannot be read is left to the reader's own error."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return None
    shown = path if real == path else f"{path} (-> {real})"
    problem = _writable_by_others(info, trusted, sticky_ok=False)
    if problem:
        return f"{shown}: {problem}; only root and the daemon's user may be able to write it"
    directory = os.path.dirname(real)
    while True:
        try:
            info = os.stat(directory)
        except OSError:
            return None
        problem = _writable_by_others(info, trusted, sticky_ok=True)
        if problem:
            return (
                f"{shown}: its directory {directory} {problem}, so another user can replace "
                "the file; only root and the daemon's user may be able to write there"
            )
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _writable_by_others(info: os.stat_result, trusted: frozenset[int], *, sticky_ok: bool) -> str:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in trusted:
        return f"is owned by {_user(info.st_uid)}, mode 0{mode:03o}"
    if mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX):
        writable = "world-writable" if mode & 0o002 else "group-writable"
        return f"is {writable}, mode 0{mode:03o}"
    return ""


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
