"""Postfix end to end (SPEC section 8): smtp-source -> Postfix -> smtp-sink, side by side.

    .venv/bin/python bench/postfix_bench.py [--messages 2000] [--sessions 10] [--rounds 3]

Setups, each a private Postfix built by tests/support/postfix.py from contrib/postfix/
(so the shipped configuration is what is measured), relaying everything to smtp-sink.
Recipients are `smtp-source -N` addresses, a new one per message (1k@fwd.example,
2k@fwd.example, ...): each is an alias of the directory (Postfix's virtual_alias_maps, the
shipped sqlite: map) for catchall@relay.example, so Postfix relays it, traqmilter knows it,
and no lookup is answered from a cache twice. The default setups, the issue's four:
  bare            no policy service, no milter; every recipient known
  pymilter        a do-nothing pymilter with pymilter's default negotiation (every
                  callback defined, none skipped, each answered), TCP_NODELAY listener
  traqmilter      `traqmilter policyd` + `traqmilter milter`, shipped defaults, a
                  `forward` domain; every recipient known
  traqmilter-5%   the same, every 20th recipient unknown (no alias): the milter forwards
                  it to catchall@relay.example
More, with --setups:
  nothing         a do-nothing asyncio policy server (policyd's PolicyServer answering
                  DUNNO) and a do-nothing recipient-rewriting pymilter, tuned as
                  NOTES-postfix.md says; it rewrites every message
  traqmilter-all-unknown   every recipient unknown: every message forwarded
  policyd+nothing-milter, nothing-policy+milter   the two daemons' costs apart
Each daemon runs in its own process, as deployed. Rounds alternate the order of the
setups; the figures are medians over rounds, with the lowest and highest round.

Throughput: `smtp-source -s SESSIONS -m MESSAGES -l 1024` wall time (every message
accepted), then the time until the queue is empty (every message relayed). Latency: one
session, one message at a time (`-s 1`), milliseconds per message: the 40 ms
Nagle/delayed-ACK stall of NOTES-postfix.md would show here.

Needs root and the Debian postfix package. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.postfix import (  # noqa: E402
    PostfixInstance,
    free_loopback_port,
    prepare_sqlite_directory,
)
from traqmilter.directory.sqlite import SqliteDirectory  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
STARTUP_SECONDS = 20.0
MESSAGE_BYTES = 1024
WARM_UP = 20

NOTHING_POLICY = """
import asyncio, sys
from policyd.server import PolicyServer
async def main():
    server = PolicyServer(lambda request: "DUNNO", listen=sys.argv[1])
    await server.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""

# A milter as pymilter's documentation writes one: every callback, default negotiation
# (pymilter asks for each callback a class defines, with a reply). TCP_NODELAY as ours, so
# that what it shows is the callbacks, not the Nagle stall.
DEFAULT_MILTER = """
import sys
import Milter
from traqmilter.milter.server import block_signals, register_callbacks, set_listener_nodelay
block_signals()

class Nothing(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE
    def hello(self, hostname):
        return Milter.CONTINUE
    def envfrom(self, sender, *params):
        return Milter.CONTINUE
    def envrcpt(self, recipient, *params):
        return Milter.CONTINUE
    def data(self):
        return Milter.CONTINUE
    def header(self, name, value):
        return Milter.CONTINUE
    def eoh(self):
        return Milter.CONTINUE
    def body(self, chunk):
        return Milter.CONTINUE
    def eom(self):
        return Milter.CONTINUE

port = int(sys.argv[1])
Milter.factory = Nothing
register_callbacks()  # every callback, as Milter.runmilter() registers them
Milter.setconn(f"inet:{port}@127.0.0.1")
Milter.register("pymilter", data=lambda ctx: ctx.getpriv().data(),
                unknown=lambda ctx, command: ctx.getpriv().unknown(command),
                negotiate=Milter.negotiate_callback)
Milter.opensocket(True)
set_listener_nodelay(port)
Milter.main()
"""

# The floor for a milter that rewrites recipients: pymilter with nothing but the work.
NOTHING_MILTER = """
import sys
import Milter
from traqmilter.milter.server import block_signals, set_listener_nodelay
block_signals()

class Rewrite(Milter.Base):
    def __init__(self):
        self.recipients = []

    @Milter.noreply
    def envfrom(self, sender, *params):
        self.recipients = []
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, recipient, *params):
        self.recipients.append(recipient)
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def eom(self):
        for recipient in self.recipients:
            self.delrcpt(recipient)
        self.addrcpt("<catchall@relay.example>")
        return Milter.CONTINUE

port = int(sys.argv[1])
Milter.factory = Rewrite
Milter.set_connect_callback(Milter.connect_callback)
Milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
Milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
Milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
Milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
Milter.set_close_callback(Milter.close_callback)
Milter.setconn(f"inet:{port}@127.0.0.1")
Milter.register("nothing", data=lambda ctx: ctx.getpriv().data(),
                negotiate=Milter.negotiate_callback)
Milter.opensocket(True)
set_listener_nodelay(port)
Milter.main()
"""


# setup name -> (policy service, milter, recipients): the services are None, "nothing",
# "pymilter" or "traqmilter"; the recipients one of RECIPIENTS.
SETUPS: dict[str, tuple[str | None, str | None, str]] = {
    "bare": (None, None, "known"),
    "pymilter": (None, "pymilter", "known"),
    "traqmilter": ("traqmilter", "traqmilter", "known"),
    "traqmilter-5%": ("traqmilter", "traqmilter", "5%"),
    "nothing": ("nothing", "nothing", "known"),
    "traqmilter-all-unknown": ("traqmilter", "traqmilter", "unknown"),
    # To tell the two daemons' costs apart:
    "policyd+nothing-milter": ("traqmilter", "nothing", "known"),
    "nothing-policy+milter": ("nothing", "traqmilter", "known"),
}
DEFAULT_SETUPS = "bare,pymilter,traqmilter,traqmilter-5%"
# smtp-source -t address for each kind of recipients; -N makes it <n><address>, n = 1, 2, ...
RECIPIENTS = {"known": "k@fwd.example", "5%": "u@fwd.example", "unknown": "x@fwd.example"}
UNKNOWN_EVERY = 20  # in the "5%" mix, <n>u@fwd.example has no alias when n % 20 == 0
ALIAS_TARGET = "catchall@relay.example"


def add_aliases(path: Path, count: int) -> None:
    """The recipients smtp-source -N will use, as aliases (bulk: add_alias commits each)."""
    rows = [(f"{n}k@fwd.example", ALIAS_TARGET) for n in range(1, count + 1)]
    rows += [(f"{n}u@fwd.example", ALIAS_TARGET) for n in range(1, count + 1) if n % UNKNOWN_EVERY]
    conn = sqlite3.connect(path, isolation_level=None)
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO aliases (address, target) VALUES (?, ?)", rows)
    conn.close()


@dataclass
class Result:
    setup: str
    accept_seconds: float
    drain_seconds: float
    serial_ms: float
    policy_cpu_us: float  # CPU time of the policy service per message
    milter_cpu_us: float  # CPU time of the milter per message
    forwarded: int = 0  # recipients traqmilter's milter forwarded (its event log), all runs


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


@contextlib.contextmanager
def daemon(argv: list[str], port: int, what: str, log: Path) -> Iterator[int]:
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, process, what)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def setup(
    name: str, root: Path, sink_port: int, aliases: int
) -> Iterator[tuple[PostfixInstance, str, dict[str, int]]]:
    """A running Postfix (and daemons) for one setup; yields it, the test recipient and
    the daemons' process ids by role ("policy", "milter")."""
    db = prepare_sqlite_directory(root / "db")
    store = SqliteDirectory(str(db / "directory.sqlite"))
    store.bulk_add(["postmaster@fwd.example"])
    store.sync_domains(["fwd.example"])
    store.close()
    add_aliases(db / "directory.sqlite", aliases)
    main_cf = {"relay_domains": "relay.example", "smtpd_reject_unlisted_recipient": "no"}
    with contextlib.ExitStack() as stack:
        policy_port, milter_port = free_loopback_port(), free_loopback_port()
        python = sys.executable
        pids: dict[str, int] = {}
        policy, milter, recipients = SETUPS[name]
        recipient = RECIPIENTS[recipients]
        config = root / "traqmilter.yaml"
        if "traqmilter" in (policy, milter):
            config.write_text(
                f"state_dir: {root}/state\n"
                f"directory: {{sqlite: {db}/directory.sqlite}}\n"
                f"domains: {{fwd.example: {{action: forward, forward_to: {ALIAS_TARGET}}}}}\n"
                f"policyd: {{listen: 'inet:127.0.0.1:{policy_port}'}}\n"
                f"milter: {{listen: 'inet:127.0.0.1:{milter_port}'}}\n"
                f"queue: {{directory: {root}/postfix/queue}}\n"
            )
        if policy == "nothing":
            argv = [python, "-c", NOTHING_POLICY, f"inet:127.0.0.1:{policy_port}"]
        else:
            argv = [python, "-m", "traqmilter", "-c", str(config), "policyd"]
        if policy is not None:
            assert policy_port is not None
            pids["policy"] = stack.enter_context(
                daemon(argv, policy_port, policy, root / "policy.log")
            )
        if milter == "nothing":
            argv = [python, "-c", NOTHING_MILTER, str(milter_port)]
        elif milter == "pymilter":
            argv = [python, "-c", DEFAULT_MILTER, str(milter_port)]
        else:
            argv = [python, "-m", "traqmilter", "-c", str(config), "milter"]
        if milter is not None:
            assert milter_port is not None
            pids["milter"] = stack.enter_context(
                daemon(argv, milter_port, milter, root / "milter.log")
            )
        postfix = PostfixInstance(
            root / "postfix",
            sqlite_path=db / "directory.sqlite",
            relay_port=sink_port,
            policy_port=policy_port if policy else None,
            milter_port=milter_port if milter else None,
            extra_main_cf=main_cf,
        )
        stack.enter_context(postfix)
        yield postfix, recipient, pids


def source(postfix: PostfixInstance, recipient: str, *, sessions: int, messages: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-N",
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(MESSAGE_BYTES),
            "-f",
            "sender@remote.example",
            "-t",
            recipient,
            f"{postfix.host}:{postfix.smtp_port}",
        ],
        check=True,
        timeout=600,
    )
    return time.monotonic() - started


def run_setup(name: str, sink_port: int, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        aliases = max(args.messages, args.serial, WARM_UP)
        with setup(name, root, sink_port, aliases) as (postfix, recipient, pids):
            source(postfix, recipient, sessions=1, messages=WARM_UP)  # warm up every process
            postfix.wait_queue_empty(120)
            serial = source(postfix, recipient, sessions=1, messages=args.serial)
            postfix.wait_queue_empty(120)
            cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            started = time.monotonic()
            accept = source(postfix, recipient, sessions=args.sessions, messages=args.messages)
            cpu = {
                role: (cpu_seconds(pid) - cpu_before[role]) / args.messages * 1e6
                for role, pid in pids.items()
            }
            postfix.wait_queue_empty(600)
            drain = time.monotonic() - started
            log = root / "milter.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            forwarded = text.count(": forwarded: ")
    return Result(
        name,
        accept,
        drain,
        serial / args.serial * 1000,
        cpu.get("policy", 0),
        cpu.get("milter", 0),
        forwarded,
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--serial", type=int, default=200, help="messages in the latency run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", default=DEFAULT_SETUPS, help=f"from {', '.join(SETUPS)}")
    args = parser.parse_args()
    setups = args.setups.split(",")
    sink_port = free_loopback_port()
    sink = subprocess.Popen(
        [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1000"],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, list[Result]] = {name: [] for name in setups}
    try:
        time.sleep(0.3)
        for round_number in range(args.rounds):
            order = setups if round_number % 2 == 0 else list(reversed(setups))
            for name in order:
                result = run_setup(name, sink_port, args)
                results[name].append(result)
                accept = args.messages / result.accept_seconds
                drain = args.messages / result.drain_seconds
                print(
                    f"round {round_number + 1} {name:14s} accept {accept:7.1f} msg/s,"
                    f" end to end {drain:7.1f} msg/s, serial {result.serial_ms:6.2f} ms/msg,"
                    f" CPU us/msg policy {result.policy_cpu_us:.0f}"
                    f" milter {result.milter_cpu_us:.0f}, forwarded {result.forwarded}",
                    flush=True,
                )
    finally:
        sink.terminate()
        sink.wait()

    report(results, setups, args)


def spread(values: list[float], digits: int) -> str:
    """median (lowest-highest) of values."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def report(results: dict[str, list[Result]], setups: list[str], args: argparse.Namespace) -> None:
    """Medians over rounds with their range; ratios are taken round by round (the setups
    of one round ran minutes apart, so they shared the machine's state), then their median."""
    rounds = len(results[setups[0]])
    print(
        f"\n{args.messages} messages of {MESSAGE_BYTES} bytes, {args.sessions} sessions, "
        f"{rounds} rounds; median (lowest-highest round)"
    )

    def rates(name: str) -> list[float]:
        return [args.messages / r.accept_seconds for r in results[name]]

    def ratio(name: str, other: str, field: str = "rate") -> str:
        if other not in results:
            return "-"
        if field == "rate":
            mine, theirs = rates(name), rates(other)
        else:
            mine = [getattr(r, field) for r in results[name]]
            theirs = [getattr(r, field) for r in results[other]]
        return spread([a / b for a, b in zip(mine, theirs, strict=True)], 2)

    print(
        "| setup | accepted msg/s | x bare | x pymilter | end-to-end msg/s "
        "| serial ms/msg | serial x bare | policy CPU us/msg | milter CPU us/msg |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in setups:
        runs = results[name]
        print(
            f"| {name} | {spread(rates(name), 0)} | {ratio(name, 'bare')} "
            f"| {ratio(name, 'pymilter')} "
            f"| {spread([args.messages / r.drain_seconds for r in runs], 0)} "
            f"| {spread([r.serial_ms for r in runs], 2)} "
            f"| {ratio(name, 'bare', 'serial_ms')} "
            f"| {statistics.median(r.policy_cpu_us for r in runs):.0f} "
            f"| {statistics.median(r.milter_cpu_us for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
