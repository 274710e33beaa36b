"""Retention: buckets older than --bucket-retention are swept in the background.

Every instance sweeps (a row deleted twice is simply gone), every SWEEP_EVERY seconds, each
granularity in turn, in deletes of at most SWEEP_ROWS rows, each its own short transaction, with
a pause between them. The flush never waits for more than one such delete: on PostgreSQL the
sweep holds only the expired rows it deletes, which a flush writes only when it replays
increments older than the retention; on SQLite a delete takes the one write lock for the few
milliseconds SWEEP_ROWS rows take, and the flush of the same process queues behind it on the
writer thread at most that long. Inline buckets (store/buckets.py) are not swept: reads show
what lies before the horizon as 0, and the key's next increment moves an expired inline bucket
to counter_buckets, where the next sweep finds it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from incrementer import periods
from incrementer.metrics import Metrics
from incrementer.store.base import BackendError, Store

log = logging.getLogger("incrementer.retention")

SWEEP_EVERY = 60.0
SWEEP_ROWS = 1000
SWEEP_PAUSE = 0.05
"""Seconds between two deletes of one sweep: the database serves others in between."""
SWEEP_LIMIT = 200
"""Deletes per granularity and sweep at most (200,000 rows); the rest waits for the next."""


class BucketSweeper:
    def __init__(self, store: Store, retention: dict[int, int | None], metrics: Metrics) -> None:
        self.store = store
        self.retention = {length: kept for length, kept in retention.items() if kept}
        self.metrics = metrics
        self._failing = False

    async def run(self) -> None:
        while self.retention:
            await asyncio.sleep(SWEEP_EVERY)
            await self.sweep(time.time())

    async def sweep(self, now: float) -> int:
        """One sweep of every granularity; how many rows went."""
        swept = 0
        try:
            for length, kept in self.retention.items():
                before = periods.horizon(length, kept, now)
                for _ in range(SWEEP_LIMIT):
                    gone = await self.store.sweep_buckets(length, before, SWEEP_ROWS)
                    swept += gone
                    self.metrics.bucket_rows_swept += gone
                    if gone < SWEEP_ROWS:
                        break
                    await asyncio.sleep(SWEEP_PAUSE)
        except BackendError as exc:
            if not self._failing:
                log.warning("cannot sweep expired buckets, will retry: %s", exc)
            self._failing = True
            return swept
        self._failing = False
        if swept:
            log.info("swept %d expired bucket rows", swept)
        return swept
