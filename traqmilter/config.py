"""Load traqmilter.yaml into a typed Config, or refuse it with every problem at once.

The keys, types, defaults and bounds come only from the declarations in
traqmilter/core/settings.py. Each problem names the key path and the file line, e.g.
    /etc/traqmilter/traqmilter.yaml:12: dictionary_attack.window: "10x" is not a duration
An unknown key, a duplicate key, a wrong type or an out-of-range value stops start-up;
nothing is ignored, nothing is guessed, and a missing file named with -c is an error
(only when no file is named and the default path is absent does the embedded default run).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from traqmilter.core.address import AddressError, normalise_domain, parse_address
from traqmilter.core.listen import parse_listen
from traqmilter.core.settings import (
    REDIS_URL_SCHEMES,
    Action,
    Config,
    DirectorySettings,
    DomainPolicy,
    Kind,
)
from traqmilter.core.verify import resolver_address
from traqmilter.file_trust import trusted_uids, untrusted_file_problem

MAX_CONFIG_BYTES = 4 * 1024 * 1024

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NEXTHOP = re.compile(r"(\[[A-Za-z0-9.:-]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?")


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """Seconds of a duration such as 30s, 10m, 1h, 2d, 1w (a bare number is seconds unless
    unit_required). Raises ValueError, its text fit for the user."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or (unit_required and not match.group(2)):
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 10m, 1h, 2d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigProblem:
    path: str  # dotted key path, e.g. "domains.example.org.action"
    line: int | None  # 1-based line in the file, None when not tied to one
    message: str


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> Iterator[str]:
        for p in self.problems:
            where = f"{self.source}:{p.line}" if p.line else self.source
            yield (
                f"{where}: {p.path or '(top level)'}: {p.message}"
                if p.path
                else f"{where}: {p.message}"
            )


def load_config(path: str | None) -> Config:
    """The config in `path`; with None, the embedded default. Which file a command reads
    when none is named is the command line's decision (cli.config_file), never this one's:
    a library call without a path must not depend on the machine's configuration."""
    if path is None:
        return embedded_default()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, [ConfigProblem("", None, f"cannot read: {exc.strerror}")]) from None
    config = parse_config(data, source=path)
    problem = untrusted_file_problem(path, trusted_uids(config))  # StrictModes
    if problem:
        raise ConfigError(path, [ConfigProblem("", None, problem)])
    return config


def embedded_default() -> Config:
    """The config without a file: the declared defaults, serving what the host's Postfix
    already knows (directory.postfix: auto, domains: auto; docs/directory.md)."""
    return Config(
        directory=dataclasses.replace(DirectorySettings(), postfix="auto"), auto_domains=True
    )


def parse_config(data: bytes | str, *, source: str = "<config>") -> Config:
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [ConfigProblem("", None, "file larger than 4 MiB")])
    try:
        text = data.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(source, [ConfigProblem("", None, "not valid UTF-8")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "YAML syntax error"
        raise ConfigError(source, [ConfigProblem("", line, str(problem))]) from None
    loader = _Loader()
    if node is None:  # an empty file means all defaults
        config = embedded_default()
    elif not isinstance(node, yaml.MappingNode):
        raise ConfigError(source, [ConfigProblem("", _line(node), "must be a mapping of keys")])
    else:
        config = loader.load(node)
    if not loader.problems:
        loader.problems.extend(
            dataclasses.replace(p, line=loader.line_of(p.path)) for p in check_semantics(config)
        )
    if loader.problems:
        raise ConfigError(source, loader.problems)
    return config


def _is_auto(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.value == "auto"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Loader:
    def __init__(self) -> None:
        self.problems: list[ConfigProblem] = []
        self.lines: dict[str, int] = {}

    def line_of(self, path: str) -> int | None:
        """Line of the longest declared key path that prefixes `path`."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None

    def fail(self, path: str, node: yaml.Node | None, message: str) -> None:
        self.problems.append(
            ConfigProblem(path, _line(node) if node is not None else None, message)
        )

    def load(self, node: yaml.MappingNode) -> Config:
        values = self.section(Config, node, "")
        undelivered = values.get("undelivered", DomainPolicy())
        for name in ("domains", "exceptions"):
            raw = values.pop(name, None)
            if raw is None:
                continue
            if name == "domains" and _is_auto(raw[0]):
                continue
            values[name] = self.policies(raw, undelivered, name)
        # Domains not listed (absent, or `auto`): served as the host's Postfix has them.
        auto = "domains" not in values
        directory = values.get("directory", DirectorySettings())
        if not directory.postfix:
            values["directory"] = dataclasses.replace(directory, postfix="auto" if auto else "none")
        return Config(**values, auto_domains=auto)

    def mapping_items(
        self, node: yaml.Node, path: str
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(path, node, "must be a mapping")
            return
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or not isinstance(key_node.value, str):
                self.fail(path, key_node, "keys must be plain strings")
                continue
            key = key_node.value
            if key in seen:
                self.fail(f"{path}.{key}" if path else key, key_node, "duplicate key")
                continue
            seen.add(key)
            yield key, key_node, value_node

    def section(self, cls: type[Any], node: yaml.Node, path: str) -> dict[str, Any]:
        # A field "written as" another key's value (auto_domains: `domains: auto`) is no key.
        fields = {f.name: f for f in dataclasses.fields(cls) if "written_as" not in f.metadata}
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, key_node, value_node in self.mapping_items(node, path):
            key_path = f"{path}.{key}" if path else key
            field = fields.get(key)
            if field is None:
                self.fail(key_path, key_node, f"unknown key (known: {', '.join(fields)})")
                continue
            self.lines[key_path] = _line(key_node)
            if "kind" in field.metadata:
                value = self.scalar(field, value_node, key_path)
                if value is not _INVALID:
                    values[key] = value
            elif "entry" in field.metadata:
                values[key] = (value_node, key_path)  # resolved once `undelivered` is known
            elif dataclasses.is_dataclass(hints[key]):
                values[key] = hints[key](**self.section(hints[key], value_node, key_path))
        return values

    def policies(
        self, raw: tuple[yaml.Node, str], base: DomainPolicy, name: str
    ) -> dict[str, DomainPolicy]:
        node, path = raw
        result: dict[str, DomainPolicy] = {}
        for key, key_node, value_node in self.mapping_items(node, path):
            entry_path = f"{path}.{key}"
            if name == "domains":
                try:
                    key = normalise_domain(key)
                except AddressError as exc:
                    self.fail(entry_path, key_node, f"not a domain name: {exc}")
                    continue
                if key in result:
                    self.fail(entry_path, key_node, "domain listed twice")
                    continue
            elif "@" not in key:
                self.fail(entry_path, key_node, "pattern must have the form local@domain")
                continue
            if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
                overrides: dict[str, Any] = {}
            else:
                overrides = self.section(DomainPolicy, value_node, entry_path)
            self.lines[entry_path] = _line(key_node)
            result[key] = dataclasses.replace(base, **overrides)
        return result

    def scalar(self, field: dataclasses.Field[Any], node: yaml.Node, path: str) -> Any:
        kind: Kind = field.metadata["kind"]
        try:
            value = _convert(kind, node)
        except ValueError as exc:
            self.fail(path, node, str(exc))
            return _INVALID
        choices = field.metadata["choices"]
        if choices and value not in choices:
            words = ", ".join(choice or '""' for choice in choices)
            self.fail(path, node, f"must be one of {words}")
            return _INVALID
        low, high = field.metadata["minimum"], field.metadata["maximum"]
        unit = field.metadata["unit"]
        if low is not None and value < low:
            self.fail(path, node, f"{value} is below the minimum {low} {unit}".rstrip())
            return _INVALID
        if high is not None and value > high:
            self.fail(path, node, f"{value} is above the maximum {high} {unit}".rstrip())
            return _INVALID
        return value


_INVALID = object()


def _scalar_text(node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ValueError(
            f"must be {what}, not a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}"
        )
    return str(node.value)


def _convert(kind: Kind, node: yaml.Node) -> Any:
    if kind in (Kind.NETWORKS, Kind.STRINGS):
        if not isinstance(node, yaml.SequenceNode):
            raise ValueError(f"must be a {kind.value}")
        items = [_scalar_text(item, "a string") for item in node.value]
        if kind is Kind.NETWORKS:
            for item in items:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not a network") from None
        return tuple(items)
    text = _scalar_text(node, f"a {kind.value}")
    tag = node.tag
    if "\x00" in text:
        raise ValueError("NUL character")
    if kind is Kind.CHOICE:
        return text  # the caller checks it against the declared choices
    if kind is Kind.PATTERN:
        if tag != "tag:yaml.org,2002:str":
            raise ValueError(f"{text!r} must be a string (quote it)")
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return text
    if kind is Kind.STR:
        if tag != "tag:yaml.org,2002:str":
            raise ValueError(f"{text!r} must be a string (quote it)")
        return text
    if kind is Kind.INT:
        if tag != "tag:yaml.org,2002:int":
            raise ValueError(f"{text!r} is not an integer")
        return int(text.replace("_", ""), 0)
    if kind is Kind.BOOL:
        if tag != "tag:yaml.org,2002:bool":
            raise ValueError(f"{text!r} is not a boolean (true or false)")
        return text.lower() in ("true", "yes", "on")
    if kind is Kind.DURATION:
        return parse_duration(text)
    if kind is Kind.PATH:
        if not text.startswith("/"):
            raise ValueError(f"{text!r} is not an absolute path")
        return text
    if kind is Kind.LISTEN:
        return _listen(text)
    if kind is Kind.ACTION:
        try:
            return Action(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an action ({', '.join(a.value for a in Action)})"
            ) from None
    if kind is Kind.MODE:
        if not re.fullmatch(r"0?[0-7]{3}", text):
            raise ValueError(f"{text!r} is not an octal mode such as 0660")
        return int(text, 8)
    raise AssertionError(kind)


def _listen(text: str) -> str:
    parse_listen(text)  # the daemons' own parser: what loads is what binds
    return text


def check_semantics(config: Config) -> list[ConfigProblem]:
    """Problems that no single key shows: missing per-action keys, loops, bad targets."""
    problems: list[ConfigProblem] = []
    q = config.queue
    if q.defer_water < q.high_water:
        problems.append(
            ConfigProblem("queue.defer_water", None, "must not be below queue.high_water")
        )
    policies = [("undelivered", config.undelivered)]
    policies += [(f"domains.{d}", p) for d, p in config.domains.items()]
    policies += [(f"exceptions.{k}", p) for k, p in config.exceptions.items()]
    for path, policy in policies:
        problems.extend(_check_policy(path, policy, config))
    if config.auto_domains and config.directory.postfix == "none":
        problems.append(
            ConfigProblem(
                "domains",
                None,
                "domains not listed (or auto) are taken from Postfix, whose recipients "
                "traqmilter then needs too: directory.postfix: none needs the domains listed",
            )
        )
    if not config.auto_domains:  # auto: checked once the domains are discovered
        problems.extend(exception_domain_problems(config))
    problems.extend(_readdress_cycles(config))
    problems.extend(ConfigProblem(path, None, text) for path, text in settings_problems(config))
    problems.extend(_metrics_problems(config))
    problems.extend(_state_problems(config))
    problems.extend(_socketmap_problems(config, [p for _path, p in policies]))
    if config.postmaster:
        try:
            parse_address(config.postmaster)
        except AddressError as exc:
            problems.append(ConfigProblem("postmaster", None, f"not an address: {exc}"))
    return problems


def exception_domain_problems(config: Config) -> list[ConfigProblem]:
    """Exceptions whose (literal) domain is not a local domain: they would never apply."""
    problems = []
    for pattern in config.exceptions:
        domain = pattern.rpartition("@")[2].lower()
        if (
            "*" not in domain
            and "?" not in domain
            and "[" not in domain
            and domain not in config.domains
        ):
            problems.append(
                ConfigProblem(
                    f"exceptions.{pattern}", None, f"domain {domain!r} is not a local domain"
                )
            )
    return problems


def settings_problems(config: Config) -> list[tuple[str, str]]:
    """(key path, problem) for the action settings no single key's type can check."""
    problems: list[tuple[str, str]] = []
    bounce = config.bounce
    if bounce.submit == "sendmail" and (
        not bounce.sendmail_command or not bounce.sendmail_command[0].startswith("/")
    ):
        problems.append(("bounce.sendmail_command", "must start with an absolute program path"))
    if bounce.reporting_mta and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", bounce.reporting_mta):
        problems.append(("bounce.reporting_mta", "must be a host name"))
    if bounce.spf_resolver and resolver_address(bounce.spf_resolver) is None:
        problems.append(("bounce.spf_resolver", "must be an IP address, optionally with :PORT"))
    return problems


def _socketmap_problems(config: Config, policies: list[DomainPolicy]) -> Iterator[ConfigProblem]:
    """milter.socketmap_listen: Sendmail's routing of the outbox action, needed by any
    outbox domain under the sendmail role (and ignored under the postfix role)."""
    key, listen = "milter.socketmap_listen", config.milter.socketmap_listen
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            yield ConfigProblem(key, None, str(exc))
    elif config.milter.role == "sendmail" and any(p.action is Action.OUTBOX for p in policies):
        yield ConfigProblem(
            key,
            None,
            "action outbox under milter.role: sendmail needs it: Sendmail asks it where each "
            "recipient goes (contrib/sendmail/README.md)",
        )


def _metrics_problems(config: Config) -> Iterator[ConfigProblem]:
    for key, listen in (
        ("metrics.listen", config.metrics.listen),
        ("metrics.milter_listen", config.metrics.milter_listen),
    ):
        if listen:
            problem = metrics_listen_problem(listen)
            if problem:
                yield ConfigProblem(key, None, problem)
    if config.metrics.listen and config.metrics.listen == config.metrics.milter_listen:
        yield ConfigProblem(
            "metrics.milter_listen", None, "must differ from metrics.listen (two processes)"
        )


def _state_problems(config: Config) -> Iterator[ConfigProblem]:
    state = config.state
    if state.backend == "redis":
        scheme, sep, rest = state.url.partition("://")
        if not sep or scheme not in REDIS_URL_SCHEMES or not rest:
            yield ConfigProblem(
                "state.url",
                None,
                "backend redis needs a url: redis://HOST:PORT/DB, rediss://... or unix:///PATH",
            )
        elif "@" in rest.partition("/")[0]:
            yield ConfigProblem("state.url", None, "no credentials in the url: use password_file")
    if not state.key_prefix:
        yield ConfigProblem("state.key_prefix", None, "must not be empty")


def metrics_listen_problem(listen: str) -> str:
    """Why a metrics address is refused ("" when it is fine): the metrics say what mail
    arrives for which domain, so they are served on loopback only."""
    try:
        address = parse_listen(listen)
    except ValueError as exc:
        return str(exc)
    if address.family != "inet":
        return f"{listen!r} is not inet:HOST:PORT"
    try:
        host = ipaddress.ip_address(address.host)
    except ValueError:
        return "must be a loopback address (127.0.0.1, [::1]), not a host name"
    if not host.is_loopback:
        return "must be a loopback address (127.0.0.0/8 or [::1])"
    return ""


def _check_policy(path: str, policy: DomainPolicy, config: Config) -> Iterator[ConfigProblem]:
    action = policy.action
    if "\x00" in policy.reject_text or len(policy.reject_text) > 300:
        yield ConfigProblem(f"{path}.reject_text", None, "at most 300 characters")
    if action is Action.READDRESS:
        if not policy.readdress_to:
            yield ConfigProblem(f"{path}.readdress_to", None, "readdress needs readdress_to")
        else:
            try:
                normalise_domain(policy.readdress_to)
            except AddressError as exc:
                yield ConfigProblem(f"{path}.readdress_to", None, f"not a domain: {exc}")
    if action is Action.OUTBOX:
        nexthop = _NEXTHOP.fullmatch(policy.outbox_relay)
        if not policy.outbox_relay:
            yield ConfigProblem(f"{path}.outbox_relay", None, "outbox needs outbox_relay")
        elif nexthop is None:
            yield ConfigProblem(
                f"{path}.outbox_relay", None, "not a nexthop such as [mx2.example.com]:25"
            )
        elif config.milter.role == "sendmail" and nexthop.group(1) != policy.outbox_relay:
            # Sendmail relays to a host; the port is its relay mailer's (RELAY_MAILER_ARGS).
            yield ConfigProblem(
                f"{path}.outbox_relay",
                None,
                "under milter.role: sendmail give the host alone, e.g. [mx2.example.com]: "
                "Sendmail's relay mailer sets the port",
            )
    if action is Action.FORWARD:
        try:
            # Whether a local target exists is checked against the directory at start.
            parse_address(policy.forward_address("example.invalid"))
        except AddressError as exc:
            yield ConfigProblem(f"{path}.forward_to", None, f"not an address or local part: {exc}")
    if policy.notify:
        try:
            # Never the null address: a digest always has a real recipient.
            parse_address(policy.notify)
        except AddressError as exc:
            yield ConfigProblem(f"{path}.notify", None, f"not an address: {exc}")
    if policy.on_create and not policy.on_create[0].startswith("/"):
        yield ConfigProblem(f"{path}.on_create", None, "the program must be an absolute path")
    if policy.bounce_template and not policy.bounce_template.startswith("/"):
        yield ConfigProblem(f"{path}.bounce_template", None, "must be an absolute path")
    if policy.template != "default":
        try:
            parse_address(policy.template_address("x.invalid"))
        except AddressError as exc:
            yield ConfigProblem(f"{path}.template", None, f"not a mailbox: {exc}")


def _readdress_cycles(config: Config) -> Iterator[ConfigProblem]:
    """readdress A->B->...->A would pass mail around forever: refuse it at start."""
    edges = {
        d: normalise_domain(p.readdress_to)
        for d, p in config.domains.items()
        if p.action is Action.READDRESS and p.readdress_to
    }
    for start in edges:
        seen = [start]
        current = edges[start]
        while current in edges:
            if current in seen:
                if current == start:
                    chain = " -> ".join([*seen, current])
                    yield ConfigProblem(
                        f"domains.{start}.readdress_to", None, f"readdress loop: {chain}"
                    )
                break
            seen.append(current)
            current = edges[current]
