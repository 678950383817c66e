"""Every configuration key, declared once: type, default, bounds, unit and meaning.

The YAML loader (traqmilter.config), `traqmilter check` and the generated configuration
reference (docs/configuration.md) all read these declarations; nothing else defines a key.
Names are part of the interface: add keys freely, rename none.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any


class Action(enum.StrEnum):
    """What happens to mail for an unknown recipient (SPEC section 4)."""

    REJECT = "reject"
    BOUNCE = "bounce"
    FORWARD = "forward"
    READDRESS = "readdress"
    CREATE = "create"
    OUTBOX = "outbox"


class Kind(enum.StrEnum):
    """How a scalar value is written in YAML and checked."""

    STR = "string"
    INT = "integer"
    BOOL = "boolean"
    DURATION = "duration"  # "10m", "1h", "30s", "2d" or a number of seconds
    PATH = "absolute path"
    LISTEN = "socket"  # "inet:HOST:PORT" (loopback or any address) or "unix:/path"
    NETWORKS = "list of networks"  # CIDR or single addresses
    STRINGS = "list of strings"
    ACTION = "action"
    MODE = "octal file mode"
    CHOICE = "one of"  # one of the words the declaration lists (setting(choices=...))
    PATTERN = "regular expression"  # Python's re syntax


def setting(
    default: Any,
    kind: Kind,
    doc: str,
    *,
    minimum: int | float | None = None,
    maximum: int | float | None = None,
    unit: str = "",
    restart: bool = False,
    choices: tuple[str, ...] = (),
) -> Any:
    """Declare one key: its dataclass field carries everything the loader and docs need.
    restart: a running daemon cannot apply a new value (a bound socket, the process's
    identity); a reload that changes it is refused (restart_changes).
    choices: the words a Kind.CHOICE key accepts (the loader refuses any other, the docs
    list them)."""
    if (kind is Kind.CHOICE) != bool(choices) or (choices and default not in choices):
        raise ValueError("a choice key declares its choices, and its default is one of them")
    meta = {
        "kind": kind,
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "unit": unit,
        "restart": restart,
        "choices": choices,
    }
    if isinstance(default, list):
        frozen = tuple(default)
        return field(default=frozen, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_REJECT_TEXT = "User unknown"


@dataclass(frozen=True, slots=True)
class DirectorySettings:
    sqlite: str = setting(
        "/var/lib/traqmilter/directory.sqlite",
        Kind.PATH,
        "The SQLite recipient directory (mailboxes, aliases, domains). Created if missing; "
        "Postfix reads the same file through sqlite: maps.",
    )
    sqlite_memory_index: bool = setting(
        True,
        Kind.BOOL,
        "Answer recipient lookups from an in-memory set of the SQLite store's active keys "
        "(re-read in the background within a second of any change; about 110 bytes per key). "
        "false: every lookup reads the file, through a small cache.",
    )
    sqlite_compact_index: bool = setting(
        False,
        Kind.BOOL,
        "Keep that index as hashes of the keys (about 8 bytes per key instead of 117: 8 MB "
        "instead of 117 MB per daemon at a million mailboxes). Unknown recipients are "
        "decided from memory as fast; a known recipient not looked up recently is confirmed "
        "by reading the file (measured: up to twice policyd's CPU per request when no "
        "recipient repeats).",
    )
    postfix_maps: tuple[str, ...] = setting(
        [],
        Kind.STRINGS,
        "Existing Postfix lookup tables whose keys are known recipients, e.g. "
        "hash:/etc/postfix/vmailbox or texthash:/etc/postfix/virtual. Read with postmap -s "
        "(against postfix.config_dir); re-read when the file changes. A key @domain makes "
        "every address of it known.",
    )
    postfix: str = setting(
        "",
        Kind.CHOICE,
        "auto: also follow the recipient tables of the Postfix instance in "
        "postfix.config_dir (local_recipient_maps, virtual_mailbox_maps, virtual_alias_maps, "
        "read through postconf at start and at every reload; docs/directory.md). none: only "
        "the sources named here. Empty: auto when `domains` is not listed (absent or auto), "
        "none when it is. Without a main.cf there, the SQLite store serves alone.",
        choices=("", "auto", "none"),  # not "off": YAML reads that as false
    )
    address_lists: tuple[str, ...] = setting(
        [],
        Kind.STRINGS,
        "Plain files with one known address per line (# comments). Re-read when changed.",
    )
    recipient_delimiter: str = setting(
        "+",
        Kind.STR,
        "Characters that separate an address extension, as Postfix's recipient_delimiter: "
        "user+ext@domain is known when user@domain is. Empty disables extensions.",
    )
    case_sensitive_local_parts: bool = setting(
        False,
        Kind.BOOL,
        "Compare local parts case-sensitively. Domains are always case-insensitive.",
    )
    postgresql: str = setting(
        "",
        Kind.STR,
        "A libpq connection string (postgresql://user@host:port/dbname or key=value form) "
        "of a shared PostgreSQL directory: set, it replaces the SQLite store (`sqlite` is "
        "then not used) and every MX host reads and writes the same mailboxes. Create its "
        "tables with `traqmilter directory init`; Postfix reads them through "
        "contrib/postfix/pgsql-*.cf. See docs/scale-out.md.",
    )
    postgresql_password_file: str = setting(
        "",
        Kind.PATH,
        "A file holding only the password for `postgresql` (read at start and reload), "
        "to keep it out of the config file. libpq's passfile= and PGPASSFILE work too.",
    )
    postgresql_timeout: float = setting(
        1,
        Kind.DURATION,
        "How long a PostgreSQL lookup may take; a slower or failed one tempfails the "
        "recipient (451), never calls it unknown.",
        minimum=0.05,
        maximum=30,
        unit="seconds",
    )
    reload_check_interval: float = setting(
        5,
        Kind.DURATION,
        "How often map and list files are checked for changes.",
        minimum=1,
        maximum=3600,
        unit="seconds",
    )


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """How unknown recipients of a domain are handled. `undelivered` holds the defaults;
    each entry under `domains` (and `exceptions`) overrides only the keys it names."""

    action: Action = setting(
        Action.REJECT,
        Kind.ACTION,
        "reject, bounce, forward, readdress, create or outbox (see docs/actions.md).",
    )
    reject_text: str = setting(
        DEFAULT_REJECT_TEXT,
        Kind.STR,
        "The reason in the 550 5.1.1 reply, which clients see as "
        "'<address>: Recipient address rejected: REASON'; {recipient} is replaced by the address.",
    )
    forward_to: str = setting(
        "admin",
        Kind.STR,
        "forward: the catch-all target, a local part of the same domain or a full address.",
    )
    readdress_to: str = setting(
        "",
        Kind.STR,
        "readdress: the domain that replaces the recipient's domain (required for readdress).",
    )
    template: str = setting(
        "default",
        Kind.STR,
        "create: the mailbox whose settings new mailboxes copy; 'default' is an "
        "unconfigured mailbox.",
    )
    outbox_relay: str = setting(
        "",
        Kind.STR,
        "outbox: the outbound route, as a Postfix nexthop, e.g. [mx2.example.com]:25 "
        "(required for outbox). Under milter.role: sendmail the host alone, e.g. "
        "[mx2.example.com]: Sendmail's relay mailer sets the port.",
    )
    bounce_template: str = setting(
        "",
        Kind.STR,
        "bounce: a Jinja2 template for the human part of the DSN; empty uses the shipped one.",
    )
    bounce_to: str = setting(
        "verified",
        Kind.CHOICE,
        "bounce: which senders get a DSN. verified: only a sender that can be verified (a "
        "SASL-authenticated or dictionary_attack.exempt client, an Authentication-Results "
        "header of bounce.authserv_id with spf=pass or an aligned dkim=pass, or "
        "bounce.spf_check); any: every envelope sender (forged ones too: backscatter). "
        "See docs/actions.md.",
        choices=("verified", "any"),
    )
    unverified: str = setting(
        "reject",
        Kind.CHOICE,
        "bounce with bounce_to: verified, for a sender that turns out unverified only at end "
        "of message: reject (550 5.1.1 for the message; the milter keeps such recipients in "
        "transactions of their own, answering 452 4.5.3 to a recipient that would mix them "
        "with others) or discard (the recipient is dropped without a DSN).",
        choices=("reject", "discard"),
    )
    notify: str = setting(
        "",
        Kind.STR,
        "create, forward, bounce: the address that gets one digest per notifications.period "
        "listing the mailboxes created (create) or the unknown addresses used most "
        "(forward, bounce), with their senders and clients (docs/notifications.md). "
        "Empty: no digest.",
    )
    on_create: tuple[str, ...] = setting(
        [],
        Kind.STRINGS,
        "create: a command (program and arguments, run without a shell) started after each "
        "new mailbox, with the address appended as the last argument and in the environment "
        "as TRAQMILTER_ADDRESS; bounded by notifications.hook_timeout, its failure is logged "
        "and never affects mail. Empty: none.",
    )

    def forward_address(self, domain: str) -> str:
        """forward: the catch-all target of a recipient in `domain`, as a full address."""
        return _in_domain(self.forward_to, domain)

    def template_address(self, domain: str) -> str:
        """create: the template mailbox of a recipient in `domain`, as a full address."""
        return _in_domain(self.template, domain)


def _in_domain(target: str, domain: str) -> str:
    """A configured mailbox without "@" is a local part of the recipient's own domain."""
    return target if "@" in target else f"{target}@{domain}"


@dataclass(frozen=True, slots=True)
class DictionaryAttackSettings:
    threshold: int = setting(
        5,
        Kind.INT,
        "Unknown-recipient attempts a client may make within `window`, each answered "
        "honestly; the next one blocks it (as Postfix's limits count errors).",
        minimum=1,
        maximum=100000,
        unit="attempts",
    )
    window: float = setting(
        600,
        Kind.DURATION,
        "The sliding window attempts are counted over.",
        minimum=1,
        maximum=7 * 86400,
        unit="seconds",
    )
    block: float = setting(
        3600,
        Kind.DURATION,
        "How long a client stays blocked.",
        minimum=1,
        maximum=30 * 86400,
        unit="seconds",
    )
    exempt: tuple[str, ...] = setting(
        ["127.0.0.0/8", "::1/128"],
        Kind.NETWORKS,
        "Networks that are never counted or blocked.",
    )
    exempt_authenticated: bool = setting(
        True, Kind.BOOL, "SASL-authenticated clients are never counted or blocked."
    )
    ipv6_prefix: int = setting(
        64,
        Kind.INT,
        "IPv6 clients are counted per network of this prefix length.",
        minimum=32,
        maximum=128,
        unit="bits",
    )
    disconnect: bool = setting(
        False, Kind.BOOL, "Answer a blocked client 421 (ending its session) instead of 450."
    )
    max_clients: int = setting(
        1000000,
        Kind.INT,
        "At most this many clients are tracked; the least recently seen are forgotten "
        "first (blocked clients are kept), so memory stays bounded.",
        minimum=1000,
        maximum=10000000,
        unit="clients",
    )


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    config_dir: str = setting(
        "/etc/postfix",
        Kind.PATH,
        "The configuration directory (holding main.cf) of the Postfix instance traqmilter "
        "serves. Every Postfix command traqmilter runs (postmap for directory.postfix_maps) "
        "is given it with -c, so nothing depends on the machine's default instance; "
        "`check` refuses a directory without main.cf when a command needs it.",
    )


@dataclass(frozen=True, slots=True)
class QueueSettings:
    high_water: int = setting(
        40000,
        Kind.INT,
        "Above this many messages in the MTA queue, accept-time actions fall back to reject.",
        minimum=1,
        maximum=100000000,
        unit="messages",
    )
    defer_water: int = setting(
        60000,
        Kind.INT,
        "Above this many messages, new mail is deferred with 452 4.3.1.",
        minimum=1,
        maximum=100000000,
        unit="messages",
    )
    directory: str = setting(
        "/var/spool/postfix",
        Kind.PATH,
        "The MTA's queue directory. Postfix: its incoming, active, deferred, hold and "
        "maildrop queues count. Sendmail (milter.role: sendmail): set /var/spool/mqueue; "
        "its qf* files count, also in qf/ and q*/ subdirectories.",
    )
    sample_interval: float = setting(
        10,
        Kind.DURATION,
        "How often the queue is counted (the size is cached in between).",
        minimum=1,
        maximum=3600,
        unit="seconds",
    )


@dataclass(frozen=True, slots=True)
class PolicydSettings:
    listen: str = setting(
        "inet:127.0.0.1:10040",
        Kind.LISTEN,
        "Where policyd listens: inet:HOST:PORT or unix:/path.",
        restart=True,
    )
    max_connections: int = setting(
        1000,
        Kind.INT,
        "Connections held at once; Postfix keeps one per smtpd process.",
        minimum=1,
        maximum=100000,
        unit="connections",
    )
    idle_timeout: float = setting(
        3600,
        Kind.DURATION,
        "A connection idle this long is closed (Postfix reconnects when it needs one).",
        minimum=10,
        maximum=86400,
        unit="seconds",
    )
    socket_mode: int = setting(
        0o660, Kind.MODE, "Permissions of a unix socket.", minimum=0, maximum=0o777, restart=True
    )
    socketmap_listen: str = setting(
        "inet:127.0.0.1:10041",
        Kind.LISTEN,
        "Where policyd answers Postfix socketmap(5) transport lookups for the outbox action "
        "(transport_maps = socketmap:inet:127.0.0.1:10041:transport): inet:HOST:PORT or "
        "unix:/path.",
        restart=True,
    )


@dataclass(frozen=True, slots=True)
class MilterSettings:
    listen: str = setting(
        "inet:127.0.0.1:8891",
        Kind.LISTEN,
        "Where the milter listens: inet:HOST:PORT or unix:/path.",
        restart=True,
    )
    timeout: float = setting(
        60,
        Kind.DURATION,
        "libmilter's I/O timeout towards the MTA.",
        minimum=1,
        maximum=3600,
        unit="seconds",
        restart=True,
    )
    socket_mode: int = setting(
        0o660,
        Kind.MODE,
        "Permissions of a unix socket (libmilter creates it with the umask's; it is set to "
        "this before the daemon reports ready).",
        minimum=0,
        maximum=0o777,
        restart=True,
    )
    role: str = setting(
        "postfix",
        Kind.CHOICE,
        "Which MTA the milter serves: postfix (policyd makes the RCPT-time decisions and "
        "counts unknown recipients; the milter never counts them again) or sendmail (no "
        "policy service: the milter's RCPT callback rejects, counts and blocks itself).",
        restart=True,
        choices=("postfix", "sendmail"),
    )
    socketmap_listen: str = setting(
        "",
        Kind.STR,
        "role sendmail: where the milter answers Sendmail's socket map lookups that route "
        "the outbox action's recipients (FEATURE(ldap_routing) in "
        "contrib/sendmail/traqmilter.mc): inet:HOST:PORT or unix:/path. Empty: none; "
        "required when a domain's action is outbox. Ignored under role postfix (Postfix asks "
        "policyd.socketmap_listen).",
        restart=True,
    )


# Local parts `create` never makes, whatever `create.reserved` says: RFC 2142 role addresses
# and the MTA's own (mail for them must reach a person, not a fresh empty mailbox).
ALWAYS_RESERVED_LOCAL_PARTS = (
    "postmaster",
    "abuse",
    "root",
    "mailer-daemon",
    "hostmaster",
    "webmaster",
    "security",
    "noc",
    "admin",
    "administrator",
)


@dataclass(frozen=True, slots=True)
class LoopSettings:
    max_hops: int = setting(
        5,
        Kind.INT,
        "Re-routed mail (forward, readdress, outbox) already carrying this many traqmilter "
        "hop-trace headers is refused with 554 5.4.6 instead of being re-routed again.",
        minimum=1,
        maximum=50,
        unit="hops",
    )
    max_received: int = setting(
        30,
        Kind.INT,
        "Mail to be re-routed that carries more Received: headers than this is refused with "
        "554 5.4.6 (Postfix's own hopcount_limit, 50, applies to all mail).",
        minimum=5,
        maximum=200,
        unit="headers",
    )


@dataclass(frozen=True, slots=True)
class BounceSettings:
    submit: str = setting(
        "smtp",
        Kind.CHOICE,
        "How DSNs are handed to the MTA: smtp (to smtp_submit, a loopback smtpd that runs "
        "no milter and no policy service) or sendmail (sendmail_command).",
        choices=("smtp", "sendmail"),
    )
    smtp_submit: str = setting(
        "inet:127.0.0.1:10026",
        Kind.LISTEN,
        "submit: smtp: the MTA's loopback SMTP service for DSNs (see docs/actions.md).",
    )
    sendmail_command: tuple[str, ...] = setting(
        ["/usr/sbin/sendmail", "-i", "-f", ""],
        Kind.STRINGS,
        "submit: sendmail: the command and arguments that read one message on standard "
        "input with a null envelope sender; the recipient is appended after --.",
    )
    submit_timeout: float = setting(
        30,
        Kind.DURATION,
        "How long handing one DSN to the MTA may take before the message is tempfailed.",
        minimum=1,
        maximum=600,
        unit="seconds",
    )
    rate_per_sender: int = setting(
        5,
        Kind.INT,
        "At most this many DSNs to one envelope sender within rate_window; beyond it the "
        "recipient is rejected instead (RCPT 550 5.1.1), so no backscatter is sent.",
        minimum=1,
        maximum=100000,
        unit="DSNs",
    )
    rate_per_client: int = setting(
        20,
        Kind.INT,
        "At most this many DSNs caused by one client (IPv4 address, IPv6 network) within "
        "rate_window; beyond it the recipient is rejected instead.",
        minimum=1,
        maximum=1000000,
        unit="DSNs",
    )
    rate_window: float = setting(
        3600,
        Kind.DURATION,
        "The sliding window DSN rates are counted over.",
        minimum=60,
        maximum=7 * 86400,
        unit="seconds",
    )
    max_tracked: int = setting(
        100000,
        Kind.INT,
        "At most this many senders and clients are tracked for DSN rates; the least recently "
        "seen are forgotten first, so memory stays bounded.",
        minimum=100,
        maximum=10000000,
        unit="entries",
    )
    reporting_mta: str = setting(
        "",
        Kind.STR,
        "The Reporting-MTA name in DSNs. Empty: the MTA's own host name (milter macro j), "
        "else this host's name.",
    )
    authserv_id: str = setting(
        "",
        Kind.STR,
        "The authserv-id of this host's own verifier (OpenDKIM's AuthservID, OpenDMARC's "
        "AuthservID, ...): only Authentication-Results headers naming it verify a sender for "
        "bounce_to: verified, and only when exactly one such header is present. Empty: no "
        "header is trusted. Postfix must remove copies that arrive from outside "
        "(docs/actions.md).",
    )
    spf_check: bool = setting(
        False,
        Kind.BOOL,
        "bounce_to: verified: the milter checks SPF itself at RCPT time (for when no upstream "
        "verifier runs); a sender whose SPF does not pass is rejected there.",
    )
    spf_timeout: float = setting(
        5,
        Kind.DURATION,
        "spf_check: how long one SPF check may take in all; beyond it the result is temperror "
        "(not verified).",
        minimum=1,
        maximum=60,
        unit="seconds",
    )
    spf_resolver: str = setting(
        "",
        Kind.STR,
        "spf_check: the DNS resolver to ask, HOST or HOST:PORT (an address). Empty: the "
        "system's resolvers (/etc/resolv.conf).",
    )


@dataclass(frozen=True, slots=True)
class CreateSettings:
    local_part_pattern: str = setting(
        "[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?",
        Kind.PATTERN,
        "A regular expression the whole (lower-case) local part must match before `create` "
        "makes a mailbox for it; '..' is refused whatever the pattern says.",
    )
    max_length: int = setting(
        32,
        Kind.INT,
        "Longest local part `create` makes a mailbox for.",
        minimum=1,
        maximum=64,
        unit="characters",
    )
    reserved: tuple[str, ...] = setting(
        [
            "www",
            "ftp",
            "uucp",
            "news",
            "usenet",
            "nobody",
            "daemon",
            "bin",
            "sys",
            "operator",
            "mail",
            "info",
            "support",
            "sales",
            "marketing",
            "noreply",
            "no-reply",
            "test",
        ],
        Kind.STRINGS,
        "Local parts never created, in addition to the built-in "
        + ", ".join(ALWAYS_RESERVED_LOCAL_PARTS)
        + ".",
    )
    rate_per_hour: int = setting(
        20,
        Kind.INT,
        "At most this many mailboxes created per hour; beyond it recipients that would "
        "need a new mailbox are deferred (450 4.7.1).",
        minimum=1,
        maximum=1000000,
        unit="mailboxes",
    )
    max_total: int = setting(
        1000,
        Kind.INT,
        "At most this many mailboxes made by `create` in the directory; beyond it such "
        "recipients are rejected (550 5.1.1).",
        minimum=1,
        maximum=100000000,
        unit="mailboxes",
    )


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    """The administrator's digests and the on_create hook (docs/notifications.md)."""

    period: float = setting(
        3600,
        Kind.DURATION,
        "How often each notify address gets its digest (one message per period, none when "
        "nothing happened).",
        minimum=1,
        maximum=7 * 86400,
        unit="seconds",
    )
    top: int = setting(
        20,
        Kind.INT,
        "How many addresses, senders and clients a digest lists per domain (the most used "
        "first); the rest are counted, not named.",
        minimum=1,
        maximum=1000,
        unit="entries",
    )
    max_tracked: int = setting(
        1000,
        Kind.INT,
        "At most this many distinct addresses, senders and clients are kept per domain and "
        "period, in memory and in the state store; later ones are only counted as others "
        "(the digest says how many), so neither grows without bound.",
        minimum=10,
        maximum=1000000,
        unit="entries",
    )
    hook_timeout: float = setting(
        10,
        Kind.DURATION,
        "The longest an on_create command may run before it is killed (and the failure logged).",
        minimum=1,
        maximum=600,
        unit="seconds",
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    destination: str = setting(
        "stderr",
        Kind.CHOICE,
        "Where the event log goes: stderr (journald under systemd) or syslog (/dev/log; "
        "stderr, with a warning, when /dev/log is missing).",
        choices=("stderr", "syslog"),
    )
    format: str = setting(
        "text",
        Kind.CHOICE,
        "text (Postfix-shaped lines) or json (one JSON object per line).",
        choices=("text", "json"),
    )
    level: str = setting(
        "info",
        Kind.CHOICE,
        "info (refusals, blocks, actions) or debug (also every accepted recipient).",
        choices=("info", "debug"),
    )
    syslog_facility: str = setting(
        "mail",
        Kind.CHOICE,
        "The syslog facility.",
        choices=("mail", "daemon", "user", *(f"local{n}" for n in range(8))),
    )


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: str = setting(
        "",
        Kind.STR,
        "Where policyd serves Prometheus metrics (/metrics): inet:127.0.0.1:PORT or "
        "inet:[::1]:PORT (loopback only). Empty: no metrics.",
    )
    milter_listen: str = setting(
        "",
        Kind.STR,
        "Where the milter serves its own Prometheus metrics (it is a process of its own): "
        "inet:127.0.0.1:PORT, loopback only. Empty: no metrics.",
    )


REDIS_URL_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where dictionary-attack blocks and counts live (docs/scale-out.md)."""

    backend: str = setting(
        "sqlite",
        Kind.CHOICE,
        "sqlite: blocks in state_dir/state.sqlite, counts in each process (one host). "
        "redis: counts, blocks and the bounce and create rates shared by every host that "
        "names the same Redis `url` and `key_prefix`.",
        choices=("sqlite", "redis"),
    )
    url: str = setting(
        "",
        Kind.STR,
        "redis: the server, redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or "
        "unix:///PATH?db=DB. No password in it: use password_file.",
    )
    key_prefix: str = setting(
        "traqmilter:",
        Kind.STR,
        "redis: the start of every key traqmilter writes (hosts that share state name the "
        "same prefix; other applications may share the server under other prefixes).",
    )
    username: str = setting("", Kind.STR, "redis: the ACL user (Redis 6+). Empty: default.")
    password_file: str = setting(
        "",
        Kind.PATH,
        "redis: a file whose first line is the password (read at start and on reload). "
        "Empty: no AUTH.",
    )
    timeout: float = setting(
        0.5,
        Kind.DURATION,
        "redis: the longest one exchange with the server may take before the local table "
        "decides alone (decisions never wait for Redis; this bounds the background sync).",
        minimum=0.05,
        maximum=10,
        unit="seconds",
    )
    tls_ca_file: str = setting(
        "", Kind.PATH, "redis (rediss://): CA certificates to verify the server with."
    )
    tls_cert_file: str = setting(
        "", Kind.PATH, "redis (rediss://): client certificate, when the server asks for one."
    )
    tls_key_file: str = setting("", Kind.PATH, "redis (rediss://): the client certificate's key.")


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How a daemon process runs: read once at start (a reload does not change them)."""

    foreground: bool = setting(
        True,
        Kind.BOOL,
        "Stay in the foreground (for systemd and other supervisors). false: detach from "
        "the terminal and session (python-daemon) and run in the background.",
    )
    pid_file: str = setting(
        "",
        Kind.PATH,
        "Write the daemon's process id here (e.g. /run/traqmilter/policyd.pid); removed at "
        "a clean stop. A file naming a live process stops start-up. Empty: no pid file.",
    )
    user: str = setting(
        "",
        Kind.STR,
        "Run as this user after the listening sockets and the pid file are opened "
        "(setgroups, setgid, setuid: no way back to root). Empty: keep the starting user "
        "(under systemd, use User= instead).",
    )
    group: str = setting(
        "",
        Kind.STR,
        "The group to run as with `user`. Empty: the user's login group.",
    )
    umask: int = setting(
        0o027, Kind.MODE, "The process umask (files the daemon creates).", minimum=0, maximum=0o777
    )
    socket_group: str = setting(
        "",
        Kind.STR,
        "Group of the unix listening sockets (policyd, socketmap, milter), e.g. postfix; "
        "their owner is `user`. Empty: the group the daemon runs as.",
    )


@dataclass(frozen=True, slots=True)
class Config:
    state_dir: str = setting(
        "/var/lib/traqmilter",
        Kind.PATH,
        "Where traqmilter keeps its own state (dictionary-attack blocks).",
        restart=True,
    )
    directory: DirectorySettings = field(
        default_factory=DirectorySettings, metadata={"doc": "The recipient directory."}
    )
    state: StateSettings = field(
        default_factory=StateSettings,
        metadata={
            "doc": "Where blocks and counts live: this host or a shared Redis.",
            "restart": True,  # the store is opened once, with the daemon
        },
    )
    undelivered: DomainPolicy = field(
        default_factory=DomainPolicy,
        metadata={"doc": "Handling of unknown recipients, the default for every local domain."},
    )
    domains: dict[str, DomainPolicy] = field(
        default_factory=dict,
        metadata={
            "doc": "The local domains. Each may override any key of `undelivered`; "
            "an empty mapping ({}) inherits everything. Not written, or `auto`: the "
            "domains Postfix delivers locally (mydestination, virtual_mailbox_domains, "
            "virtual_alias_domains), each with `undelivered`, re-read at every reload; "
            "without a Postfix main.cf, the domains of the SQLite store's mailboxes "
            "(docs/directory.md).",
            "entry": DomainPolicy,
        },
    )
    auto_domains: bool = field(
        default=False,
        metadata={
            "doc": "Whether `domains` was left to Postfix (not written, or `auto`).",
            "written_as": "domains",  # not a key of its own: the loader sets it
        },
    )
    exceptions: dict[str, DomainPolicy] = field(
        default_factory=dict,
        metadata={
            "doc": "Per-address exceptions: a shell-style pattern (user@example.com, "
            "sales-*@example.com) to keys of `undelivered`. First match in file order wins; "
            "the address's domain must be local.",
            "entry": DomainPolicy,
        },
    )
    postmaster: str = setting(
        "",
        Kind.STR,
        "The mailbox postmaster mail reaches: every local domain's postmaster@ is aliased to it. "
        "Empty: each local domain needs its own postmaster mailbox (check refuses it otherwise).",
    )
    dictionary_attack: DictionaryAttackSettings = field(
        default_factory=DictionaryAttackSettings,
        metadata={"doc": "Dictionary-attack prevention (docs/dictionary-attacks.md)."},
    )
    queue: QueueSettings = field(
        default_factory=QueueSettings, metadata={"doc": "Queue high-water protection."}
    )
    postfix: PostfixSettings = field(
        default_factory=PostfixSettings,
        metadata={"doc": "The Postfix instance traqmilter serves (docs/directory.md)."},
    )
    policyd: PolicydSettings = field(
        default_factory=PolicydSettings, metadata={"doc": "The policy-delegation daemon."}
    )
    milter: MilterSettings = field(default_factory=MilterSettings, metadata={"doc": "The milter."})
    loops: LoopSettings = field(
        default_factory=LoopSettings, metadata={"doc": "Mail-loop protection (docs/actions.md)."}
    )
    bounce: BounceSettings = field(
        default_factory=BounceSettings,
        metadata={"doc": "The bounce action's DSNs: submission and backscatter limits."},
    )
    create: CreateSettings = field(
        default_factory=CreateSettings,
        metadata={"doc": "The create action: which mailboxes may be made, and how many."},
    )
    notifications: NotificationSettings = field(
        default_factory=NotificationSettings,
        metadata={"doc": "Digests for the administrator and the on_create hook."},
    )
    daemon: DaemonSettings = field(
        default_factory=DaemonSettings,
        metadata={
            "doc": "The process: foreground or not, pid file, user (docs/operations.md).",
            "restart": True,
        },
    )
    log: LogSettings = field(
        default_factory=LogSettings,
        metadata={
            "doc": "The event log: destination and format (docs/operations.md).",
            "restart": True,
        },
    )
    metrics: MetricsSettings = field(
        default_factory=MetricsSettings,
        metadata={
            "doc": "Prometheus metrics on a loopback port (docs/operations.md).",
            "restart": True,
        },
    )


def forward_targets(config: Config) -> dict[str, list[str]]:
    """Every catch-all target the config forwards to (a full address, as configured), with
    the keys that name it. An exception's bare local part is of each local domain its
    pattern can match."""
    found: dict[str, list[str]] = {}
    for domain, policy in config.domains.items():
        if policy.action is Action.FORWARD:
            key = f"domains.{domain}.forward_to"
            found.setdefault(policy.forward_address(domain), []).append(key)
    for pattern, policy in config.exceptions.items():
        if policy.action is Action.FORWARD:
            domain_pattern = pattern.rpartition("@")[2].lower()
            for domain in config.domains:
                if fnmatch.fnmatchcase(domain, domain_pattern):
                    key = f"exceptions.{pattern}.forward_to"
                    found.setdefault(policy.forward_address(domain), []).append(key)
    return found


def restart_keys(
    cls: type[Any] = Config, prefix: str = "", *, whole: bool = False
) -> dict[str, Kind]:
    """The paths (and kinds) of the keys a reload cannot change (declared with
    restart=True, or in a section declared so), in declaration order."""
    found: dict[str, Kind] = {}
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        if "kind" in f.metadata:
            if whole or f.metadata["restart"]:
                found[path] = f.metadata["kind"]
        elif "entry" not in f.metadata and "written_as" not in f.metadata:
            # a section; domains and exceptions (and auto_domains) always reload
            section = whole or f.metadata.get("restart", False)
            found.update(restart_keys(f.default_factory, f"{path}.", whole=section))  # type: ignore[arg-type]
    return found


def restart_changes(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value differs between a running config and a new one,
    each as "key: changed from OLD to NEW" (values as a config file spells them)."""
    changed = []
    for path, kind in restart_keys().items():
        before, after = old, new
        for name in path.split("."):
            before, after = getattr(before, name), getattr(after, name)
        if before != after:
            changed.append(f"{path}: changed from {_shown(before, kind)} to {_shown(after, kind)}")
    return changed


def _shown(value: Any, kind: Kind) -> str:
    if kind is Kind.MODE:
        return f"0{value:o}"
    if kind is Kind.DURATION:
        return f"{value:g}s"
    return repr(value)
