"""Soak (issue 11, item 4): policyd and the milter under steady load, sampled for growth.

    .venv/bin/python bench/soak.py [--policy-requests 1000000] [--messages 100000]
                                   [--interval 10] [--plot soak.png]

One private Postfix (tests/support/postfix.py, contrib/postfix as shipped) with
`traqmilter policyd` and `traqmilter milter` in front, relaying to smtp-sink, and two loads
at once, both bounded:
- MESSAGES messages through Postfix (`smtp-source -N -s 10`, 1 KiB each), every 20th
  recipient unknown in a `forward` domain, the rest aliases (bench/postfix_bench.py's
  "traqmilter-5%" mix): each is a milter transaction, and a policy request from Postfix;
- POLICY_REQUESTS raw policy requests straight to policyd over 10 persistent connections
  (bench/policyd_bench.py's mix over 100,000 mailboxes, harvesters included, in batches
  with new clients and addresses each).
Every INTERVAL seconds it samples RSS, open file descriptors and threads of both daemons
(/proc), and prints the table at the end with each figure's growth from the first sample
after warm-up (WARM_UP_SECONDS) to the last; the goal is no growth beyond 10%. With
--plot, a PNG of the samples (matplotlib, an optional dependency: pip install matplotlib).

Needs root and the Debian postfix package. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import policyd_bench  # noqa: E402
import postfix_bench  # noqa: E402
from postfix_bench import (  # noqa: E402
    ALIAS_TARGET,
    RECIPIENTS,
    SMTP_SINK,
    SMTP_SOURCE,
    add_aliases,
    daemon,
)

from tests.support.postfix import (  # noqa: E402
    PostfixInstance,
    free_loopback_port,
    prepare_sqlite_directory,
)
from traqmilter.directory.sqlite import SqliteDirectory  # noqa: E402

WARM_UP_SECONDS = 30.0
POLICY_BATCH = 50_000
GOAL_GROWTH = 0.10


@dataclass
class Sample:
    seconds: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    threads: dict[str, int]


def sample(pids: dict[str, int], started: float) -> Sample:
    rss, fds, threads = {}, {}, {}
    for role, pid in pids.items():
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        rss[role] = int(fields["VmRSS"].split()[0]) / 1024
        threads[role] = int(fields["Threads"])
        fds[role] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return Sample(time.monotonic() - started, rss, fds, threads)


def sampler(
    pids: dict[str, int], interval: float, stop: threading.Event, out: list[Sample]
) -> None:
    started = time.monotonic()
    while True:
        out.append(sample(pids, started))
        if stop.wait(interval):
            out.append(sample(pids, started))
            return


def policy_load(port: int, pid: int, total: int, results: list[policyd_bench.RunResult]) -> None:
    """POLICY_BATCH requests at a time, each batch with new clients and unknown addresses."""
    run_id = 500
    while total > 0:
        count = min(POLICY_BATCH, total)
        requests = policyd_bench.build_requests(count, run_id)
        results.append(policyd_bench.drive(port, requests, policyd_bench.CONNECTIONS, pid))
        total -= count
        run_id += 1


@contextlib.contextmanager
def world(root: Path, sink_port: int, messages: int):  # type: ignore[no-untyped-def]
    """Postfix, policyd and milter; yields (postfix, pids, policy port)."""
    db = prepare_sqlite_directory(root / "db")
    store = SqliteDirectory(str(db / "directory.sqlite"))
    store.bulk_add(["postmaster@fwd.example", *policyd_bench.mailbox_addresses()])
    store.sync_domains(["fwd.example"])
    store.close()
    add_aliases(db / "directory.sqlite", messages)
    policy_port, milter_port = free_loopback_port(), free_loopback_port()
    config = root / "traqmilter.yaml"
    config.write_text(
        f"state_dir: {root}/state\n"
        f"directory: {{sqlite: {db}/directory.sqlite}}\n"
        "domains:\n"
        f"  fwd.example: {{action: forward, forward_to: {ALIAS_TARGET}}}\n"
        "  example.com: {}\n"
        "  example.org: {}\n"
        "postmaster: postmaster@fwd.example\n"
        f"policyd: {{listen: 'inet:127.0.0.1:{policy_port}'}}\n"
        f"milter: {{listen: 'inet:127.0.0.1:{milter_port}'}}\n"
        f"queue: {{directory: {root}/postfix/queue}}\n"
    )
    python = sys.executable
    with contextlib.ExitStack() as stack:
        pids = {
            "policyd": stack.enter_context(
                daemon(
                    [python, "-m", "traqmilter", "-c", str(config), "policyd"],
                    policy_port,
                    "policyd",
                    root / "policy.log",
                )
            ),
            "milter": stack.enter_context(
                daemon(
                    [python, "-m", "traqmilter", "-c", str(config), "milter"],
                    milter_port,
                    "milter",
                    root / "milter.log",
                )
            ),
        }
        postfix = PostfixInstance(
            root / "postfix",
            sqlite_path=db / "directory.sqlite",
            relay_port=sink_port,
            policy_port=policy_port,
            milter_port=milter_port,
            extra_main_cf={
                "relay_domains": "relay.example",
                "smtpd_reject_unlisted_recipient": "no",
            },
        )
        stack.enter_context(postfix)
        yield postfix, pids, policy_port


def growth(samples: list[Sample], pick) -> float:  # type: ignore[no-untyped-def]
    warm = [s for s in samples if s.seconds >= WARM_UP_SECONDS] or samples
    first, last = pick(warm[0]), pick(warm[-1])
    return (last - first) / first if first else 0.0


def report(samples: list[Sample], roles: list[str]) -> bool:
    header = ["t s"] + [f"{role} {what}" for role in roles for what in ("RSS MB", "fds", "thr")]
    print("| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for s in samples:
        cells = [f"{s.seconds:.0f}"]
        for role in roles:
            cells += [f"{s.rss_mb[role]:.1f}", str(s.fds[role]), str(s.threads[role])]
        print("| " + " | ".join(cells) + " |")
    ok = True
    print(f"\ngrowth from the first sample after {WARM_UP_SECONDS:.0f} s to the last:")
    for role in roles:
        figures = {
            "RSS": growth(samples, lambda s, r=role: s.rss_mb[r]),
            "fds": growth(samples, lambda s, r=role: s.fds[r]),
            "threads": growth(samples, lambda s, r=role: s.threads[r]),
        }
        ok = ok and all(g <= GOAL_GROWTH for g in figures.values())
        print(f"  {role}: " + ", ".join(f"{k} {v:+.1%}" for k, v in figures.items()))
    print(f"goal (no growth beyond {GOAL_GROWTH:.0%}): {'met' if ok else 'NOT met'}")
    return ok


def plot(samples: list[Sample], roles: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot")
        return
    figure, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 8))
    times = [s.seconds for s in samples]
    for axis, (label, pick) in zip(
        axes,
        [
            ("RSS MB", lambda s, r: s.rss_mb[r]),
            ("open fds", lambda s, r: s.fds[r]),
            ("threads", lambda s, r: s.threads[r]),
        ],
        strict=True,
    ):
        for role in roles:
            axis.plot(times, [pick(s, role) for s in samples], marker=".", label=role)
        axis.set_ylabel(label)
        axis.legend()
    axes[-1].set_xlabel("seconds")
    figure.suptitle("traqmilter soak")
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy-requests", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--plot", help="write a PNG of the samples here (needs matplotlib)")
    args = parser.parse_args()
    sink_port = free_loopback_port()
    sink = subprocess.Popen(
        [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1000"],
        stdout=subprocess.DEVNULL,
    )
    samples: list[Sample] = []
    policy_results: list[policyd_bench.RunResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            root = Path(tmp)
            root.chmod(0o755)
            with world(root, sink_port, args.messages) as (postfix, pids, policy_port):
                stop = threading.Event()
                watcher = threading.Thread(
                    target=sampler, args=(pids, args.interval, stop, samples), daemon=True
                )
                watcher.start()
                started = time.monotonic()
                policy = threading.Thread(
                    target=policy_load,
                    args=(policy_port, pids["policyd"], args.policy_requests, policy_results),
                )
                policy.start()
                mail = subprocess.run(
                    [
                        SMTP_SOURCE,
                        "-N",
                        "-s",
                        str(args.sessions),
                        "-m",
                        str(args.messages),
                        "-l",
                        str(postfix_bench.MESSAGE_BYTES),
                        "-f",
                        "sender@remote.example",
                        "-t",
                        RECIPIENTS["5%"],
                        f"{postfix.host}:{postfix.smtp_port}",
                    ],
                    timeout=24 * 3600,
                    check=False,
                )
                mail_seconds = time.monotonic() - started
                policy.join()
                postfix.wait_queue_empty(600)
                stop.set()
                watcher.join()
                log = (root / "milter.log").read_text(errors="replace")
    finally:
        sink.terminate()
        sink.wait()
    rates = sorted(r.requests_per_second for r in policy_results)
    print(
        f"{args.messages} messages through Postfix in {mail_seconds:.0f} s (smtp-source exit "
        f"{mail.returncode}; the milter forwarded {log.count(': forwarded: ')}); "
        f"{args.policy_requests} policy requests in {len(policy_results)} batches, "
        f"median batch {rates[len(rates) // 2]:,.0f} req/s"
    )
    roles = ["policyd", "milter"]
    ok = report(samples, roles)
    if args.plot:
        plot(samples, roles, args.plot)
    sys.exit(0 if ok and mail.returncode == 0 else 1)


if __name__ == "__main__":
    main()
