"""The `traqmilter` command: run the daemons, check a config, explain a decision, report
what create, forward and bounce did, manage mailboxes and dictionary-attack blocks.

Exit status: 0 success; 1 the thing asked for does not exist (a mailbox, a block);
2 a usage error (including a removal refused without --force, a bad --since, a log that
cannot be read), or a configuration that cannot be served (what `check` reports).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from traqmilter import __version__
from traqmilter.config import ConfigError, ConfigProblem, load_config
from traqmilter.core.address import Address, AddressError, parse_address
from traqmilter.core.attack import key_text, text_key
from traqmilter.core.engine import RcptDecision, RcptFacts
from traqmilter.core.rule_names import RuleName
from traqmilter.core.settings import Action, Config, forward_targets
from traqmilter.core.verify import VERIFIED_BY, header_verdict
from traqmilter.directory import MailboxStore, open_store
from traqmilter.directory.store import DirectoryError, normalise_key
from traqmilter.logs import configure_logging
from traqmilter.runtime import Runtime, StartupError, open_runtime
from traqmilter.state import BlockStore, StateError, open_block_store

log = logging.getLogger("traqmilter")

DEFAULT_PATH = "/etc/traqmilter/traqmilter.yaml"


def config_file(path: str | None) -> str | None:
    """The file the command reads: the one -c names, else DEFAULT_PATH when it exists;
    None: the embedded default. Asked again at each reload, as at start."""
    if path is None and Path(DEFAULT_PATH).exists():
        return DEFAULT_PATH
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = with_daemon_options(load_config(config_file(args.config)), args)
        if args.func in DAEMON_COMMANDS:
            configure_logging(config.log, DAEMON_COMMANDS[args.func], verbose=args.verbose)
        result: int = args.func(args, config)
        return result
    except (ConfigError, StartupError, DirectoryError, StateError) as exc:
        for line in str(exc).splitlines():
            print(f"traqmilter: fatal: {line}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traqmilter",
        description="Handle mail for unknown local recipients on Postfix and Sendmail.",
    )
    parser.add_argument(
        "-c",
        "--config",
        help=f"config file (default {DEFAULT_PATH} if present, else the embedded default)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="daemons stay in the foreground whatever daemon.foreground says",
    )
    parser.add_argument(
        "--pid-file", metavar="PATH", help="daemons write their pid here ('' for none)"
    )
    parser.add_argument("--version", action="version", version=f"traqmilter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run policyd and the milter, supervised (see daemon:)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "policyd", help="run the Postfix policy daemon (and transport socketmap) alone"
    )
    p.set_defaults(func=cmd_policyd)
    p = sub.add_parser("milter", help="run the milter alone")
    p.set_defaults(func=cmd_milter)
    p = sub.add_parser("check", help="validate the config and environment")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("explain", help="show what would happen to mail for ADDRESS, and why")
    p.add_argument("address")
    p.add_argument("--sender", default="sender@example.invalid", help="envelope sender ('' = null)")
    p.add_argument("--client", default="192.0.2.1", help="client IP address")
    p.add_argument("--sasl-username", default="")
    p.add_argument("--helo", default="", help="HELO name (for an SPF check)")
    p.add_argument(
        "--spf",
        action="store_true",
        help="run the SPF check bounce.spf_check configures (asks DNS), as the milter would",
    )
    p.add_argument(
        "--auth-results",
        action="append",
        default=[],
        metavar="VALUE",
        help="an Authentication-Results header value the message would carry (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)

    directory = sub.add_parser("directory", help="set up the recipient directory")
    dsub = directory.add_subparsers(dest="directory_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "init",
        help="create the directory's tables, or migrate them to this version's schema "
        "(PostgreSQL: run once, from any host; SQLite: creates the file)",
    )
    p.set_defaults(func=cmd_directory_init)

    mailbox = sub.add_parser("mailbox", help="manage mailboxes in the directory")
    msub = mailbox.add_subparsers(dest="mailbox_command", required=True, metavar="ACTION")
    p = msub.add_parser("add", help="add a mailbox")
    p.add_argument("address")
    p.add_argument("--quota", type=int, default=0, help="quota in bytes (0: none)")
    p.set_defaults(func=cmd_mailbox_add)
    p = msub.add_parser("list", help="list mailboxes")
    p.add_argument("--domain")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(func=cmd_mailbox_list)
    p = msub.add_parser("show", help="show one mailbox")
    p.add_argument("address")
    p.set_defaults(func=cmd_mailbox_show)
    p = msub.add_parser("remove", help="remove a mailbox (its Maildir stays on disk)")
    p.add_argument("address")
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove the postmaster or a catch-all target the config forwards to",
    )
    p.set_defaults(func=cmd_mailbox_remove)

    p = sub.add_parser(
        "report",
        help="summarise what create, forward and bounce did (as the digest does), from the "
        "event log",
    )
    p.add_argument(
        "--since",
        default="1d",
        type=_since,
        metavar="DURATION",
        help="how far back, with its unit: 30m, 12h, 1d, 7d (default 1d)",
    )
    p.add_argument(
        "logs",
        nargs="*",
        metavar="LOG",
        help="log files to read (e.g. /var/log/mail.log; '-' or none: standard input)",
    )
    p.set_defaults(func=cmd_report)

    blocks = sub.add_parser("blocks", help="list or clear dictionary-attack blocks")
    bsub = blocks.add_subparsers(dest="blocks_command", required=True, metavar="ACTION")
    p = bsub.add_parser("list", help="list blocked clients")
    p.set_defaults(func=cmd_blocks_list)
    p = bsub.add_parser("clear", help="lift the block of CLIENT (or --all)")
    p.add_argument("client", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_blocks_clear)
    return parser


def _since(text: str) -> float:
    from traqmilter.report import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:  # argparse: "argument --since: ...", exit 2
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_daemon_options(config: Config, args: argparse.Namespace) -> Config:
    """The config with the command line's daemon options in place of daemon.*."""
    daemon = config.daemon
    if args.foreground:
        daemon = dataclasses.replace(daemon, foreground=True)
    if args.pid_file is not None:
        if args.pid_file and not args.pid_file.startswith("/"):
            raise ConfigError("--pid-file", [ConfigProblem("", None, "must be an absolute path")])
        daemon = dataclasses.replace(daemon, pid_file=args.pid_file)
    return dataclasses.replace(config, daemon=daemon)


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from traqmilter.daemons import run_all

    return run_all(args.config, config)


def cmd_policyd(args: argparse.Namespace, config: Config) -> int:
    from traqmilter.daemons import run_policyd

    return run_policyd(args.config, config, _config_reader(args))


def cmd_milter(args: argparse.Namespace, config: Config) -> int:
    from traqmilter.daemons import run_milter

    return run_milter(args.config, config, _config_reader(args))


def _config_reader(args: argparse.Namespace) -> Callable[[str | None], Config]:
    """How a daemon re-reads its config at reload: as at start, with the command line's
    daemon options, so that they do not read as changed restart-only keys."""
    return lambda path: with_daemon_options(load_config(config_file(path)), args)


DAEMON_COMMANDS = {cmd_run: "run", cmd_policyd: "policyd", cmd_milter: "milter"}
"""The commands that run as daemons, and their name in the log (`log:` applies to them)."""


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    runtime = open_runtime(config, announce=False)  # raises StartupError with every problem
    store = runtime.directory.store.path
    try:
        runtime.blocks.check()  # a daemon starts without Redis; check says it is away
        discovery = runtime.directory.discovery
        if discovery is not None:  # directory.postfix: auto: say what was found
            for line in discovery.summary():
                print(line)
            unavailable = [t for t in discovery.tables if t.last_error]
        else:
            unavailable = []
        domains = runtime.config.domains  # with `domains: auto`, as discovered
    except StateError as exc:
        raise StartupError(str(exc)) from None
    finally:
        runtime.close()
    if unavailable:
        for table in unavailable:
            print(
                f"traqmilter: {table.name}: cannot be asked ({table.last_error}); unknown "
                "recipients would be tempfailed: make it answer, or configure the directory "
                "explicitly (directory.postfix: none)",
                file=sys.stderr,
            )
        return 2
    if config.directory.postgresql:  # opening it connected and checked the schema
        print(f"traqmilter: directory {store}: connected, schema current")
    if not runtime.config.auto_domains:
        how = ""
    elif discovery is not None and discovery.available:
        how = " from Postfix"
    else:
        how = " from the SQLite store's mailboxes"
    state = config.state
    where = f", state on Redis {state.url.partition('?')[0]}" if state.backend == "redis" else ""
    print(f"traqmilter: config ok ({len(domains)} local domains{how}{where})")
    return 0


def cmd_directory_init(args: argparse.Namespace, config: Config) -> int:
    settings = config.directory
    if settings.postgresql:
        from traqmilter.directory.postgresql import SCHEMA_VERSION, describe, migrate

        applied = migrate(settings.postgresql, password_file=settings.postgresql_password_file)
        where = describe(settings.postgresql)
        if applied:
            print(f"{where}: applied {', '.join(applied)} (schema version {SCHEMA_VERSION})")
        else:
            print(f"{where}: schema version {SCHEMA_VERSION} is current")
        return 0
    open_store(settings).close()
    print(f"{settings.sqlite}: ready")
    return 0


def cmd_explain(args: argparse.Namespace, config: Config) -> int:
    runtime = open_runtime(config, check=False, announce=False)
    try:
        runtime.queue.sample()
        facts = RcptFacts(args.address, args.sender, args.client, args.sasl_username, args.helo)
        spf = None
        if args.spf:
            # Imported here: policyd's process imports this module, and never asks DNS.
            from traqmilter.spf import spf_checker

            spf = spf_checker(config.bounce)
        decision = runtime.engine.rcpt(facts, record=False, spf=spf)
        known_by = _known_by(runtime, decision)
    finally:
        runtime.close()
    if decision.reply is None:
        reply = "DUNNO (accepted at RCPT time)"
    else:  # as the SMTP client sees it
        r = decision.reply
        reply = f"{r.code} {r.enhanced_code} {r.rcpt_text(args.address)}"
    fields = {
        "address": args.address,
        "rule": decision.rule,
        "reply": reply,
        "action": decision.action.value if decision.action else None,
        "sender": _sender_verification(decision, args, config),
        "transaction": _transaction(decision),
        "known_by": known_by,
        **_told(decision),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            shown = json.dumps(value) if isinstance(value, list) else value
            print(f"{key}: {shown if shown is not None else '-'}")
    return 0


def _sender_verification(
    decision: RcptDecision, args: argparse.Namespace, config: Config
) -> str | None:
    """bounce_to: verified, in words: what verified the sender, or what happens at end of
    message (core.plan's rules unverified / unverified_discard)."""
    said = {
        RuleName.UNKNOWN_BOUNCE_TRUSTED_CLIENT: "verified: SASL-authenticated or exempt client",
        RuleName.UNKNOWN_BOUNCE_SPF_PASS: "verified: SPF pass (traqmilter's own check)",
        RuleName.UNKNOWN_BOUNCE_UNVERIFIED: "not verified: SPF did not pass; refused at RCPT time",
    }
    if decision.rule in said:
        return said[decision.rule]
    if decision.rule is not RuleName.UNKNOWN_BOUNCE_VERIFY_AT_EOM or decision.policy is None:
        return None
    verdict = header_verdict(args.auth_results, config.bounce.authserv_id, args.sender)
    if verdict.verified:
        rule = VERIFIED_BY[verdict.how]
        return f"verified at end of message: {verdict.how} (rule {rule})"
    if decision.policy.unverified == "discard":
        then = f"dropped without a DSN (rule {RuleName.UNVERIFIED_DISCARD})"
    else:
        then = f"550 5.1.1 for the message (rule {RuleName.UNVERIFIED})"
    return f"not verified at end of message: {verdict.how}; {then}"


def _told(decision: RcptDecision) -> dict[str, str | list[str] | None]:
    """Who is told about the recipient (docs/notifications.md): the digest's notify address
    for create, forward and bounce, and create's on_create command (run without a shell;
    the address is appended)."""
    policy, action = decision.policy, decision.action
    if policy is None or action not in (Action.CREATE, Action.FORWARD, Action.BOUNCE):
        return {"notify": None, "on_create": None}
    hook = policy.on_create if action is Action.CREATE else ()
    return {
        "notify": policy.notify or None,
        "on_create": [*hook, "ADDRESS"] if hook else None,
    }


def _transaction(decision: RcptDecision) -> str | None:
    """core.plan.transaction_split in words, for a recipient it concerns."""
    # Imported here: policyd's process imports this module and never plans a message.
    from traqmilter.core.plan import decided_at_end_of_message
    from traqmilter.core.replies import S452_SEPARATE_TRANSACTION as split

    if not decided_at_end_of_message(decision):
        return None
    return (
        "shares a transaction only with recipients whose fate end of message decides too: "
        "of two recipients of different kinds, the later one is answered "
        f"{split.code} {split.enhanced_code} at RCPT time by the milter "
        f"(rule {RuleName.SEPARATE_TRANSACTION}) and sent again by the client in a "
        "transaction of its own; an unknown one counts towards dictionary_attack.threshold "
        "at the deferred attempt, not again when it is sent again"
    )


def _known_by(runtime: Runtime, decision: RcptDecision) -> str | None:
    """The directory source (a Postfix table, the SQLite store, a list) that knew the
    recipient, asked with the keys the engine asked (the address with its extension first)."""
    address = decision.recipient
    if decision.rule is not RuleName.KNOWN or address is None:
        return None
    keys = [address.full_key, address.key] if address.extension else [address.key]
    for key in keys:
        found = runtime.directory.source_of(key)
        if found is not None:
            return found
    return None


def cmd_report(args: argparse.Namespace, config: Config) -> int:
    from traqmilter.core.digest import DomainTallies, digest_text, mail_date
    from traqmilter.report import Reading, bounded_lines

    paths = args.logs or ["-"]
    if paths == ["-"] and sys.stdin.isatty():
        print(
            "traqmilter: report: name a log file (e.g. /var/log/mail.log) or pipe one in "
            "(journalctl -u traqmilter -o short-iso | traqmilter report)",
            file=sys.stderr,
        )
        return 2
    settings, directory = config.notifications, config.directory
    reading = Reading(DomainTallies(max_tracked=settings.max_tracked))
    until = time.time()
    since = until - args.since

    def parse(text: str) -> Address:
        return parse_address(
            text,
            delimiters=directory.recipient_delimiter,
            fold_case=not directory.case_sensitive_local_parts,
        )

    for path in paths:
        try:
            with (
                open(path, "rb")
                if path != "-"
                else contextlib.nullcontext(sys.stdin.buffer) as stream
            ):
                reading.read(bounded_lines(stream), since=since, now=until, parse=parse)
        except OSError as exc:
            print(f"traqmilter: report: {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    summaries = reading.tallies.summaries(settings.top)
    text = digest_text(summaries, since=mail_date(since), until=mail_date(until))
    nothing = "" if summaries else "\nNothing: no mailbox created, no unknown address used.\n"
    sys.stdout.write(text + nothing)
    notes = [
        f"{reading.counted} recipients counted",
        f"{reading.undated} decision lines without a time skipped" if reading.undated else "",
        f"{reading.malformed} malformed lines skipped" if reading.malformed else "",
        f"{reading.tallies.dropped} beyond 1000 domains" if reading.tallies.dropped else "",
    ]
    print(f"traqmilter: report: {'; '.join(filter(None, notes))}", file=sys.stderr)
    return 0


def _store(config: Config) -> MailboxStore:
    return open_store(config.directory)


def cmd_mailbox_add(args: argparse.Namespace, config: Config) -> int:
    try:
        address = parse_address(
            args.address, fold_case=not config.directory.case_sensitive_local_parts
        )
    except AddressError as exc:
        print(f"traqmilter: {args.address!r}: {exc}", file=sys.stderr)
        return 2
    store = _store(config)
    try:
        store.add_mailbox(address, quota_bytes=args.quota)
    except (DirectoryError, ValueError) as exc:
        print(f"traqmilter: {address.key}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"added {address.key}")
    return 0


def cmd_mailbox_list(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        for box in store.list_mailboxes(args.domain, limit=args.limit):
            print(f"{box.address}\t{box.maildir}\t{'active' if box.active else 'inactive'}")
    finally:
        store.close()
    return 0


def cmd_mailbox_show(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        box = store.get_mailbox(args.address)
    finally:
        store.close()
    if box is None:
        print(f"traqmilter: no mailbox {args.address}", file=sys.stderr)
        return 1
    for name, value in dataclasses.asdict(box).items():
        print(f"{name}: {value}")
    return 0


def protected_mailboxes(config: Config) -> dict[str, str]:
    """The addresses (as stored) mail must keep reaching while this config serves, and why:
    every local domain's postmaster and the `postmaster:` target, and the catch-all
    targets that domains forward to. Without one, postmaster mail bounces, or unknown
    recipients of a forwarding domain are deferred."""
    fold_case = not config.directory.case_sensitive_local_parts
    wanted = {f"postmaster@{domain}": "a local domain's postmaster" for domain in config.domains}
    if config.postmaster:
        wanted[config.postmaster] = "the postmaster (postmaster:)"
    for target, keys in forward_targets(config).items():
        wanted[target] = f"the catch-all target of {', '.join(keys)}"
    protected = {}
    for address, why in wanted.items():
        try:
            protected[normalise_key(address, fold_case=fold_case)] = why
        except ValueError:
            continue  # check_semantics refuses such a config; nothing to protect
    return protected


def cmd_mailbox_remove(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        try:
            key = store.stored_key(args.address)
        except ValueError as exc:
            print(f"traqmilter: {exc}", file=sys.stderr)
            return 2
        why = protected_mailboxes(config).get(key)
        if why is not None and not args.force:
            print(
                f"traqmilter: {args.address} is {why}: mail for it would be deferred or "
                "bounced; change the config first, or use --force",
                file=sys.stderr,
            )
            return 2
        removed = store.remove_mailbox(key)
    finally:
        store.close()
    if not removed:
        print(f"traqmilter: no mailbox {args.address}", file=sys.stderr)
        return 1
    print(f"removed {args.address}")
    return 0


def _block_store(config: Config) -> BlockStore:
    store = open_block_store(config)
    try:
        store.check()
    except BaseException:
        store.close()
        raise
    return store


def cmd_blocks_list(args: argparse.Namespace, config: Config) -> int:
    store = _block_store(config)
    try:
        for block in store.load(time.time()):
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(block.until))
            print(f"{block.client}\tuntil {until}\t{block.attempts} unknown recipients")
    finally:
        store.close()
    return 0


def cmd_blocks_clear(args: argparse.Namespace, config: Config) -> int:
    if not args.all and not args.client:
        print("traqmilter: name a client or use --all", file=sys.stderr)
        return 2
    store = _block_store(config)
    try:
        if args.all:
            store.clear()
            print("cleared all blocks")
        else:
            prefix = config.dictionary_attack.ipv6_prefix
            key = text_key(args.client, prefix)
            if key is None:
                print(f"traqmilter: {args.client!r} is not an IP address", file=sys.stderr)
                return 2
            client = key_text(key, prefix)
            if not store.remove(client):
                print(f"traqmilter: {client} is not blocked", file=sys.stderr)
                return 1
            print(f"cleared {client}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
