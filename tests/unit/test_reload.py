"""A reload (Runtime.reload, what SIGHUP and the milter's SIGUSR1 run) applies every
setting or refuses the new config whole.

Each reloadable section is changed in turn in the file, the runtime reloaded, and the
effect checked where a daemon meets it: the engine's decisions, the attack table, the
queue gauge, the milter's limits, loop guard and DSN hand-over (to a capture SMTP
server). Every restart-only key changed alone is refused with "needs a restart" and the
old config keeps serving. A meta-test holds the table complete against the declarations.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.unit.milter.milter_support import Conversation
from traqmilter.config import load_config
from traqmilter.config_reference import keys as declared_keys
from traqmilter.core.digest import DigestEvent
from traqmilter.core.engine import RcptFacts
from traqmilter.core.plan import HOP_HEADER
from traqmilter.core.settings import Action, restart_changes, restart_keys
from traqmilter.directory.maps import PostfixMapSource
from traqmilter.directory.sqlite import SqliteDirectory
from traqmilter.milter.notify import GRACE_SECONDS
from traqmilter.milter.server import build_notifiers, build_service
from traqmilter.milter.service import MilterService
from traqmilter.runtime import Runtime, StartupError, open_runtime

MAILBOXES = ("postmaster@example.com", "alice@example.com", "admin@fwd.example")
SENDER = "sender@remote.example"
WAIT_SECONDS = 10.0


@dataclasses.dataclass
class Site:
    root: Path
    path: Path
    dsn_first: CaptureServer
    dsn_second: CaptureServer

    def yaml(self, **sections: str) -> str:
        """The base config, with whole top-level sections replaced or added."""
        base = {
            "state_dir": f"{self.root}/state",
            "directory": f"{{sqlite: {self.root}/first.sqlite}}",
            "domains": (
                "\n  example.com: {}\n  fwd.example: {action: forward, forward_to: admin}"
                "\n  bounce.example: {action: bounce, bounce_to: any}"
            ),
            "postmaster": "postmaster@example.com",
            "queue": f"{{directory: {self.root}/queue}}",
            "bounce": (
                f'{{smtp_submit: "inet:127.0.0.1:{self.dsn_first.port}", '
                "reporting_mta: mx.example.com}"
            ),
        }
        base.update(sections)
        return "".join(f"{key}: {value}\n" for key, value in base.items())

    def write(self, **sections: str) -> None:
        self.path.write_text(self.yaml(**sections))


def _store(path: Path, addresses: tuple[str, ...]) -> None:
    store = SqliteDirectory(str(path))
    try:
        store.bulk_add(addresses)
    finally:
        store.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    _store(tmp_path / "first.sqlite", MAILBOXES)
    _store(tmp_path / "second.sqlite", (*MAILBOXES, "newbie@example.com"))
    with CaptureServer() as first, CaptureServer() as second:
        site = Site(tmp_path, tmp_path / "traqmilter.yaml", first, second)
        site.write()
        yield site


@dataclasses.dataclass
class Running:
    """A runtime as a daemon holds it, with the milter's shared service on top."""

    runtime: Runtime
    service: MilterService

    def rcpt(self, recipient: str, client: str = "192.0.2.1") -> str:
        decision = self.runtime.engine.rcpt(RcptFacts(recipient, SENDER, client), record=True)
        return decision.rule

    def action(self, recipient: str) -> Action | None:
        return self.runtime.engine.rcpt(RcptFacts(recipient, SENDER, ""), record=False).action


@pytest.fixture
def running(site: Site) -> Iterator[Running]:
    runtime = open_runtime(load_config(str(site.path)))
    try:
        yield Running(runtime, build_service(runtime))
    finally:
        runtime.close()


def reload(site: Site, running: Running, **sections: str) -> None:
    site.write(**sections)
    running.runtime.reload(str(site.path))


# --- one effect per reloadable section


def _directory(site: Site, running: Running) -> None:
    assert running.rcpt("newbie@example.com") == "unknown_reject"
    reload(site, running, directory=f"{{sqlite: {site.root}/second.sqlite}}")
    assert running.rcpt("newbie@example.com") == "known"


def _undelivered(site: Site, running: Running) -> None:
    assert running.action("nobody@example.com") is None  # rejected
    reload(site, running, undelivered="{action: bounce}")
    assert running.action("nobody@example.com") is Action.BOUNCE  # example.com: {} inherits


def _domains(site: Site, running: Running) -> None:
    assert running.rcpt("x@new.example") == "not_local"
    domains = site.yaml().split("domains: ", 1)[1].split("\npostmaster")[0]
    reload(site, running, domains=domains + "\n  new.example: {}")
    assert running.rcpt("x@new.example") == "unknown_reject"


def _exceptions(site: Site, running: Running) -> None:
    assert running.action("sales-1@example.com") is None
    reload(site, running, exceptions='{"sales-*@example.com": {action: bounce}}')
    assert running.action("sales-1@example.com") is Action.BOUNCE


def _postmaster(site: Site, running: Running) -> None:
    store = running.runtime.directory.store
    assert store.get_alias("postmaster@fwd.example") == "postmaster@example.com"
    reload(site, running, postmaster="alice@example.com")
    assert running.runtime.directory.store.get_alias("postmaster@fwd.example") == (
        "alice@example.com"
    )


def _dictionary_attack(site: Site, running: Running) -> None:
    def attempts_to_block(client: str) -> int:
        for attempt in range(1, 20):
            if running.rcpt(f"nobody{attempt}@example.com", client) == "client_blocked":
                return attempt
        raise AssertionError("never blocked")

    before = attempts_to_block("192.0.2.1")
    reload(site, running, dictionary_attack="{threshold: 2, exempt: []}")
    assert attempts_to_block("192.0.2.2") == before - 3  # threshold 5 -> 2
    assert running.rcpt("alice@example.com", "192.0.2.1") == "client_blocked"  # kept


def _queue(site: Site, running: Running) -> None:
    gauge = running.runtime.queue
    gauge.size = 5
    assert running.rcpt("x@bounce.example", "") == "unknown_bounce"
    reload(
        site,
        running,
        queue=f"{{directory: {site.root}/other, high_water: 3, defer_water: 9, "
        "sample_interval: 2m}",
    )
    assert running.rcpt("x@bounce.example", "") == "unknown_high_water"
    gauge.size = 10
    assert running.rcpt("x@bounce.example", "") == "queue_full"
    assert (gauge.queue_directory, gauge.sample_interval) == (f"{site.root}/other", 120)


def _loops(site: Site, running: Running) -> None:
    hops = [(HOP_HEADER, "mx.example.com (forward)")] * 2

    def forward() -> int | None:
        outcome = Conversation(running.service).send(
            SENDER, ["x@fwd.example"], headers=[("Subject", "hi"), *hops]
        )
        return outcome.eom

    assert forward() == 0  # Milter.CONTINUE: forwarded
    reload(site, running, loops="{max_hops: 2}")
    conversation = Conversation(running.service)
    outcome = conversation.send(SENDER, ["x@fwd.example"], headers=[("Subject", "hi"), *hops])
    assert outcome.reply is not None and outcome.reply[0] == "554", outcome


def _bounce(site: Site, running: Running) -> None:
    def bounce() -> None:
        outcome = Conversation(running.service).send(SENDER, ["zed@bounce.example"])
        assert outcome.reply is None, outcome

    bounce()
    site.dsn_first.wait_for(1, WAIT_SECONDS)
    reload(
        site,
        running,
        bounce=f'{{smtp_submit: "inet:127.0.0.1:{site.dsn_second.port}", rate_per_sender: 2}}',
    )
    bounce()
    (dsn,) = site.dsn_second.wait_for(1, WAIT_SECONDS)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    assert len(site.dsn_first.transactions) == 1
    # rate_per_sender: 2 -- the second DSN to this sender was the last one allowed.
    refused = Conversation(running.service).send(SENDER, ["zed@bounce.example"])
    assert refused.rcpts["zed@bounce.example"] != 0, refused


def _create(site: Site, running: Running) -> None:
    domains = site.yaml().split("domains: ", 1)[1].split("\npostmaster")[0]
    domains += "\n  shop.example: {action: create}"
    reload(site, running, domains=domains)
    assert Conversation(running.service).send(SENDER, ["ann@shop.example"]).rcpts == {
        "ann@shop.example": 0
    }
    reload(site, running, domains=domains, create="{reserved: [ann, bea]}")
    refused = Conversation(running.service).send(SENDER, ["bea@shop.example"])
    assert refused.rcpts["bea@shop.example"] != 0, refused


def _postfix(site: Site, running: Running) -> None:
    # The followed Postfix tables are read with postmap -c <postfix.config_dir>.
    for name in ("first", "second"):
        (site.root / name).mkdir()
        (site.root / name / "main.cf").write_text("")
    maps = f"postfix_maps: [texthash:{site.root}/vmailbox]"
    directory = f"{{sqlite: {site.root}/first.sqlite, {maps}}}"
    reload(site, running, directory=directory, postfix=f"{{config_dir: {site.root}/first}}")
    reload(site, running, directory=directory, postfix=f"{{config_dir: {site.root}/second}}")
    followed = [s for s in running.runtime.directory.sources if isinstance(s, PostfixMapSource)]
    assert [source.config_dir for source in followed] == [f"{site.root}/second"]


def _policyd_limits(site: Site, running: Running) -> None:
    # policyd's server reads these from the runtime after a reload (policyd.main.serve_policyd);
    # tests/integration/test_daemon_mode.py sees a running policyd apply max_connections.
    reload(site, running, policyd="{max_connections: 7, idle_timeout: 30s}")
    settings = running.runtime.config.policyd
    assert (settings.max_connections, settings.idle_timeout) == (7, 30)


def _notifications(site: Site, running: Running) -> None:
    # What run_milter builds: the digests and hooks read notifications.* when they act.
    digester, hooks = build_notifiers(running.runtime)
    reload(site, running, notifications="{top: 1, hook_timeout: 3s}")
    assert hooks.timeout() == 3
    digester.record(
        DigestEvent("admin@example.com", "fwd.example", Action.FORWARD, key, SENDER, "192.0.2.1")
        for key in ("a@fwd.example", "b@fwd.example", "b@fwd.example")
    )
    # Sent once the period is over (its counts wait in the runtime's state store).
    later = time.time() + running.runtime.config.notifications.period + GRACE_SECONDS
    digester.clock = lambda: later
    assert digester.flush() == 1
    (digest,) = site.dsn_first.wait_for(1, WAIT_SECONDS)
    body = digest.data.decode()
    assert "     2  b@fwd.example" in body and "     1  (others, not listed)" in body
    assert "a@fwd.example" not in body


SECTION_EFFECTS: dict[str, Callable[[Site, Running], None]] = {
    "directory": _directory,
    "undelivered": _undelivered,
    "domains": _domains,
    "exceptions": _exceptions,
    "postmaster": _postmaster,
    "dictionary_attack": _dictionary_attack,
    "queue": _queue,
    "loops": _loops,
    "bounce": _bounce,
    "create": _create,
    "policyd": _policyd_limits,
    "postfix": _postfix,
    "notifications": _notifications,
}


@pytest.mark.parametrize("section", sorted(SECTION_EFFECTS))
def test_a_reload_applies_each_reloadable_section(
    section: str, site: Site, running: Running
) -> None:
    SECTION_EFFECTS[section](site, running)


def test_every_section_with_a_reloadable_key_has_an_effect_test() -> None:
    restart = set(restart_keys())
    reloadable = {
        key.path.split(".")[0]
        for key in declared_keys()
        if key.kind != "section" and key.path not in restart
    }
    assert reloadable == set(SECTION_EFFECTS)


# --- restart-only keys: refused whole, the old config serves on

RESTART_CHANGES = {
    "state_dir": "/var/tmp/elsewhere",
    "policyd.listen": "inet:127.0.0.1:1",
    "policyd.socket_mode": "'0600'",
    "policyd.socketmap_listen": "inet:127.0.0.1:2",
    "milter.listen": "inet:127.0.0.1:3",
    "milter.timeout": "5m",
    "milter.socket_mode": "'0600'",
    "milter.role": "sendmail",
    "milter.socketmap_listen": '"inet:127.0.0.1:4"',
    "daemon.foreground": "false",
    "daemon.pid_file": "/run/other.pid",
    "daemon.user": "nobody",
    "daemon.group": "nogroup",
    "daemon.umask": "'0077'",
    "daemon.socket_group": "mail",
    "log.destination": "syslog",
    "log.format": "json",
    "log.level": "debug",
    "log.syslog_facility": "local3",
    "metrics.listen": '"inet:127.0.0.1:9340"',
    "metrics.milter_listen": '"inet:127.0.0.1:9341"',
    # redis needs its url too: the first line names backend, the last url
    "state.backend": 'redis, url: "redis://127.0.0.1:1/0"',
    "state.url": '"redis://127.0.0.1:1/0"',
    "state.key_prefix": '"other:"',
    "state.username": "someone",
    "state.password_file": "/etc/traqmilter/redis.password",
    "state.timeout": "2s",
    "state.tls_ca_file": "/etc/ssl/ca.pem",
    "state.tls_cert_file": "/etc/ssl/cert.pem",
    "state.tls_key_file": "/etc/ssl/key.pem",
}


def test_every_restart_only_key_is_tried() -> None:
    assert set(RESTART_CHANGES) == set(restart_keys())


@pytest.mark.parametrize("key", sorted(RESTART_CHANGES))
def test_a_restart_only_change_refuses_the_reload(key: str, site: Site, running: Running) -> None:
    before = running.runtime.config
    section, _, name = key.partition(".")
    value = f"{{{name}: {RESTART_CHANGES[key]}}}" if name else RESTART_CHANGES[key]
    # The same change also makes `undelivered` bounce: none of it may take effect.
    with pytest.raises(StartupError) as refused:
        reload(site, running, **{section: value, "undelivered": "{action: bounce}"})
    assert str(refused.value).startswith(f"{key}: changed from ")
    assert str(refused.value).endswith("; needs a restart")
    assert running.runtime.config is before
    assert running.action("nobody@example.com") is None


def test_a_refusal_names_the_old_and_new_values(site: Site, running: Running) -> None:
    with pytest.raises(StartupError) as refused:
        reload(site, running, policyd='{listen: "inet:127.0.0.1:1", socket_mode: "0600"}')
    assert str(refused.value).splitlines() == [
        "policyd.listen: changed from 'inet:127.0.0.1:10040' to 'inet:127.0.0.1:1'; "
        "needs a restart",
        "policyd.socket_mode: changed from 0660 to 0600; needs a restart",
    ]


def test_command_line_daemon_options_are_not_changes(site: Site) -> None:
    """`traqmilter run` starts its daemons with --foreground --pid-file "": the file's own
    daemon.foreground and daemon.pid_file are not changes at reload."""
    from argparse import Namespace

    from traqmilter.cli import _config_reader, with_daemon_options

    site.write(daemon="{foreground: false, pid_file: /run/traqmilter.pid}")
    args = Namespace(foreground=True, pid_file="")
    started = with_daemon_options(load_config(str(site.path)), args)
    assert restart_changes(started, _config_reader(args)(str(site.path))) == []
    assert restart_changes(started, load_config(str(site.path))) == [
        "daemon.foreground: changed from True to False",
        "daemon.pid_file: changed from '' to '/run/traqmilter.pid'",
    ]


def test_operations_md_lists_exactly_the_restart_only_keys() -> None:
    """docs/operations.md's list of what a reload does not change is complete, and names
    nothing a reload does change."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    item = text.split("\n- Restart-only:", 1)[1].split("\n\n", 1)[0].split("\n- ", 1)[0]
    listed = item.split(" They are", 1)[1]
    named = set(re.findall(r"`([a-z_.]+)`", listed))
    sections = set(re.findall(r"`([a-z_]+):`", listed))
    expanded = named | {key for key in restart_keys() if key.split(".")[0] in sections}
    assert expanded == set(restart_keys())
