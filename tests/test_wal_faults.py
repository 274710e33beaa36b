"""A WAL that cannot be written or synced: nothing unlogged is applied, no 202 lies, the rest of
the service keeps answering, and readiness recovers by itself. Faults are injected through the
log's SegmentIO (ENOSPC, EIO), and once for real: a tiny tmpfs filled up."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support import (
    counter_path,
    db_totals,
    exchange,
    get_request,
    host_port,
    increment_request,
    kill,
    run_service,
    settings_for,
    skip_or_fail,
    spawned,
    unique,
    wait_until,
    writes_blocked,
)

from incrementer.ingest.wal import SegmentIO, WriteAheadLog
from incrementer.service import Service


class DiskFault(SegmentIO):
    """The real system calls, unless told to fail (or, for fdatasync, to wait while `hold` is
    cleared)."""

    def __init__(self) -> None:
        super().__init__()
        self.write_error = 0
        self.sync_errors: list[int] = []
        self.synced_fds: list[int] = []
        self.failed_fds: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def write(self, fd: int, data: memoryview) -> int:
        if self.write_error:
            raise OSError(self.write_error, os.strerror(self.write_error))
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        self.entered.set()
        self.hold.wait(30)
        if self.sync_errors:
            self.failed_fds.append(fd)
            code = self.sync_errors.pop(0)
            raise OSError(code, os.strerror(code))
        self.synced_fds.append(fd)
        super().fdatasync(fd)


def batch_request(items: list[tuple[str, int]], idempotency_key: str = "") -> bytes:
    import msgspec

    body = msgspec.json.encode([{"key": k, "value": v} for k, v in items])
    keyed = b"Idempotency-Key: %s\r\n" % idempotency_key.encode() if idempotency_key else b""
    return (
        b"POST /increments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (len(body), keyed)
    ) + body


def inject(svc: object) -> DiskFault:
    wal = getattr(svc, "wal", None)
    assert isinstance(wal, WriteAheadLog)
    disk = DiskFault()
    wal.io = disk
    return disk


@contextlib.asynccontextmanager
async def held_fsync(
    svc: Service, first: bytes
) -> AsyncIterator[tuple[DiskFault, asyncio.StreamReader, asyncio.StreamWriter]]:
    """One connection whose first request is logged and then held in its fdatasync until the
    test sets disk.hold again (on the way out in any case)."""
    disk = inject(svc)
    disk.hold.clear()
    reader, writer = await asyncio.open_connection(*host_port(svc.url))
    try:
        writer.write(first)
        assert await asyncio.to_thread(disk.entered.wait, 10), "no fdatasync started"
        yield disk, reader, writer
    finally:
        disk.hold.set()
        writer.close()


@pytest.mark.parametrize("durability", ["wal", "wal-fsync"])
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
async def test_an_increment_that_cannot_be_logged_gets_503_and_is_never_applied(
    tmp_path: Path, sqlite_url: str, durability: str, error: int
) -> None:
    """A failed WAL write: its increments get 503 wal_unavailable with Retry-After and are taken
    back; health and reads answer in order; readiness recovers by itself once writes work."""
    key, other = unique("logged-"), unique("never-")
    settings = settings_for(tmp_path, sqlite_url, durability=durability)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        disk = inject(svc)
        assert (await client.post("/increment", json={"key": key, "value": 1})).status_code == 202
        disk.write_error = error
        answers = await exchange(
            svc.url,
            get_request("/healthz")
            + increment_request(key, 10)
            + batch_request([(key, 100), (other, 1)])
            + get_request(counter_path(key)),
            4,
        )
        assert [r.status for r in answers] == [200, 503, 503, 200]
        for refused in answers[1:3]:
            assert refused.headers["retry-after"] == "1"
            assert b'"error":"wal_unavailable"' in refused.body
        assert answers[3].body.endswith(b'"value":1}'), answers[3].body
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert [r["code"] for r in ready.json()["reasons"]] == ["wal_write_failed"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get(counter_path(other))).status_code == 404
        assert svc.metrics.wal_failures["write"] >= 1
        assert svc.metrics.rejected["wal_unavailable"] == 3
        requests = svc.metrics.requests
        assert (requests[("increment", 503)], requests[("increments", 503)]) == (1, 1)
        assert requests.get(("increments", 202), 0) == 0
        assert svc.metrics.accepted_requests == 1  # the 202s that stood

        disk.write_error = 0  # space is back: the probe notices without any increment sent
        await wait_until(lambda: _ready(client), timeout=10)
        assert (
            await client.post("/increment", json={"key": key, "value": 1000})
        ).status_code == 202
        assert svc.metrics.accepted_increments == 2
        assert svc.server is not None
        assert all(c.unreleased == 0 for c in svc.server.connections), "answers still owed"
    assert await db_totals(sqlite_url, [key, other]) == {key: 1001}


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


async def test_wal_fsync_sends_no_202_before_its_fdatasync_returns(
    tmp_path: Path, sqlite_url: str
) -> None:
    """In wal-fsync mode the 202 leaves only after the fdatasync covering it has returned."""
    settings = settings_for(tmp_path, sqlite_url, durability="wal-fsync")
    async with (
        run_service(settings) as svc,
        held_fsync(svc, increment_request(unique("held-"), 1)) as (disk, reader, _),
    ):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # the fsync is still held
        disk.hold.set()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 202 ")


async def test_writes_made_during_an_fsync_share_the_next_one(
    tmp_path: Path, sqlite_url: str
) -> None:
    """wal-fsync groups its fsyncs: three requests written one after another while an fsync is
    held wait for one more fdatasync between them, not one each, and all get their 202."""
    settings = settings_for(tmp_path, sqlite_url, durability="wal-fsync")
    async with (
        run_service(settings) as svc,
        held_fsync(svc, increment_request(unique("held-"), 1)) as (disk, reader, _),
    ):
        wal = svc.wal
        assert wal is not None
        others = [await asyncio.open_connection(*host_port(svc.url)) for _ in range(3)]
        try:
            for _, writer in others:  # each written in a tick of its own
                written = wal.written_bytes
                writer.write(increment_request(unique("during-"), 1))
                await wait_until(lambda: wal.written_bytes > written)  # noqa: B023
            disk.hold.set()
            for other in (reader, *(r for r, _ in others)):
                answer = await asyncio.wait_for(other.readuntil(b"\r\n\r\n"), 10)
                assert answer.startswith(b"HTTP/1.1 202 ")
        finally:
            for _, writer in others:
                writer.close()
        assert len(disk.synced_fds) == 2  # the held one, then one for the three


async def test_a_failed_write_behind_a_held_fsync_is_answered_in_request_order(
    tmp_path: Path, sqlite_url: str
) -> None:
    """wal-fsync, one connection, two pipelined increments: the first logged and its fdatasync
    held, the second's WAL write failing meanwhile. The second's 503 waits behind the first's
    answer, which leaves once the fsync returns: 202, then 503, in the order they were asked."""
    settings = settings_for(tmp_path, sqlite_url, durability="wal-fsync")
    async with (
        run_service(settings) as svc,
        held_fsync(svc, increment_request(unique("first-"), 1)) as held,
    ):
        disk, reader, writer = held
        disk.write_error = errno.EIO
        writer.write(increment_request(unique("second-"), 1))
        await wait_until(lambda: svc.metrics.wal_failures["write"] >= 1, 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # nothing may overtake the first
        disk.hold.set()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert first.startswith(b"HTTP/1.1 202 "), first
        length = int(re.search(rb"content-length: (\d+)", first.lower())[1])  # type: ignore[index]
        await asyncio.wait_for(reader.readexactly(length), 10)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert second.startswith(b"HTTP/1.1 503 "), second


async def test_after_a_failed_fsync_the_segment_is_abandoned_and_the_202_waits_for_the_database(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed fdatasync is never retried on its file: later frames go to a new segment, and
    the requests it covered get their 202 only once the database holds their increments; the
    failure is counted once per failed fsync and kept with its errno for /readyz."""
    key = unique("fsync-")
    settings = settings_for(tmp_path, db_url, durability="wal-fsync")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        disk = inject(svc)
        assert (await client.post("/increment", json={"key": key, "value": 1})).status_code == 202
        disk.sync_errors = [errno.EIO]
        assert (await client.post("/increment", json={"key": key, "value": 2})).status_code == 202
        assert await db_totals(db_url, [key]) == {key: 3}, "answered before it was durable"
        assert svc.gate is not None and svc.gate.failure_detail == (
            "WAL fsync failed: [Errno 5] Input/output error"
        )
        assert svc.gate.failure == "wal_fsync_failed"
        said = [r.getMessage() for r in caplog.records if r.name == "incrementer.durability"]
        assert said[0].startswith("WAL fsync failed: [Errno 5] Input/output error; segment ")
        assert " connections wait for the database commit of seq " in said[0]
        [failed_fd] = disk.failed_fds
        synced_before = len(disk.synced_fds)
        assert (await client.post("/increment", json={"key": key, "value": 4})).status_code == 202
        assert failed_fd not in disk.synced_fds[synced_before:], "synced the failed file again"
        assert svc.metrics.wal_failures["fsync"] == 1
        await wait_until(lambda: _ready(client), timeout=10)
        said = [r.getMessage() for r in caplog.records if r.name == "incrementer.durability"]
        assert said[-1].startswith("WAL healthy again (an fsync succeeded) after "), said
        disk.sync_errors = [errno.EIO]
        assert (await client.post("/increment", json={"key": key, "value": 8})).status_code == 202
        assert svc.metrics.wal_failures["fsync"] == 2
        await wait_until(lambda: _ready(client), timeout=10)
        assert svc.server is not None
        assert [c.unreleased for c in svc.server.connections] == [0], "answers still owed"
    assert await db_totals(db_url, [key]) == {key: 15}


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; return it."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as file:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    file.write(chunk[:size])
    return filler


async def test_a_full_disk_refuses_with_503_then_recovers_and_a_kill_9_keeps_exactly_the_202s(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A real full filesystem under the data dir: 503s while full, 200 on /healthz, /readyz 503
    then 200 once space is freed; after kill -9 and restart the database holds exactly the
    increments that got 202."""
    key = unique("disk-")
    data = tiny_tmpfs(tmp_path / "small", "1m")
    args = ["--database-url", sqlite_url, "--flush-interval", "5"]
    with data as mount:
        args += ["--data-dir", str(mount / "data")]
        acked = 0
        with spawned(args) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

                async def send(n: int) -> dict[int, int]:
                    nonlocal acked
                    seen: dict[int, int] = {}
                    for _ in range(n):
                        resp = await client.post("/increment", json={"key": key, "value": 1})
                        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                        acked += resp.status_code == 202
                    return seen

                assert await send(100) == {202: 100}
                filler = fill(mount)
                seen = await send(400)  # the last page of the segment may still take a few
                assert seen.get(503, 0) > 300, seen
                assert (await client.get("/healthz")).status_code == 200
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["reasons"][0]["code"] == "wal_write_failed"
                filler.unlink()
                await wait_until(lambda: _ready(client), timeout=10)
                assert await send(100) == {202: 100}
            kill(server.proc)
        with spawned(args) as server:
            server.stop_cleanly()
    assert await db_totals(sqlite_url, [key]) == {key: acked}


async def test_answers_held_across_a_failed_fsync_leave_in_order_once_committed(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Two requests on one connection, one in the fsync that fails and one written while it
    ran: both wait for the database, then leave in order, and the connection owes nothing."""
    key = unique("order-")
    settings = settings_for(tmp_path, sqlite_url, durability="wal-fsync")
    async with run_service(settings) as svc:
        async with held_fsync(svc, increment_request(key, 1)) as (disk, reader, writer):
            disk.sync_errors = [errno.EIO]  # the held fdatasync fails once let go
            writer.write(increment_request(key, 2) + get_request(counter_path(key)))
            await asyncio.sleep(0.2)  # the second tick is written behind the held fsync
            disk.hold.set()
            answers = [await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) for _ in "ab"]
            assert all(a.startswith(b"HTTP/1.1 202 ") for a in answers), answers
            assert await db_totals(sqlite_url, [key]) == {key: 3}, "answered before durable"
            read = await asyncio.wait_for(reader.readuntil(b'"value":3}'), 10)
            assert b"200 OK" in read
        assert svc.server is not None
        await wait_until(lambda: all(c.unreleased == 0 for c in svc.server.connections))


async def test_an_answer_synced_behind_a_failed_fsync_waits_for_the_earlier_one(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A request whose fsync fails waits for the database; the next request on that connection,
    whose own fsync succeeds, is not answered before it (HTTP answers leave in request order):
    nothing leaves while the database holds its write lock, then both 202s in a row."""
    key = unique("behind-")
    settings = settings_for(tmp_path, sqlite_url, durability="wal-fsync")
    async with run_service(settings) as svc:
        with contextlib.ExitStack() as blocked:
            blocked.enter_context(writes_blocked(sqlite_url))  # before anything can be flushed
            async with held_fsync(svc, increment_request(key, 1)) as (disk, reader, writer):
                disk.sync_errors = [errno.EIO]
                disk.hold.set()
                await wait_until(lambda: svc.metrics.wal_failures["fsync"] == 1)
                synced = sum(svc.metrics.fsync_seconds.counts)
                writer.write(increment_request(key, 2))
                await wait_until(lambda: sum(svc.metrics.fsync_seconds.counts) > synced)
                with pytest.raises(TimeoutError):  # answered out of order, or lost
                    await asyncio.wait_for(reader.read(1), 0.5)
                blocked.close()  # the database takes the flush
                answers = [await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) for _ in "ab"]
                assert all(a.startswith(b"HTTP/1.1 202 ") for a in answers), answers
    assert await db_totals(sqlite_url, [key]) == {key: 3}


async def test_a_failed_write_takes_increments_back_out_of_their_buckets(
    tmp_path: Path, db_url: str
) -> None:
    """With time buckets on, the increments of a failed WAL write (their own "at" or their
    arrival) are taken back out of their buckets too: the series holds only what was logged."""
    import time

    key = unique("timed-")
    at = int(time.time()) - 600
    settings = settings_for(tmp_path, db_url, buckets="minute,hour,day", flush_interval=2.0)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        disk = inject(svc)
        logged = {"key": key, "value": 1, "at": at}
        assert (await client.post("/increment", json=logged)).status_code == 202
        disk.write_error = errno.EIO
        for body in ({"key": key, "value": 10}, {"key": key, "value": 100, "at": at}):
            assert (await client.post("/increment", json=body)).status_code == 503
        refused = [{"key": key, "value": 1000, "at": at - 60}, {"key": key, "value": 5}]
        assert (await client.post("/increments", json=refused)).status_code == 503
        disk.write_error = 0
        params = {"granularity": "minute", "from": str(at - 120)}
        for _ in range(2):  # unflushed, then flushed
            series = (await client.get(counter_path(key) + "/series", params=params)).json()
            assert series["sum"] == 1
            assert [p for p in series["points"] if p[1]] == [[at - at % 60, 1]]
            await wait_until(lambda: db_totals(db_url, [key]))


@pytest.mark.parametrize(
    ("connection", "answered"),
    [
        (b"", None),
        (b"Connection: close\r\n", "close"),
        (b"Connection: keep-alive\r\n", "keep-alive"),
    ],
    ids=["keep-alive-1.1", "close", "keep-alive-1.0"],
)
async def test_a_refused_increment_keeps_the_connection_header_its_202_had(
    tmp_path: Path, sqlite_url: str, connection: bytes, answered: str | None
) -> None:
    """The 503 that replaces the 202 of an increment whose WAL write failed says in full that
    nothing was recorded, and carries the Connection header the 202 would have: none on HTTP/1.1
    keep-alive, close when the client asked, keep-alive for an HTTP/1.0 keep-alive client."""
    version = b"1.0" if connection == b"Connection: keep-alive\r\n" else b"1.1"
    body = b'{"key":"%s","value":1}' % unique("refused-").encode()
    request = (
        b"POST /increment HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (version, len(body), connection)
    ) + body
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        inject(svc).write_error = errno.EIO
        [answer] = await exchange(svc.url, request, 1)
    assert answer.status == 503
    assert answer.headers.get("connection") == answered
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/json"
    assert answer.body == (
        b'{"error":"wal_unavailable","detail":"The write-ahead log could not be written, so '
        b'nothing was recorded; retry shortly."}'
    )


async def test_the_first_requests_of_a_service_refused_by_the_wal_are_counted_as_refused(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A WAL write that fails before anything was ever written: the single increment and the
    batch it held count as 503s, nothing as accepted."""
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        inject(svc).write_error = errno.EIO
        single = increment_request(unique("first-"), 1)
        answers = await exchange(svc.url, single + batch_request([(unique("b-"), 1)]), 2)
        assert [a.status for a in answers] == [503, 503]
        requests = svc.metrics.requests
        assert svc.metrics.accepted_requests == 0
        assert requests.get(("increments", 202), 0) == 0
        assert (requests[("increment", 503)], requests[("increments", 503)]) == (1, 1)


async def test_a_wal_outage_is_logged_once_with_its_cost_and_once_at_recovery(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One failed WAL write refusing two pipelined increments: one error line saying what failed
    and how many requests were refused, one failure counted, the detail kept for /readyz; a
    probe write a second later succeeds and one line says so, with how long the outage lasted,
    its code and the requests refused meanwhile. A second outage counts its own, an idempotent
    batch (written after its database lookup) among them."""
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        disk, gate = inject(svc), svc.gate
        assert gate is not None
        [accepted] = await exchange(svc.url, batch_request([(unique("ok-"), 1)]), 1)
        assert accepted.status == 202
        disk.write_error = errno.EIO
        with caplog.at_level("WARNING"):
            answers = await exchange(
                svc.url, increment_request(unique("a-"), 1) + increment_request(unique("b-"), 1), 2
            )
            assert gate.failure_detail == "WAL write failed: [Errno 5] Input/output error"
            assert svc.metrics.requests[("increments", 202)] == 1  # the batch before still stands
            await asyncio.sleep(1.5)  # the first probe fails too: the next one is scheduled
            disk.write_error = 0
            await wait_until(lambda: not gate.failure, timeout=10)
            assert gate.failure_detail == ""
            disk.write_error = errno.EIO  # a second outage counts from zero, every refusal
            [again] = await exchange(svc.url, increment_request(unique("c-"), 1), 1)
            [more] = await exchange(svc.url, increment_request(unique("d-"), 1), 1)
            keyed = batch_request([(unique("e-"), 1)], idempotency_key=unique("k-"))
            [late] = await exchange(svc.url, keyed, 1)
            disk.write_error = 0
            await wait_until(lambda: not gate.failure, timeout=10)
        assert [a.status for a in answers] == [503, 503]
        assert again.status == more.status == late.status == 503
        assert svc.metrics.wal_failures["write"] == 4
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(lines) == 4, lines  # nothing else, no error from a timer callback either
    assert lines[3][1].endswith(" s of wal_write_failed; 3 requests were refused meanwhile")
    assert lines[0] == (
        "ERROR",
        "WAL write failed: [Errno 5] Input/output error; 2 requests refused with 503; "
        "probing once a second until it succeeds",
    )
    level, recovered = lines[1]
    assert level == "WARNING", lines
    assert recovered.startswith("WAL healthy again (a probe write succeeded) after ")
    assert 1.5 < float(recovered.split(" after ")[1].split(" s ")[0]) < 10
    assert recovered.endswith(" s of wal_write_failed; 2 requests were refused meanwhile")
