"""`incrementer wal inspect`: what the WAL of a data dir holds, and with a database URL, how much
of it the database has applied (the ledger's applied seq for the data dir's node) and how much is
pending. Read-only: nothing is created, locked or migrated, so it runs beside the live service.

Without the ledger the figures say what is on disk, not what is pending: a segment stays until
every frame in it is applied, so most frames on disk are usually applied already.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from incrementer.ingest.wal_reader import WalSummary, summarize
from incrementer.node.datadir import DataDirError, peek_node_id
from incrementer.store import open_store


@dataclasses.dataclass(frozen=True, slots=True)
class WalReport:
    wal_path: Path
    node_id: str | None
    summary: WalSummary
    ledger: str | None
    """Why the applied seq is unknown, when it is: no database URL, or no node id yet."""

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


async def inspect(data_dir: Path, database_url: str | None) -> WalReport:
    """The report for data_dir; database_url (None: not configured) is opened read-only."""
    if not data_dir.is_dir():
        raise DataDirError(f"no data dir at {data_dir}: nothing to inspect (see --data-dir)")
    wal_path = data_dir / "wal"
    if not wal_path.is_dir():
        raise DataDirError(f"no WAL in {data_dir} (a data dir of --durability memory?)")
    node_id = peek_node_id(data_dir)
    applied: int | None = None
    ledger = None
    if database_url is None:
        ledger = "give --database-url to compare with the database's ledger"
    elif node_id is None:
        ledger = f"{data_dir} has no node id yet, so no ledger entry"
    else:
        store = open_store(database_url, read_only=True)
        await store.open()
        try:
            applied = await store.applied_seq(node_id)
        finally:
            await store.close()
    return WalReport(wal_path, node_id, summarize(wal_path, applied), ledger)
