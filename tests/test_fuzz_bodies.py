"""Generated bodies against the live server, judged by the reference in fuzzing/oracle.py: 202
or the documented 4xx error body, never a 5xx, a hang or a crash, and the database ends with
exactly the 202'd increments.

Hypothesis runs in a worker thread with blocking sockets while the service runs on this test's
event loop, so each test ends with the service's own drain and final flush.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from pathlib import Path

from fuzzing.bodies import LOOSE_INTEGERS, Body, posts
from fuzzing.harness import FUZZ, PREFIX, Client
from fuzzing.oracle import FORM, assert_error_body, expected_outcome, form_integer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import ErrorLog, db_totals, run_service, settings_for

# Form bodies whose value Python's int() accepts and the documents refuse: `+5` (a raw `+` is a
# space in a form, so `+5` is " 5"), `%2B5`, `1_000`, `%D9%A5` (Arabic-Indic five).
LOOSE_FORM_BODIES = [
    b"key=loose&value=+5",
    b"key=loose&value=%2B5",
    b"key=loose&value=1_000",
    b"key=loose&value=%D9%A5",
]


def test_the_form_oracle_takes_only_ascii_digits() -> None:
    """The fuzz test's reference refuses what int() would take, and reads plain digits."""
    for body in LOOSE_FORM_BODIES:
        assert expected_outcome(FORM, body) == (400, "", 0), body
    for text in LOOSE_INTEGERS:
        assert form_integer(text) is None, text
    assert form_integer("007") == 7
    assert form_integer("-9223372036854775808") == -(2**63)
    assert form_integer("1" * 21) is None


async def test_form_values_int_would_take_are_refused(tmp_path: Path, sqlite_url: str) -> None:
    """Form values outside `-?[0-9]+` that int() reads as numbers (`+5`, `%2B5`, `1_000`,
    Arabic-Indic digits) get 400 invalid_value and change nothing."""
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        client = Client(svc.url)
        try:
            for body in LOOSE_FORM_BODIES:
                status, _, answer = await asyncio.to_thread(
                    client.send, "POST", "/increment", body, FORM
                )
                assert status == 400, (body, status, answer)
                assert json.loads(answer)["error"] == "invalid_value", (body, answer)
            ok = await asyncio.to_thread(
                client.send, "POST", "/increment", b"key=loose&value=007", FORM
            )
            assert ok[0] == 202
        finally:
            client.close()
    assert await db_totals(sqlite_url, ["loose"]) == {"loose": 7}


async def test_generated_bodies_count_exactly(
    tmp_path: Path, db_url: str, error_log: ErrorLog
) -> None:
    """Thousands of generated bodies each get 202 or a 4xx error body as the document says, and
    the database ends with exactly the 202'd increments."""
    acked: dict[str, int] = {}
    tried: set[str] = set()
    statuses: Counter[int] = Counter()
    fresh_key = (f"{PREFIX}unique-{n}" for n in itertools.count())
    async with run_service(settings_for(tmp_path, db_url)) as svc:
        client = Client(svc.url)

        @settings(FUZZ, max_examples=1000)
        @given(st.lists(posts(), min_size=1, max_size=8))
        @example([(FORM, Body(FORM, data=data)) for data in LOOSE_FORM_BODIES])
        def bodies_are_answered(batch: list[tuple[str | None, Body]]) -> None:
            mark = len(error_log.records)
            sent = []
            for content_type, body in batch:
                data = body.render(fresh_key)
                sent.append((content_type, data))
                status, headers, answer = client.send("POST", "/increment", data, content_type)
                want, key, value = expected_outcome(content_type, data)
                statuses[status] += 1
                assert status == want, (content_type, data, status, answer)
                if status == 202:
                    assert answer == b""
                    acked[key] = acked.get(key, 0) + value
                else:
                    assert_error_body(status, headers, answer)
                tried_key = body.fields.get("key")
                # PostgreSQL text cannot even be queried with a NUL in it.
                if isinstance(tried_key, str) and "\x00" not in tried_key:
                    tried.add(tried_key)
            assert error_log.since(mark) == [], sent

        try:
            await asyncio.to_thread(bodies_are_answered)
        finally:
            client.close()
    # The generator must keep making plenty of each kind.
    assert statuses[202] > 800 and statuses[400] > 800 and statuses[415] > 200, statuses
    assert await db_totals(db_url, tried | acked.keys()) == acked
