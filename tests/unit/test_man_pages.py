"""The man pages follow the code: traqmilter.yaml(5) is generated from the declarations,
traqmilter(8) names every command of the CLI parser."""

import argparse
import re
from pathlib import Path

from traqmilter.cli import build_parser
from traqmilter.config_reference import keys, render_man

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"


def test_config_man_page_is_up_to_date() -> None:
    assert (MAN / "traqmilter.yaml.5").read_text() == render_man(), (
        "docs/man/traqmilter.yaml.5 is stale: regenerate it with"
        " python -m traqmilter.config_reference --man > docs/man/traqmilter.yaml.5"
    )


def test_config_man_page_names_every_key() -> None:
    text = (MAN / "traqmilter.yaml.5").read_text()
    for key in keys():
        request = ".SS " if key.kind == "section" else ".B "
        assert request + key.path.replace("-", "\\-") + "\n" in text, key.path


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command of the parser, sub-commands as "mailbox add"."""
    found: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found.append(prefix + name)
                found += _commands(subparser, f"{prefix}{name} ")
    return found


def _commands_section(page: str) -> str:
    return page.split(".SH COMMANDS\n", 1)[1].split("\n.SH ", 1)[0]


def test_command_man_page_describes_every_command() -> None:
    section = _commands_section((MAN / "traqmilter.8").read_text())
    # The term of each entry, fonts removed: "explain address [--sender ...]".
    terms = [
        re.sub(r"\\f[BIRP]|^\.B[IR]? ", "", line).replace("\\-", "-")
        for previous, line in zip(section.splitlines(), section.splitlines()[1:], strict=False)
        if previous == ".TP"
    ]
    commands = _commands(build_parser())
    assert {"run", "policyd", "milter", "check", "explain", "mailbox add", "blocks clear"} <= set(
        commands
    )
    for command in commands:
        # "mailbox" is described through its actions, "mailbox add ..." and so on.
        assert any(term == command or term.startswith(command + " ") for term in terms), command


def test_command_man_page_describes_every_global_option() -> None:
    page = (MAN / "traqmilter.8").read_text().replace("\\-", "-")
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option != "-h" and option != "--help":
                assert option in page, option
