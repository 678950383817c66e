"""The composition root on its own: what stops a config at start (startup_problems), the
reload that keeps the old config when the new one cannot serve, and the start-up messages
both daemons share (metrics, the role question)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from traqmilter.config import load_config
from traqmilter.core.engine import RcptFacts
from traqmilter.core.settings import Config, MilterSettings
from traqmilter.directory.sqlite import SqliteDirectory
from traqmilter.metrics import Metrics
from traqmilter.runtime import (
    Runtime,
    StartupError,
    counts_unknown,
    open_runtime,
    serve_metrics,
    startup_problems,
)

MAILBOXES = ("postmaster@example.com", "alice@example.com", "admin@example.com")


def write_config(tmp_path: Path, domains: str, **more: str) -> Path:
    path = tmp_path / "traqmilter.yaml"
    lines = [
        f"state_dir: {tmp_path}/state",
        f"directory: {{sqlite: {tmp_path}/directory.sqlite}}",
        f"queue: {{directory: {tmp_path}/queue}}",
        f"domains:{domains}",
        *(f"{key}: {value}" for key, value in more.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "directory.sqlite"
    store = SqliteDirectory(str(path))
    try:
        store.bulk_add(MAILBOXES)
    finally:
        store.close()
    yield path


def problems_of(config: Config, *, bounce_templates: bool = True) -> list[str]:
    runtime = open_runtime(config, check=False)
    try:
        return startup_problems(config, runtime.directory, bounce_templates=bounce_templates)
    finally:
        runtime.close()


# --- startup problems


def test_a_servable_config_has_no_problem(tmp_path: Path, directory: Path) -> None:
    config = load_config(str(write_config(tmp_path, "\n  example.com: {}")))
    assert problems_of(config) == []


def test_a_digest_may_go_to_a_known_mailbox_or_off_site(tmp_path: Path, directory: Path) -> None:
    domains = (
        "\n  example.com: {action: forward, notify: admin@example.com}"
        "\nexceptions: {'x-*@example.com': {action: forward, notify: ops@elsewhere.example}}"
    )
    assert problems_of(load_config(str(write_config(tmp_path, domains)))) == []


@pytest.mark.parametrize(
    ("label", "domains", "want"),
    [
        (
            "catch-all target unknown",
            "\n  example.com: {action: forward, forward_to: nobody}",
            "domains.example.com.forward_to: nobody@example.com is not a known mailbox "
            "(mail for it would be handled as unknown again)",
        ),
        (
            "digest notify address unknown",
            "\n  example.com: {action: forward, notify: gone@example.com}",
            "domains.example.com.notify: gone@example.com is not a known mailbox "
            "(its digests would be refused, and tried again every period)",
        ),
        (
            "create template unknown",
            "\n  example.com: {action: create, template: model}",
            "domains.example.com.template: mailbox model@example.com does not exist",
        ),
        (
            "no postmaster for a domain",
            "\n  example.com: {}\n  example.org: {}",
            "postmaster: postmaster@example.org does not exist and `postmaster` is not set",
        ),
    ],
)
def test_startup_problems(
    label: str, domains: str, want: str, tmp_path: Path, directory: Path
) -> None:
    config = load_config(str(write_config(tmp_path, domains)))
    assert problems_of(config) == [want], label
    with pytest.raises(StartupError, match=want.split(":")[0]):
        open_runtime(config)


def test_a_template_that_cannot_render_stops_only_who_renders_it(
    tmp_path: Path, directory: Path
) -> None:
    template = tmp_path / "bounce.txt.j2"
    template.write_text("Hello {{ nosuchvariable }}\n")
    template.chmod(0o644)
    domains = f"\n  example.com: {{action: bounce, bounce_template: {template}}}"
    config = load_config(str(write_config(tmp_path, domains)))
    (problem,) = problems_of(config)
    assert problem.startswith(f"domains.example.com.bounce_template: {template}: ")
    assert "nosuchvariable" in problem
    # policyd never renders a DSN: it does not load Jinja2 to check one.
    assert problems_of(config, bounce_templates=False) == []
    open_runtime(config, bounce_templates=False).close()


def test_a_template_others_can_write_stops_every_daemon(tmp_path: Path, directory: Path) -> None:
    template = tmp_path / "bounce.txt.j2"
    template.write_text("Your mail to {{ recipients|join(', ') }} was not delivered.\n")
    template.chmod(0o666)
    domains = f"\n  example.com: {{action: bounce, bounce_template: {template}}}"
    config = load_config(str(write_config(tmp_path, domains)))
    for bounce_templates in (True, False):
        (problem,) = problems_of(config, bounce_templates=bounce_templates)
        assert problem.startswith("domains.example.com.bounce_template: ")


# --- reload


@pytest.fixture
def served(tmp_path: Path, directory: Path) -> Iterator[tuple[Runtime, Path]]:
    path = write_config(tmp_path, "\n  example.com: {}")
    runtime = open_runtime(load_config(str(path)))
    try:
        yield runtime, path
    finally:
        runtime.close()


def test_reload_takes_a_servable_config(served: tuple[Runtime, Path], tmp_path: Path) -> None:
    runtime, path = served
    write_config(tmp_path, "\n  example.com: {action: forward, forward_to: admin}")
    assert runtime.reload_or_keep(str(path), "policyd") is True
    decision = runtime.engine.rcpt(RcptFacts("zed@example.com", "s@remote.example"), record=False)
    assert decision.rule == "unknown_forward"


@pytest.mark.parametrize(
    ("label", "domains", "logged"),
    [
        ("a file that does not load", "\n  example.com: {action: shout}", "is not an action"),
        (
            "a config that cannot serve",
            "\n  example.com: {action: forward, forward_to: nobody}",
            "nobody@example.com is not a known mailbox",
        ),
    ],
)
def test_reload_refused_keeps_the_old_config(
    label: str,
    domains: str,
    logged: str,
    served: tuple[Runtime, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime, path = served
    config, engine, store = runtime.config, runtime.engine, runtime.directory
    write_config(tmp_path, domains)
    caplog.set_level(logging.ERROR, logger="traqmilter")
    assert runtime.reload_or_keep(str(path), "milter") is False
    assert (runtime.config, runtime.engine, runtime.directory) == (config, engine, store)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(
        line.startswith("milter: reload refused, keeping the old config: ") for line in lines
    )
    assert any(logged in line for line in lines), label
    decision = runtime.engine.rcpt(RcptFacts("zed@example.com", "s@remote.example"), record=False)
    assert decision.rule == "unknown_reject"  # still the old config's answer


# --- what both daemons share at start


def test_metrics_on_a_busy_port_stop_the_start(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"inet:127.0.0.1:{taken.getsockname()[1]}"
        metrics = Metrics("policyd")
        with pytest.raises(StartupError, match=f"cannot serve metrics on {listen}: "):
            serve_metrics(metrics, listen, "policyd")
    metrics.close()


def test_metrics_start_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger="traqmilter")
    metrics = Metrics("milter")
    try:
        serve_metrics(metrics, f"inet:127.0.0.1:{port}", "milter")
    finally:
        metrics.close()
    assert [r.getMessage() for r in caplog.records] == [f"milter: metrics on inet:127.0.0.1:{port}"]


def test_only_the_sendmail_role_counts_unknown_recipients_in_the_milter() -> None:
    assert counts_unknown(Config()) is False
    assert counts_unknown(Config(milter=MilterSettings(role="sendmail"))) is True
