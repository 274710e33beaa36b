"""Retiring a data dir: what a node left in its WAL, flushed exactly once without serving.

A node that stops for good (a worker beyond a smaller --workers, a host taken out of the fleet)
may leave acknowledged increments in its WAL. A drain does what the service does at start, minus
the port: lock the dir, read the node's applied seq, replay the WAL frames after it, and apply
them in batches cut at frame boundaries, each batch carrying the seq of its last frame, exactly
as the flusher's batches do. So the exactly-once ledger needs nothing new: a drain interrupted at
any point (a crash, a database failure) leaves the ledger at the last batch committed, and the next
drain, or the next node to serve from the dir, replays only what is after it. Then the dir is
marked retired (`RETIRED`), which a node serving from it again removes. Frames go through a
coalescing buffer as a start-up replay puts them (ingest/replay.py), so a drain applies what a
flush would: idempotent batches settled by their keys, and, with the time buckets the drain is
given (the settings' --buckets), each increment in the bucket it was counted in.

The lock is what makes a drain safe next to a live node: a process holding the dir refuses it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from incrementer.ingest.buffer import Batch, CoalescingBuffer
from incrementer.ingest.replay import replay_frame
from incrementer.ingest.wal import WriteAheadLog
from incrementer.node.datadir import RETIRED, DataDir, claim_database, write_private
from incrementer.store.base import Store
from incrementer.store.buckets import Buckets

BATCH_KEYS = 20_000
"""Distinct keys per applied batch (the default --flush-max-keys): one transaction stays small."""

WORKER_DIR = re.compile(r"worker-(\d+)")


def worker_dir(data_dir: Path, index: int) -> Path:
    """Where worker `index` of a `--workers` group keeps its WAL, node id and lock."""
    return data_dir / f"worker-{index}"


def worker_dirs(data_dir: Path) -> list[tuple[int, Path]]:
    """(index, path) of every worker dir under data_dir, by index."""
    try:
        entries = list(data_dir.iterdir())
    except FileNotFoundError:
        return []
    found = [
        (int(match.group(1)), entry)
        for entry in entries
        if (match := WORKER_DIR.fullmatch(entry.name)) and entry.is_dir()
    ]
    return sorted(found)


@dataclass(frozen=True)
class Drained:
    """What one drain found and applied."""

    path: Path
    node_id: str  # "" when no node ever served from the dir
    applied_before: int  # the node's applied seq in the database when the drain began
    applied_seq: int  # and when it ended
    frames: int  # WAL frames after applied_before, replayed
    increments: int
    keys: int  # key rows written (summed over the batches)
    overflowed: int  # keys whose total would have left 64 bits: kept in counter_overflows
    was_retired: bool

    def describe(self) -> str:
        if not self.node_id:
            return f"{self.path}: no node ever served from it, nothing to apply"
        head = f"{self.path} (node {self.node_id})"
        if not self.frames:
            again = "already retired, " if self.was_retired else ""
            return f"{head}: {again}nothing after seq {self.applied_before}, nothing to apply"
        text = (
            f"{head}: applied {self.increments} increments to {self.keys} keys from "
            f"{self.frames} WAL frames, seq {self.applied_before + 1}..{self.applied_seq}"
        )
        if self.overflowed:
            text += f"; {self.overflowed} keys would overflow 64 bits (see counter_overflows)"
        return text


async def drain_node(
    data_dir: DataDir,
    store: Store,
    batch_keys: int = BATCH_KEYS,
    database: str = "",
    granularities: tuple[int, ...] = (),
) -> Drained:
    """Apply what data_dir's WAL holds beyond the node's applied seq, then mark it retired.
    The caller holds data_dir's lock and an open store on the node's database, whose identity
    (urls.database_identity) `database` is: a WAL written for another database is refused."""
    path = data_dir.path
    node_id = data_dir.existing_node_id()
    was_retired = (path / RETIRED).exists()
    if not node_id:
        return Drained(path, "", 0, 0, 0, 0, 0, 0, was_retired)
    before = await store.applied_seq(node_id)
    if database:
        await asyncio.to_thread(claim_database, data_dir, database, before)
    applied, frames, increments, keys, overflowed = before, 0, 0, 0, 0
    if data_dir.wal_path.is_dir():
        wal = await asyncio.to_thread(WriteAheadLog.open, data_dir.wal_path)
        finest = granularities[0] if granularities else 0
        try:
            buffer = CoalescingBuffer()
            last = before
            for frame in wal.replay_frames(before):
                frames += 1
                increments += len(frame.entries)
                replay_frame(buffer, frame, finest)
                last = frame.seq
                if len(buffer) >= batch_keys:
                    batch = buffer.swap(last)
                    overflowed += await _apply(store, node_id, batch, granularities)
                    keys += len(batch.deltas)
                    applied = last
            if len(buffer) or buffer.keyed:
                batch = buffer.swap(last)
                overflowed += await _apply(store, node_id, batch, granularities)
                keys += len(batch.deltas)
                applied = last
            wal.recycle(applied)
        finally:
            await asyncio.to_thread(wal.close)
    if not was_retired:
        _mark_retired(path, node_id, applied)
    return Drained(
        path, node_id, before, applied, frames, increments, keys, overflowed, was_retired
    )


async def _apply(store: Store, node_id: str, batch: Batch, granularities: tuple[int, ...]) -> int:
    buckets = Buckets(granularities, batch.buckets) if batch.buckets else None
    result = await store.apply_batch(node_id, batch.seq, batch.deltas, batch.keyed, buckets)
    return len(result.overflowed)


def _mark_retired(path: Path, node_id: str, applied_seq: int) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = path / (RETIRED + ".tmp")
    write_private(tmp, f"node {node_id} drained through seq {applied_seq} at {when}\n", sync=True)
    os.replace(tmp, path / RETIRED)


async def retire(
    data_dir: DataDir,
    store: Store,
    keep_workers: int,
    include_top: bool = True,
    database: str = "",
    granularities: tuple[int, ...] = (),
) -> list[Drained]:
    """Drain the nodes under data_dir that will not serve: its own (include_top, when a
    supervisor takes over a dir a single process served from) and every worker dir from index
    keep_workers on. data_dir is locked by the caller; each worker dir is locked here, and one
    that a live process holds stops the whole retire with DataDirError, before or after others
    were drained (each drain stands on its own)."""
    done = []
    if include_top:
        done.append(
            await drain_node(data_dir, store, database=database, granularities=granularities)
        )
    for index, path in worker_dirs(data_dir.path):
        if index < keep_workers:
            continue
        node = DataDir(path)
        node.lock()
        try:
            done.append(
                await drain_node(node, store, database=database, granularities=granularities)
            )
        finally:
            node.close()
    return done


async def drain_data_dir(
    path: Path, database_url: str, granularities: tuple[int, ...] = ()
) -> list[Drained]:
    """`incrementer wal drain`: every node under path (its own, its workers'), on the database
    at database_url (migrated first, as `serve` would), with the time buckets given."""
    from incrementer.store import open_store
    from incrementer.store.migrate import migrate
    from incrementer.urls import database_identity

    top = DataDir(path)
    top.lock()
    try:
        await asyncio.to_thread(migrate, database_url)
        store = open_store(database_url)
        await store.open()
        try:
            return await retire(
                top,
                store,
                keep_workers=0,
                database=database_identity(database_url),
                granularities=granularities,
            )
        finally:
            await store.close()
    finally:
        top.close()
