"""The config file and bounce templates must be writable only by root and the daemon's own
user (traqmilter.file_trust), checked by `traqmilter check`, at start and at reload, with a
message that names the file and its mode."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fixtures import open_tmp_dir
from traqmilter.cli import main
from traqmilter.config import ConfigError, load_config
from traqmilter.core.settings import Config, DaemonSettings
from traqmilter.file_trust import trusted_uids, untrusted_file_problem
from traqmilter.runtime import StartupError, open_runtime

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other users needs root")
NOBODY = pwd.getpwnam("nobody").pw_uid
ROOT = frozenset({0})


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory owned by root, mode 0755, below /tmp (sticky, world-writable)."""
    with open_tmp_dir("traqmilter-trust-") as path:
        yield path


def write(path: Path, text: str = "x", mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_file_only_root_can_write_is_trusted(base: Path) -> None:
    for mode in (0o644, 0o600, 0o640, 0o444):
        assert untrusted_file_problem(str(write(base / "f", mode=mode)), ROOT) is None


@pytest.mark.parametrize(
    ("mode", "words"),
    [(0o666, "is world-writable, mode 0666"), (0o664, "is group-writable, mode 0664")],
)
def test_a_writable_file_is_refused_with_its_name_and_mode(
    base: Path, mode: int, words: str
) -> None:
    path = write(base / "bounce.txt.j2", mode=mode)
    assert untrusted_file_problem(str(path), ROOT) == (
        f"{path}: {words}; only root and the daemon's user may be able to write it"
    )


@ROOT_ONLY
def test_a_file_of_another_user_is_refused_unless_that_is_the_daemons_user(base: Path) -> None:
    path = write(base / "f")
    os.chown(path, NOBODY, -1)
    assert untrusted_file_problem(str(path), ROOT) == (
        f"{path}: is owned by uid {NOBODY} (nobody), mode 0644; only root and the "
        "daemon's user may be able to write it"
    )
    daemon = Config(daemon=DaemonSettings(user="nobody"))
    assert untrusted_file_problem(str(path), trusted_uids(daemon)) is None


def test_a_directory_others_can_write_is_refused_unless_sticky(base: Path) -> None:
    directory = base / "etc"
    directory.mkdir()
    path = write(directory / "traqmilter.yaml")
    directory.chmod(0o777)
    assert untrusted_file_problem(str(path), ROOT) == (
        f"{path}: its directory {directory} is world-writable, mode 0777, so another user "
        "can replace the file; only root and the daemon's user may be able to write there"
    )
    directory.chmod(0o1777)  # like /tmp: only the owner may rename or remove the file
    assert untrusted_file_problem(str(path), ROOT) is None


def test_a_symbolic_link_is_judged_by_the_file_it_names(base: Path) -> None:
    target = write(base / "real.j2", mode=0o666)
    link = base / "link.j2"
    link.symlink_to(target)
    problem = untrusted_file_problem(str(link), ROOT)
    assert problem is not None and problem.startswith(f"{link} (-> {target}): is world-writable")


# --- where the checks apply


def config_text(base: Path, extra: str = "") -> str:
    return (
        f"state_dir: {base}/state\ndirectory: {{sqlite: {base}/d.sqlite}}\n"
        f"queue: {{directory: {base}/spool}}\n"
        "domains:\n  example.com: {}\n"
        f"  bounce.example: {{action: bounce, bounce_template: {base}/bounce.txt.j2}}\n"
        f"{extra}"
    )


@pytest.fixture
def site(base: Path) -> Path:
    """A servable config whose bounce template is ours: root-owned, 0644."""
    write(base / "bounce.txt.j2", "Your mail to {{ recipients | join(', ') }} failed.\n")
    config = write(base / "traqmilter.yaml", config_text(base))
    assert main(["-c", str(config), "mailbox", "add", "postmaster@example.com"]) == 0
    assert main(["-c", str(config), "mailbox", "add", "postmaster@bounce.example"]) == 0
    assert main(["-c", str(config), "check"]) == 0
    return config


def test_load_config_refuses_a_world_writable_config(site: Path) -> None:
    site.chmod(0o666)
    with pytest.raises(ConfigError) as refused:
        load_config(str(site))
    assert str(refused.value) == (
        f"{site}: {site}: is world-writable, mode 0666; only root and the daemon's user "
        "may be able to write it"
    )


def test_check_refuses_the_config_and_the_template(
    site: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    site.chmod(0o664)
    assert main(["-c", str(site), "check"]) == 2
    assert "is group-writable, mode 0664" in capsys.readouterr().err
    site.chmod(0o644)
    (base / "bounce.txt.j2").chmod(0o666)
    assert main(["-c", str(site), "check"]) == 2
    err = capsys.readouterr().err
    assert (
        f"traqmilter: fatal: domains.bounce.example.bounce_template: {base}/bounce.txt.j2: "
        "is world-writable, mode 0666; only root and the daemon's user may be able to write it"
    ) in err.splitlines()


def test_start_and_reload_refuse_an_untrusted_template(site: Path, base: Path) -> None:
    template = base / "bounce.txt.j2"
    runtime = open_runtime(load_config(str(site)))
    try:
        template.chmod(0o646)
        with pytest.raises(StartupError, match=r"bounce_template: .* is world-writable, mode 0646"):
            runtime.reload(str(site))
        assert runtime.config.domains["bounce.example"].bounce_template == str(template)
        with pytest.raises(StartupError, match="world-writable"):
            open_runtime(load_config(str(site)))  # what a daemon does at start
    finally:
        runtime.close()


@ROOT_ONLY
def test_exception_templates_are_checked_too(site: Path, base: Path) -> None:
    other = write(base / "other.j2", "Undeliverable.\n")
    os.chown(other, NOBODY, -1)
    site.write_text(
        config_text(
            base,
            f'exceptions:\n  "sales-*@example.com": {{action: bounce, bounce_template: {other}}}\n',
        )
    )
    with pytest.raises(StartupError, match=r"exceptions.sales-\*@example.com.bounce_template: "):
        open_runtime(load_config(str(site)))


def test_the_message_in_the_docs_is_the_one_given(base: Path) -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "bounce-template.md"
    (documented,) = [
        line
        for line in page.read_text().splitlines()
        if line.startswith("domains.old.example.bounce_template: ")
    ]
    path = write(base / "bounce.txt.j2", mode=0o666)
    given = untrusted_file_problem(str(path), ROOT)
    assert given is not None
    assert documented == "domains.old.example.bounce_template: " + given.replace(
        str(path), "/etc/traqmilter/bounce.txt.j2"
    )
