"""The traqmilter command with the directory on PostgreSQL (the session's private cluster):
`directory init`, `check` (which connects), `mailbox`, and the per-backend metrics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.support.postgresql import PgDatabase, PostgresCluster, new_database
from traqmilter.cli import main
from traqmilter.core.address import parse_address
from traqmilter.directory.postgresql import SCHEMA_VERSION, PostgresDirectory
from traqmilter.metrics import Metrics


def _config(tmp_path: Path, conninfo: str) -> str:
    path = tmp_path / "traqmilter.yaml"
    path.write_text(
        f"""\
state_dir: {tmp_path}/state
directory: {{postgresql: "{conninfo}", sqlite: {tmp_path}/unused.sqlite}}
queue: {{directory: {tmp_path}/spool}}
postmaster: admin@example.com
domains:
  example.com: {{}}
"""
    )
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_init_check_and_mailboxes_on_a_new_database(
    postgres_cluster: PostgresCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = new_database(postgres_cluster, migrate=False)
    try:
        config = _config(tmp_path, database.conninfo)
        status, _, err = run(capsys, "-c", config, "check")
        assert status == 2 and "run `traqmilter directory init`" in err
        status, out, _ = run(capsys, "-c", config, "directory", "init")
        assert status == 0 and "applied 001-schema.sql" in out
        status, out, _ = run(capsys, "-c", config, "directory", "init")
        assert status == 0 and f"schema version {SCHEMA_VERSION} is current" in out
        # check connects, and refuses a postmaster the shared directory does not have.
        status, _, err = run(capsys, "-c", config, "check")
        assert status == 2 and "postmaster: admin@example.com is not a known mailbox" in err
        assert run(capsys, "-c", config, "mailbox", "add", "admin@example.com")[0] == 0
        status, out, _ = run(capsys, "-c", config, "check")
        assert status == 0
        assert f"directory postgresql://127.0.0.1:{postgres_cluster.port}/{database.name}" in out
        assert "secret" not in out
        status, out, _ = run(capsys, "-c", config, "mailbox", "list")
        assert status == 0 and out.startswith("admin@example.com\texample.com/admin/\tactive")
        assert not (tmp_path / "unused.sqlite").exists()
    finally:
        postgres_cluster.drop_database(database.name)


def test_check_reports_an_unreachable_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"host={tmp_path} port=1 dbname=traqmilter user=nobody")
    status, _, err = run(capsys, "-c", config, "check")
    assert status == 2 and "cannot connect" in err


def _sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{{{wanted}}} in:\n{text}")


def test_metrics_show_lookups_errors_and_latency_of_the_backend(pg_database: PgDatabase) -> None:
    store = PostgresDirectory(pg_database.conninfo)
    try:
        assert store.wait_listening(10)
        store.add_mailbox(parse_address("alice@example.com"))
        metrics = Metrics("policyd", store.stats)
        store.contains("alice@example.com")
        store.contains("nobody@example.com")
        text = generate_latest(metrics.registry).decode()
        common = {"daemon": "policyd", "backend": "postgresql"}
        assert _sample(text, "traqmilter_directory_lookups_total", result="known", **common) >= 1
        assert _sample(text, "traqmilter_directory_lookups_total", result="unknown", **common) >= 1
        assert _sample(text, "traqmilter_directory_lookups_total", result="error", **common) == 0
        count = _sample(text, "traqmilter_directory_lookup_seconds_count", **common)
        inf = _sample(text, "traqmilter_directory_lookup_seconds_bucket", le="+Inf", **common)
        assert count == inf >= 2
        assert _sample(text, "traqmilter_directory_backend_up", **common) == 1
    finally:
        store.close()


def test_metrics_show_no_backend_when_none_is_used() -> None:
    from traqmilter.directory.stats import LookupStats

    text = generate_latest(Metrics("milter", LookupStats()).registry).decode()
    assert "traqmilter_directory_" not in text
