"""Prometheus metrics of one daemon process, served on a loopback port.

Each daemon (policyd, the milter) is a process of its own with its own counters, so each
serves its own port: `metrics.listen` for policyd, `metrics.milter_listen` for the milter.
Counters start at zero when the process starts (Prometheus' rate() handles restarts) and
survive a reload (SIGHUP), which keeps this object.

The metrics live in a registry of their own (not prometheus_client's global one, which
would add the process and platform collectors and be shared by every test in a process).

Cardinality is bounded: the `domain` label is a configured local domain or "-", and `rule`
is a name from the engine's rule table.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from traqmilter.core.listen import parse_listen
from traqmilter.directory.stats import BUCKETS

if TYPE_CHECKING:
    from collections.abc import Iterator
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Metric

    from traqmilter.core.engine import RcptDecision
    from traqmilter.directory.stats import LookupStats


class StateHealth(Protocol):
    """What the metrics read of a block store (traqmilter.state.BlockStore)."""

    backend: str
    last_sync: float

    @property
    def up(self) -> bool: ...


NO_DOMAIN = "-"
# Policy decisions take tens of microseconds; a directory lookup may take milliseconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class DirectoryCollector(Collector):
    """The lookups of a network directory backend (PostgreSQL), read at scrape time from
    the counters the store keeps (traqmilter.directory.stats); nothing while none is used."""

    def __init__(self, daemon: str, stats: LookupStats) -> None:
        self.daemon = daemon
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if not stats.in_use:
            return
        labels = [self.daemon, stats.backend]
        lookups = CounterMetricFamily(
            "traqmilter_directory_lookups",
            "Directory lookups by result: cache_hit, known, unknown (server answered) or "
            "error (failed or timed out: the recipient was tempfailed).",
            labels=["daemon", "backend", "result"],
        )
        for result, count in (
            ("cache_hit", stats.cache_hits),
            ("known", stats.known),
            ("unknown", stats.unknown),
            ("error", stats.errors),
        ):
            lookups.add_metric([*labels, result], count)
        yield lookups
        cumulative, buckets = 0, []
        for bound, count in zip((*BUCKETS, "+Inf"), stats.bucket_counts, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        latency = HistogramMetricFamily(
            "traqmilter_directory_lookup_seconds",
            "Time of directory lookups that went to the server (cache misses), errors included.",
            labels=["daemon", "backend"],
        )
        latency.add_metric(labels, buckets, stats.seconds_sum)
        yield latency
        up = GaugeMetricFamily(
            "traqmilter_directory_backend_up",
            "1 while the backend's change listener is connected (its lookup cache is used).",
            labels=["daemon", "backend"],
        )
        up.add_metric(labels, 1 if stats.backend_up else 0)
        yield up


class Metrics:
    def __init__(self, daemon: str, directory_stats: LookupStats | None = None) -> None:
        """directory_stats: the runtime's directory backend counters (shown when in use)."""
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        if directory_stats is not None:
            self.registry.register(DirectoryCollector(daemon, directory_stats))
        self.decisions = Counter(
            "traqmilter_decisions",
            "Recipient decisions, by local domain and deciding rule.",
            ["daemon", "domain", "rule"],
            registry=self.registry,
        )
        self.blocks = Counter(
            "traqmilter_blocks", "Dictionary-attack blocks started.", registry=self.registry
        )
        self.dsn = Counter(
            "traqmilter_dsn",
            "Bounce DSNs handed to the MTA (sent) or not made (suppressed).",
            ["result"],
            registry=self.registry,
        )
        self.mailboxes_created = Counter(
            "traqmilter_mailboxes_created",
            "Mailboxes made by the create action.",
            registry=self.registry,
        )
        self.errors = Counter(
            "traqmilter_errors",
            "Requests or callbacks that failed and were tempfailed.",
            ["daemon"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "traqmilter_decision_seconds",
            "Time to answer one request (policyd) or RCPT callback (milter).",
            ["daemon"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.state_backend_up = Gauge(
            "traqmilter_state_backend_up",
            "1 while the state backend (label backend: sqlite or redis) answered the last "
            "sync; 0 while the daemon decides with its own table alone.",
            ["backend"],
            registry=self.registry,
        )
        self.state_last_sync = Gauge(
            "traqmilter_state_last_sync_timestamp_seconds",
            "When the last sync with the state backend that worked started (Unix time): "
            "blocks and counts other processes and hosts made before it are in this daemon.",
            ["backend"],
            registry=self.registry,
        )
        # Children made once: labels() takes a lock and a dict lookup per call.
        self.errors_here = self.errors.labels(daemon)
        self.latency_here = self.decision_seconds.labels(daemon)
        for result in ("sent", "suppressed"):
            self.dsn.labels(result)  # shown as 0 before the first one
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def follow_state(self, store: StateHealth) -> None:
        """Report `store`'s health (read at each scrape)."""
        self.state_backend_up.labels(store.backend).set_function(lambda: float(store.up))
        self.state_last_sync.labels(store.backend).set_function(lambda: store.last_sync)

    def decision(self, decision: RcptDecision) -> None:
        """Count one recipient decision."""
        domain = NO_DOMAIN
        if decision.policy is not None and decision.recipient is not None:
            domain = decision.recipient.domain or NO_DOMAIN
        self.decisions.labels(self.daemon, domain, decision.rule).inc()
        if decision.new_block is not None:
            self.blocks.inc()

    def actions(self, *, created: int, dsn_sent: bool, dsn_suppressed: bool) -> None:
        """Count the effects of one message's plan (the milter, at end of message)."""
        if created:
            self.mailboxes_created.inc(created)
        if dsn_sent:
            self.dsn.labels("sent").inc()
        elif dsn_suppressed:
            self.dsn.labels("suppressed").inc()

    def serve(self, listen: str) -> None:
        """Serve /metrics on `listen` (inet:LOOPBACK:PORT, checked by the config) in a
        daemon thread of prometheus_client's."""
        address = parse_listen(listen)
        self._server, self._thread = start_http_server(
            address.port, address.host, registry=self.registry
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
