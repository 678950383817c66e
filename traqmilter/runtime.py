"""The composition root: build the engine from a Config and the real sources, check that
the result can deliver what it promises, and reload it in place.

Both daemons and the CLI's `check` and `explain` start here, so they decide alike.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from traqmilter.config import ConfigError, exception_domain_problems, load_config
from traqmilter.core.address import AddressError, parse_address
from traqmilter.core.attack import AttackTable, Block
from traqmilter.core.engine import DirectoryUnavailable, Engine
from traqmilter.core.settings import (
    Action,
    Config,
    DomainPolicy,
    forward_targets,
    restart_changes,
)
from traqmilter.directory import CompositeDirectory, open_directory
from traqmilter.directory.stats import LookupStats
from traqmilter.file_trust import trusted_uids, untrusted_file_problem
from traqmilter.metrics import Metrics
from traqmilter.postfix_tools import main_cf_problem
from traqmilter.queue_gauge import PostfixQueueGauge, QueueGauge, SendmailQueueGauge
from traqmilter.state import BlockStore, open_block_store

log = logging.getLogger("traqmilter")


class StartupError(Exception):
    """The configuration cannot be served; every line of str() is one problem."""


@dataclass
class Runtime:
    config: Config
    directory: CompositeDirectory
    attacks: AttackTable
    blocks: BlockStore
    queue: QueueGauge
    # How a reload reads the config: the daemons re-apply the command line's daemon
    # options (--foreground, --pid-file), so that they do not read as changed keys.
    read_config: Callable[[str | None], Config] = load_config
    bounce_templates: bool = True  # render-check bounce templates at reload (startup_problems)
    # Lookups of a network directory backend; kept across reloads like the metrics.
    directory_stats: LookupStats = field(default_factory=LookupStats)
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.config, self.directory, self.attacks, self.queue, time.time)

    def persist_block(self, block: Block) -> None:
        """Effect of a decision that started a block: survive a restart."""
        try:
            self.blocks.save(block)
        except Exception:
            log.exception("warning: cannot persist block of %s", block.client)

    def reload(self, config_path: str | None) -> None:
        """Re-read config and directory sources; on any problem keep serving the old ones.

        Every setting takes effect, except the restart-only keys (settings.restart_keys):
        a new config that changes one is refused whole, so the process never runs half a
        config. The daemons apply what lives outside the runtime (policyd's connection
        limits, the milter's DSN submission) from self.config when it changes."""
        config = self.read_config(config_path)
        changed = restart_changes(self.config, config)
        if changed:
            raise StartupError("\n".join(f"{change}; needs a restart" for change in changed))
        config, directory = open_served(config, stats=self.directory_stats)
        try:
            problems = startup_problems(config, directory, bounce_templates=self.bounce_templates)
            if problems:
                raise StartupError("\n".join(problems))
            prepare_directory(config, directory)
        except BaseException:
            directory.close()
            raise
        old = self.directory
        configure_attacks(self.attacks, config)
        self.queue.configure(config.queue.directory, config.queue.sample_interval)
        self.config, self.directory = config, directory
        self.engine = Engine(config, directory, self.attacks, self.queue, time.time)
        old.close()

    def reload_or_keep(self, config_path: str | None, daemon: str) -> bool:
        """reload(), logging why the old config keeps serving when it cannot; the front end
        logs the success once the new engine serves. Both daemons reload through this."""
        try:
            self.reload(config_path)
        except (ConfigError, StartupError) as exc:
            for line in str(exc).splitlines():
                log.error("%s: reload refused, keeping the old config: %s", daemon, line)
            return False
        except Exception:
            log.exception("%s: reload failed, keeping the old config", daemon)
            return False
        return True

    def close(self) -> None:
        self.directory.close()
        self.blocks.close()


def serve_metrics(metrics: Metrics, listen: str, daemon: str) -> None:
    """Start a daemon's metrics endpoint; StartupError when its address cannot be bound."""
    try:
        metrics.serve(listen)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    log.info("%s: metrics on %s", daemon, listen)


def configure_attacks(table: AttackTable, config: Config) -> AttackTable:
    """Give `table` the config's limits, keeping the counts and blocks it holds."""
    s = config.dictionary_attack
    table.configure(
        threshold=s.threshold,
        window_seconds=s.window,
        block_seconds=s.block,
        ipv6_prefix=s.ipv6_prefix,
        max_clients=s.max_clients,
    )
    return table


def open_runtime(
    config: Config, *, check: bool = True, bounce_templates: bool = True, announce: bool = True
) -> Runtime:
    """Open every source the config names; raise StartupError when it cannot be served.
    bounce_templates=False: the caller never renders a DSN (policyd), see startup_problems.
    announce=False: the caller prints the Postfix discovery itself (check, explain)."""
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    stats = LookupStats()
    config, directory = open_served(config, announce=announce, stats=stats)
    try:
        if check:
            problems = startup_problems(config, directory, bounce_templates=bounce_templates)
            if problems:
                raise StartupError("\n".join(problems))
            prepare_directory(config, directory)
        blocks = open_block_store(config)
    except BaseException:
        directory.close()
        raise
    attacks = configure_attacks(AttackTable(), config)
    try:
        blocks.share(attacks, time.time())
    except BaseException:
        blocks.close()
        directory.close()
        raise
    gauge = open_queue_gauge(config)
    return Runtime(
        config,
        directory,
        attacks,
        blocks,
        gauge,
        bounce_templates=bounce_templates,
        directory_stats=stats,
    )


def counts_unknown(config: Config) -> bool:
    """Whether the milter counts unknown recipients towards dictionary-attack blocks: only
    in the sendmail role, where no policy service has counted them already (a Postfix
    milter behind policyd must never count twice). The role is read at start."""
    return config.milter.role == "sendmail"


def open_served(
    config: Config, *, announce: bool = True, stats: LookupStats | None = None
) -> tuple[Config, CompositeDirectory]:
    """The directory the config names, and the config with its domains resolved: with
    `domains: auto`, those Postfix delivers locally, or, without a Postfix main.cf to read,
    the domains of the SQLite store's mailboxes (logged, so the fallback is never silent)."""
    directory = open_directory(
        config.directory, postfix_config_dir=config.postfix.config_dir, stats=stats
    )
    try:
        discovery = directory.discovery
        if discovery is not None and announce:
            for line in discovery.summary():
                log.info("%s", line)
        if config.auto_domains:
            if discovery is not None and discovery.available:
                domains = discovery.served_domains
            else:
                domains = tuple(directory.store.mailbox_domains())
                log.warning(
                    "domains: auto: no Postfix configuration to read; serving the %s "
                    "store %s alone, with the domains of its mailboxes: %s",
                    "PostgreSQL" if config.directory.postgresql else "SQLite",
                    directory.store.path,
                    ", ".join(domains)
                    or "none yet (add one with `traqmilter mailbox add user@DOMAIN`, then reload)",
                )
            config = dataclasses.replace(config, domains=dict.fromkeys(domains, config.undelivered))
    except BaseException:
        directory.close()
        raise
    return config, directory


def open_queue_gauge(config: Config) -> QueueGauge:
    """The gauge that counts the queue of the MTA the config serves (milter.role, which
    only a restart changes); a reload reconfigures it (Runtime.reload)."""
    gauge_class = SendmailQueueGauge if config.milter.role == "sendmail" else PostfixQueueGauge
    return gauge_class(config.queue.directory, config.queue.sample_interval)


def prepare_directory(config: Config, directory: CompositeDirectory) -> None:
    """Mirror the local domains (and postmaster aliases) into the store Postfix reads."""
    directory.store.sync_domains(config.domains)
    if config.postmaster:
        directory.store.ensure_postmaster_aliases(config.domains, config.postmaster)


def startup_problems(
    config: Config, directory: CompositeDirectory, *, bounce_templates: bool = True
) -> list[str]:
    """What would make a served config lose or loop mail: postmaster, a catch-all target or
    a digest's notify address that cannot be delivered, a template mailbox that does not
    exist, a bounce template another user can write, and (bounce_templates) one that
    cannot render. Only the milter renders DSNs: policyd leaves the rendering check to it,
    to `check` and to `run`, and so never loads Jinja2."""
    problems: list[str] = []
    discovery = directory.discovery
    if config.auto_domains:
        problems.extend(f"{p.path}: {p.message}" for p in exception_domain_problems(config))
    if discovery is not None:
        problems.extend(
            f"domains.{domain}: a relay domain of Postfix (relay_domains): its recipients "
            "live on another server, so only action outbox can serve it"
            for domain, policy in config.domains.items()
            if domain in discovery.relay_domains and policy.action is not Action.OUTBOX
        )
    if config.directory.postfix_maps:
        main_cf = main_cf_problem(config.postfix.config_dir)
        if main_cf:
            problems.append(
                f"postfix.config_dir: {main_cf}; postmap cannot read directory.postfix_maps "
                "without it: set postfix.config_dir to the configuration directory of the "
                "Postfix instance those tables belong to"
            )

    def known(address: str) -> bool | None:
        try:
            parsed = parse_address(address)
        except AddressError:
            return False
        if parsed.domain not in config.domains:
            return None  # remote: the MTA routes it
        try:
            return directory.contains(parsed.key)
        except DirectoryUnavailable as exc:
            problems.append(f"directory: {exc}")
            return True

    for target, keys in forward_targets(config).items():
        if known(target) is False:
            problems.append(
                f"{keys[0]}: {target} is not a known mailbox "
                "(mail for it would be handled as unknown again)"
            )
    postmaster = config.postmaster
    if postmaster and known(postmaster) is False:
        problems.append(f"postmaster: {postmaster} is not a known mailbox")
    for domain, policy in config.domains.items():
        # Discovered domains: Postfix delivers their postmaster (traqmilter passes it).
        if not postmaster and not config.auto_domains and known(f"postmaster@{domain}") is False:
            problems.append(
                f"postmaster: postmaster@{domain} does not exist and `postmaster` is not set"
            )
        if policy.action is Action.CREATE and policy.template != "default":
            template = policy.template_address(domain)
            if known(template) is False:
                problems.append(f"domains.{domain}.template: mailbox {template} does not exist")
    policies = [(f"domains.{d}", p) for d, p in config.domains.items()]
    policies += [(f"exceptions.{e}", p) for e, p in config.exceptions.items()]
    notified: dict[str, list[str]] = {}
    for key, policy in policies:
        if policy.notify:
            notified.setdefault(policy.notify, []).append(f"{key}.notify")
    for address, keys in notified.items():
        if known(address) is False:
            problems.append(
                f"{keys[0]}: {address} is not a known mailbox "
                "(its digests would be refused, and tried again every period)"
            )
    trusted = trusted_uids(config)
    for key, policy in policies:
        if policy.action is Action.BOUNCE:
            problems.extend(
                _template_problems(f"{key}.bounce_template", policy, trusted, bounce_templates)
            )
    return problems


def _template_problems(
    path: str, policy: DomainPolicy, trusted: frozenset[int], render: bool
) -> list[str]:
    """A bounce template that cannot render must stop start-up, not tempfail every bounce;
    one that another user can rewrite would mail that user's text to strangers. render:
    also render it with sample facts (only where DSNs are made: see startup_problems)."""
    if policy.bounce_template:
        problem = untrusted_file_problem(policy.bounce_template, trusted)
        if problem:
            return [f"{path}: {problem}"]
    if not render:
        return []
    # Imported here, not at the top: policyd's process must not load Jinja2.
    from traqmilter.core.template import TemplateError, validate_template
    from traqmilter.templates import read_template

    try:
        validate_template(read_template(policy.bounce_template))
    except (OSError, UnicodeDecodeError, TemplateError) as exc:
        return [f"{path}: {policy.bounce_template or 'shipped template'}: {exc}"]
    return []
