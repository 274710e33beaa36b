"""`incrementer wal inspect` and `wal drain`. Inspect: what the WAL of a data dir holds (and
each worker-N's in it, for a `--workers` group's dir), and with a database URL, how much of it
the database has applied (the ledger's applied seq for each node) and how much is pending.
Read-only: nothing is created, locked or migrated, so it runs beside the live service.

Without the ledger the figures say what is on disk, not what is pending: a segment stays until
every frame in it is applied, so most frames on disk are usually applied already.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import click

from incrementer.cli.errors import RUNTIME_ERRORS
from incrementer.cli.options import CONFIGURED, settings_options
from incrementer.config import Settings
from incrementer.ingest.wal_reader import WalSummary, summarize
from incrementer.node.datadir import DataDirError, check_is_directory, peek_node_id
from incrementer.node.retire import worker_dirs
from incrementer.store import open_store


@dataclasses.dataclass(frozen=True, slots=True)
class WalReport:
    wal_path: Path
    node_id: str | None
    summary: WalSummary
    ledger: str | None
    """Why the applied seq is unknown, when it is: no database URL, or no node id yet."""

    @classmethod
    def empty(cls, data_dir: Path) -> WalReport:
        """What a data dir without a WAL of its own holds: nothing."""
        summary = WalSummary([], 0, 0, 0, 0, 0, None, [])
        return cls(data_dir / "wal", peek_node_id(data_dir), summary, None)

    def as_json(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self.summary)
        payload["segments"] = [seg._asdict() for seg in self.summary.segments]
        payload["node_id"] = self.node_id
        return payload

    def lines(self) -> list[str]:
        s = self.summary
        lines = [
            f"WAL in {self.wal_path}: {len(s.segments)} segments, {s.frames} frames, "
            f"{s.records} increments, {s.bytes} bytes, seq {s.first_seq}..{s.last_seq}"
        ]
        if s.applied_seq is None:
            # Not "pending": a segment stays until all of it is applied, so most frames on disk
            # usually are; only the ledger can tell.
            lines.append(f"how much of it the database has applied is unknown: {self.ledger}")
        else:
            lines.append(
                f"applied up to seq {s.applied_seq} (node {self.node_id}): "
                f"{s.pending_frames} frames with {s.pending_records} increments pending, "
                f"{s.frames - (s.pending_frames or 0)} frames applied and kept until their "
                "segment is recycled"
            )
        for seg in s.segments:
            pending = "" if seg.pending_frames is None else f", {seg.pending_frames} pending"
            lines.append(
                f"  {seg.name}: {seg.bytes} bytes, seq {seg.first_seq}..{seg.last_seq}, "
                f"{seg.frames} frames{pending}, {seg.records} increments"
            )
        if s.torn_tail:
            lines.append(f"torn tail (dropped at next start): {s.torn_tail}")
        lines.extend(f"PROBLEM: {problem}" for problem in s.problems)
        return lines


async def inspect(data_dir: Path, database_url: str | None) -> list[WalReport]:
    """A report for each WAL in data_dir: its own, then each worker-N's (a `--workers` group
    keeps one per worker); database_url (None: not configured) is opened read-only, once."""
    check_is_directory(data_dir)
    if not data_dir.is_dir():
        raise DataDirError(f"no data dir at {data_dir}: nothing to inspect (see --data-dir)")
    node_dirs = [data_dir, *(path for _, path in worker_dirs(data_dir))]
    with_wal = [path for path in node_dirs if (path / "wal").is_dir()]
    if not with_wal:
        raise DataDirError(f"no WAL in {data_dir} (a data dir of --durability memory?)")
    node_ids = {path: peek_node_id(path) for path in with_wal}
    applied: dict[str, int] = {}
    if database_url is not None and any(node_ids.values()):
        store = open_store(database_url, read_only=True)
        await store.open()
        try:
            for known in filter(None, node_ids.values()):
                applied[known] = await store.applied_seq(known)
        finally:
            await store.close()
    reports = []
    for path, node_id in node_ids.items():
        ledger = None
        if database_url is None:
            ledger = "give --database-url to compare with the database's ledger"
        elif node_id is None:
            ledger = f"{path} has no node id yet, so no ledger entry"
        seq = applied.get(node_id) if node_id else None
        reports.append(WalReport(path / "wal", node_id, summarize(path / "wal", seq), ledger))
    return reports


def json_payload(data_dir: Path, reports: list[WalReport]) -> dict[str, Any]:
    """The data dir's own WAL at the top level (empty figures when it has none: a `--workers`
    group's dir), each worker's under `workers`."""
    own = [r for r in reports if r.wal_path.parent == data_dir]
    payload = own[0].as_json() if own else WalReport.empty(data_dir).as_json()
    payload["workers"] = [
        {**r.as_json(), "path": str(r.wal_path.parent)}
        for r in reports
        if r.wal_path.parent != data_dir
    ]
    return payload


@click.group()
def wal() -> None:
    """Inspect or drain the write-ahead log."""


@wal.command("inspect")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options("data_dir", "database_url")
def wal_inspect(settings: Settings, as_json: bool) -> None:
    """Segments, frames, increments and seq range of the WAL in --data-dir, and of each
    worker-N's in it (a --workers group's data dir); with a database URL (flag, environment or
    file), how many of them the database has applied and how many are pending. Reads only:
    creates, locks and migrates nothing."""
    configured = click.get_current_context().meta[CONFIGURED]
    database_url = settings.database_url if "database_url" in configured else None
    reports = asyncio.run(inspect(settings.data_dir, database_url))
    if as_json:
        import msgspec

        click.echo(msgspec.json.encode(json_payload(settings.data_dir, reports)).decode())
        return
    if reports[0].wal_path.parent != settings.data_dir:
        click.echo(f"{settings.data_dir}: a --workers group's data dir; each worker's WAL:")
    for number, report in enumerate(reports):
        if number:
            click.echo("")
        for line in report.lines():
            click.echo(line)


@wal.command("drain")
@settings_options("data_dir", "database_url", "buckets")
def wal_drain(settings: Settings) -> None:
    """Apply what a stopped instance's WAL in --data-dir holds (its own and its worker-N dirs'),
    exactly once, and mark it retired. Refused while a live process holds the data dir or one of
    its worker dirs; safe to run twice: the second run finds nothing after the applied seq.
    Give the instance's --buckets, so its increments count in their time buckets too."""
    from incrementer.node import retire as retiring

    check_is_directory(settings.data_dir)
    if not settings.data_dir.is_dir():
        raise click.UsageError(f"no data dir at {settings.data_dir}")
    try:
        drained = asyncio.run(
            retiring.drain_data_dir(
                settings.data_dir, settings.database_url, settings.granularities
            )
        )
    except RUNTIME_ERRORS as exc:
        raise click.ClickException(f"cannot drain {settings.data_dir}: {exc}") from None
    for node in drained:
        click.echo(node.describe())
