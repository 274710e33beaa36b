"""Pipelining: requests sent in one write are answered strictly in request order.

Hypothesis draws sequences of valid, refused, asynchronous (GET /counters/..) and fatal requests,
sends each sequence in one write on a fresh connection, and parses what comes back with h11 as
the client: one answer per request, each the right one, up to and including the first request
that ends the connection, then the close. It runs in a worker thread with blocking sockets while
the service runs on this test's event loop (as tests/test_fuzz.py does).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from h11_client import Answer, parse_answers
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support import ErrorLog, host_port, run_service, settings_for, unique

MAX_BODY = 1024
MAX_HEADER = 2048
PIPELINED = settings(
    deadline=None,
    derandomize=True,
    max_examples=500,
    phases=[phase for phase in Phase if phase is not Phase.explain],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Step:
    """One request of a pipelined sequence and the answer it must get."""

    kind: str
    value: int = 0

    @property
    def method(self) -> str:
        """What h11 needs to know to read the answer (a HEAD answer has no body)."""
        return "HEAD" if self.kind in ("head_read", "head_healthz") else "GET"

    @property
    def ends_connection(self) -> bool:
        return self.kind in TERMINAL


def _request(method: bytes, target: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method, target, headers, body)


def _post(body: bytes, headers: bytes = b"") -> bytes:
    return _request(
        b"POST",
        b"/increment",
        b"Host: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
        % (len(body), headers),
        body,
    )


def render(step: Step, key: str) -> bytes:
    """The bytes of one request of the sequence; `key` is the counter this sequence uses."""
    increment = b'{"key":"%s","value":%d}' % (key.encode(), step.value)
    read = b"/counters/" + key.encode()
    host = b"Host: t\r\n"
    kind = step.kind
    if kind == "increment":  # the fast path
        return _post(increment)
    if kind == "increment_form":
        body = b"key=%s&value=%d" % (key.encode(), step.value)
        return _request(
            b"POST",
            b"/increment",
            host + b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n" % len(body),
            body,
        )
    if kind == "increment_chunked":
        half = len(increment) // 2
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            increment[:half],
            len(increment) - half,
            increment[half:],
        )
        return _request(
            b"POST",
            b"/increment",
            host + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            chunks,
        )
    if kind == "increment_expect":
        return _post(increment, b"Expect: 100-continue\r\n")
    if kind == "read":
        return _request(b"GET", read, host)
    if kind == "head_read":
        return _request(b"HEAD", read, host)
    if kind == "healthz":
        return _request(b"GET", b"/healthz", host)
    if kind == "head_healthz":
        return _request(b"HEAD", b"/healthz", host)
    if kind == "not_found":
        return _request(b"GET", b"/nope", host)
    if kind == "bad_json":
        return _post(b'{"key":')
    if kind == "close":
        return _request(b"GET", b"/healthz", host + b"Connection: close\r\n")
    if kind == "malformed":
        return b"B@D / HTTP/1.1\r\n\r\n"  # not a method token: 400 (an unknown token is 501)
    if kind == "uri_too_long":
        return _request(b"GET", b"/" + b"a" * (MAX_HEADER + 100), host)
    if kind == "headers_too_large":
        return _request(b"GET", b"/healthz", host + b"X-Big: %s\r\n" % (b"a" * MAX_HEADER))
    if kind == "body_declared_too_large":
        return _request(
            b"POST",
            b"/increment",
            host + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (MAX_BODY + 1),
        )
    if kind == "body_chunked_too_large":
        chunk = b"x" * (MAX_BODY + 1)
        return _request(
            b"POST",
            b"/increment",
            host + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk),
        )
    if kind == "expectation_failed":
        return _request(b"GET", b"/healthz", host + b"Expect: the-unexpected\r\n")
    if kind == "missing_host":
        return _request(b"GET", b"/healthz")
    if kind == "duplicate_host":
        return _request(b"GET", b"/healthz", host + b"host: t\r\n")
    raise AssertionError(kind)


INCREMENTS = ("increment", "increment_form", "increment_chunked", "increment_expect")
ANSWERED = (*INCREMENTS, "read", "head_read", "healthz", "head_healthz", "not_found", "bad_json")
# The request that ends the connection, and the error code of its answer ("" for a success).
TERMINAL = {
    "close": "",
    "malformed": "malformed_http",
    "uri_too_long": "uri_too_long",
    "headers_too_large": "headers_too_large",
    "body_declared_too_large": "body_too_large",
    "body_chunked_too_large": "body_too_large",
    "expectation_failed": "expectation_failed",
    "missing_host": "missing_host",
    "duplicate_host": "duplicate_host",
}
STATUS = {
    "malformed_http": 400,
    "missing_host": 400,
    "duplicate_host": 400,
    "uri_too_long": 414,
    "headers_too_large": 431,
    "body_too_large": 413,
    "expectation_failed": 417,
}

answered = st.builds(Step, st.sampled_from(ANSWERED), st.integers(1, 9))
terminal = st.builds(Step, st.sampled_from(sorted(TERMINAL)))
sequences = st.tuples(
    st.lists(answered, max_size=10), terminal, st.lists(answered | terminal, max_size=3)
).map(lambda parts: [*parts[0], parts[1], *parts[2]])


def read_until_closed(url: str, data: bytes, timeout: float = 15) -> bytes:
    """Send `data` in one write and read until the server closes the connection."""
    host, port = host_port(url)
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"no close within {timeout} s; read {bytes(received)!r}"
                ) from None
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def check(steps: list[Step], key: str, answers: list[Answer], leftover: bytes) -> int:
    """Every request up to the first terminal one has its own answer, in order; nothing after.
    Returns the total of the increments answered 202."""
    last = next(i for i, step in enumerate(steps) if step.ends_connection)
    expected = steps[: last + 1]
    assert len(answers) == len(expected), (len(answers), len(expected))
    assert leftover == b"", leftover
    total = 0
    for step, answer in zip(expected, answers, strict=True):
        what = (step, answer)
        if TERMINAL.get(step.kind):
            code = TERMINAL[step.kind]
            assert answer.status == STATUS[code], what
            assert json.loads(answer.body)["error"] == code, what
        elif step.kind in INCREMENTS:
            assert answer.status == 202, what
            total += step.value
        elif step.kind == "read":
            if total:
                assert answer.status == 200, what
                assert json.loads(answer.body) == {"key": key, "value": total}, what
            else:
                assert answer.status == 404, what
        elif step.kind == "head_read":
            assert (answer.status, answer.body) == (200 if total else 404, b""), what
        elif step.kind in ("healthz", "close"):
            assert (answer.status, answer.body) == (200, b'{"status":"ok"}'), what
        elif step.kind == "head_healthz":
            assert (answer.status, answer.body) == (200, b""), what
        elif step.kind == "not_found":
            assert answer.status == 404, what
        elif step.kind == "bad_json":
            assert answer.status == 400, what
            assert json.loads(answer.body)["error"] != "malformed_http", what
        else:
            raise AssertionError(step)
        # 100 Continue only for the request being served, and only one that asked for it.
        assert answer.interim in ([], [100]), what
        if answer.interim:
            assert step.kind == "increment_expect", what
    return total


def check_sequence(url: str, steps: list[Step]) -> None:
    """Send `steps` in one write on a fresh connection and check every answer, then the total."""
    key = unique("pl-")
    data = b"".join(render(step, key) for step in steps)
    received = read_until_closed(url, data)
    total = check(steps, key, *parse_answers([step.method for step in steps], received))
    # Exactly the increments answered 202 were applied: none after the end, none twice.
    read = b"GET /counters/%s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % key.encode()
    [answer], _ = parse_answers(["GET"], read_until_closed(url, read))
    if total:
        assert json.loads(answer.body)["value"] == total, (steps, answer)
    else:
        assert answer.status == 404, (steps, answer)


async def test_pipelined_requests_are_answered_in_order(
    tmp_path: Path, sqlite_url: str, error_log: ErrorLog
) -> None:
    """Random pipelined sequences get one answer per request in request order, the right one,
    up to and including the first that ends the connection (a fatal error answered only after
    every earlier answer), and 100 Continue only for the request being served."""
    settings_ = settings_for(
        tmp_path, sqlite_url, max_body_bytes=MAX_BODY, max_header_bytes=MAX_HEADER
    )
    async with run_service(settings_) as svc:

        @PIPELINED
        @given(sequences)
        @example([Step("read"), Step("malformed")])
        @example([Step("read"), Step("increment_expect", 1), Step("close")])
        @example([Step("increment", 2), Step("read"), Step("body_declared_too_large")])
        def sequences_are_answered_in_order(steps: list[Step]) -> None:
            mark = len(error_log.records)
            check_sequence(svc.url, steps)
            assert error_log.since(mark) == [], steps

        await asyncio.to_thread(sequences_are_answered_in_order)
