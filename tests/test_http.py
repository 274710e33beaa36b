"""HTTP/1.1 correctness of the hand-written protocol: pipelining, chunked, limits, garbage."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
from h11_client import parse_answers, read_until_closed
from support import (
    add_api_key,
    exchange,
    get_request,
    host_port,
    increment_request,
    run_service,
    settings_for,
    skip_or_fail,
)


@pytest.fixture
async def url(tmp_path: Path, sqlite_url: str):  # type: ignore[no-untyped-def]
    settings = settings_for(
        tmp_path,
        sqlite_url,
        max_body_bytes=1024,
        max_header_bytes=2048,
        request_timeout=1.0,
        idle_timeout=2.0,
    )
    async with run_service(settings) as svc:
        yield svc.url


async def test_pipelined_requests_answered_in_order(url: str) -> None:
    """Requests sent in one write, reads between writes, are answered in order."""
    data = (
        increment_request("p", 1)
        + get_request("/counters/p")
        + increment_request("p", 2)
        + get_request("/nope")
        + get_request("/counters/p")
        + get_request("/healthz")
    )
    responses = await exchange(url, data, 6)
    assert [r.status for r in responses] == [202, 200, 202, 404, 200, 200]
    assert json.loads(responses[1].body)["value"] == 1
    assert json.loads(responses[4].body)["value"] == 3


async def test_chunked_body(url: str) -> None:
    """Transfer-Encoding: chunked bodies are reassembled."""
    body = b'{"key":"chunked","value":7}'
    data = (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (5, body[:5])
        + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
        + b"0\r\n\r\n"
        + get_request("/counters/chunked")
    )
    responses = await exchange(url, data, 2)
    assert [r.status for r in responses] == [202, 200]
    assert json.loads(responses[1].body)["value"] == 7


async def test_expect_100_continue(url: str) -> None:
    """A client that sends Expect: 100-continue gets the interim response, then the answer."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    body = b'{"key":"expect","value":1}'
    writer.write(
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 202")
    writer.close()


async def test_oversized_body_and_headers(url: str) -> None:
    """413 for a body over the limit (declared or chunked), 431 for huge headers; then close."""
    declared = (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    [resp] = await exchange(url, declared, 1)
    assert resp.status == 413
    assert resp.headers["connection"] == "close"
    chunk = b"x" * 800
    chunked = (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3
    )
    [resp] = await exchange(url, chunked, 1)
    assert resp.status == 413
    [resp] = await exchange(url, get_request("/healthz", b"X-Big: " + b"a" * 3000 + b"\r\n"), 1)
    assert resp.status == 431
    [resp] = await exchange(url, get_request("/" + "a" * 3000), 1)
    assert resp.status == 414


async def test_garbage_bytes_get_400_and_others_are_served(url: str) -> None:
    """Garbage is answered with 400 and a close; a concurrent normal client is unaffected."""
    for garbage in (
        b"\x00\x01\x02\xff\r\n\r\n",
        b"HELLO WORLD\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /increment HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ):
        responses = await exchange(url, garbage, 1)
        assert [r.status for r in responses] == [400], garbage
    responses = await exchange(
        url, increment_request("after-garbage", 1) + get_request("/healthz"), 2
    )
    assert [r.status for r in responses] == [202, 200]


async def test_unknown_methods_get_501_and_a_close(url: str) -> None:
    """A well-formed request whose method the server does not know (FOO, BREW, alone or
    pipelined after a good request) gets 501 method_not_implemented, then the close (RFC 9110
    15.6.2); a known method on a route that takes another is still 405, garbage still 400."""
    for method in (b"FOO", b"BREW", b"M-FOO"):
        responses = await exchange(url, method + b" /increment HTTP/1.1\r\nHost: t\r\n\r\n", 2)
        assert [r.status for r in responses] == [501], method
        payload = json.loads(responses[0].body)
        assert payload["error"] == "method_not_implemented", payload
        assert method.decode() in payload["detail"]
        assert responses[0].headers.get("connection") == "close"
    pipelined = get_request("/healthz") + b"BREW /coffee HTTP/1.1\r\nHost: t\r\n\r\n"
    assert [r.status for r in await exchange(url, pipelined, 3)] == [200, 501]
    [wrong_route] = await exchange(url, b"PUT /increment HTTP/1.1\r\nHost: t\r\n\r\n", 1)
    assert wrong_route.status == 405
    for garbage in (b"G\x00T / HTTP/1.1\r\n\r\n", b"FOO BAR\r\n\r\n", get_request("/") + b"\x01"):
        statuses = [r.status for r in await exchange(url, garbage, 2)]
        assert statuses[-1] == 400, (garbage, statuses)


async def test_connection_close_and_http10(url: str) -> None:
    """Connection: close and HTTP/1.0 requests get one answer and the server closes."""
    responses = await exchange(
        url, increment_request("c", 1, close=True) + get_request("/healthz"), 2
    )
    assert [r.status for r in responses] == [202]
    assert responses[0].headers["connection"] == "close"
    responses = await exchange(url, b"GET /healthz HTTP/1.0\r\n\r\n" + get_request("/healthz"), 2)
    assert [r.status for r in responses] == [200]


async def test_slow_request_times_out(url: str) -> None:
    """A client that never finishes its request gets 408 and is disconnected (slowloris)."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Le")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_idle_connection_closed(url: str) -> None:
    """A keep-alive connection idle past --idle-timeout is closed by the server."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(get_request("/healthz"))
    assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.read(), 6) == b""
    writer.close()


async def test_connection_limit(tmp_path: Path, sqlite_url: str) -> None:
    """Past --max-connections, with no connection idle or still on its first request, new
    connections get 503 and are closed; existing ones work."""
    settings = settings_for(tmp_path, sqlite_url, max_connections=2, max_connections_per_ip=2)
    async with run_service(settings) as svc:
        host, port = host_port(svc.url)
        held = [await asyncio.open_connection(host, port) for _ in range(2)]
        for reader, writer in held:
            writer.write(get_request("/healthz"))
            assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request begun: not idle
        await asyncio.sleep(0.05)
        [resp] = await exchange(svc.url, get_request("/healthz"), 1)
        assert resp.status == 503
        reader, writer = held[0]
        writer.write(b"Host: t\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200"
        )
        for _, w in held:
            w.close()


async def test_head_absolute_form_and_missing_host(url: str) -> None:
    """HEAD gets GET's headers without a body; absolute-form targets route; HTTP/1.1 without
    Host is refused."""
    data = (
        b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET http://t/healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 15" in head
    get_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert get_head.startswith(b"HTTP/1.1 200")  # the HEAD had no body before this
    assert await asyncio.wait_for(reader.readexactly(15), 5) == b'{"status":"ok"}'
    writer.close()
    [resp] = await exchange(url, b"GET /healthz HTTP/1.1\r\n\r\n", 1)
    assert resp.status == 400
    assert json.loads(resp.body)["error"] == "missing_host"
    [resp] = await exchange(url, b"GET /healthz HTTP/1.0\r\n\r\n", 1)
    assert resp.status == 200


async def test_upgrade_requests_answered_then_closed(url: str) -> None:
    """An Upgrade request is answered as plain HTTP, CONNECT is refused, and both connections
    close (what would follow is not HTTP)."""
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n" + b"\x81\x85garbage-websocket-frame"
    )
    responses = await exchange(url, upgrade, 2)
    assert [r.status for r in responses] == [200]
    responses = await exchange(url, b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 2)
    assert len(responses) == 1 and 400 <= responses[0].status < 500


async def test_many_tiny_chunks_are_linear(url: str) -> None:
    """A body sent as hundreds of one-byte chunks is reassembled exactly (and cheaply)."""
    body = b'{"key":"tiny-chunks","value":3}'
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    data = (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
        + get_request("/counters/tiny-chunks")
    )
    responses = await exchange(url, data, 2)
    assert [r.status for r in responses] == [202, 200]
    assert json.loads(responses[1].body)["value"] == 3


async def test_half_closed_client_gets_every_answer_in_order(url: str) -> None:
    """A client that pipelines and then half-closes (`printf ... | socat`) gets the answer to an
    asynchronous read, then the 501 for the unknown method after it, then the close."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(get_request("/counters/half-closed") + b"BAD / HTTP/1.1\r\n\r\n")
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    answers, _ = parse_answers(itertools.repeat("GET"), received)
    assert [(r.status, json.loads(r.body)["error"]) for r in answers] == [
        (404, "not_found"),
        (501, "method_not_implemented"),
    ]


JSON_TYPE = b"Content-Type: application/json\r\n"


def chunked_increment(key: str, headers: bytes, trailers: bytes) -> bytes:
    """POST /increment of 1 to `key`, its body in two chunks, then a trailer section."""
    body = b'{"key":"%s","value":1}' % key.encode()
    return (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n%s\r\n" % headers
        + b"5\r\n%s\r\n%x\r\n%s\r\n0\r\n%s\r\n" % (body[:5], len(body) - 5, body[5:], trailers)
    )


async def test_trailer_content_type_expect_and_host_are_ignored(url: str) -> None:
    """A chunked JSON increment stays a 202 whatever Content-Type, Expect or Host its
    trailer carries, and a text/plain one stays a 415 with a JSON Content-Type in its trailer."""
    trailers = b"Content-Type: text/plain\r\nExpect: nothing\r\nHost: elsewhere\r\n"
    [accepted] = await exchange(url, chunked_increment("trailed", JSON_TYPE, trailers), 1)
    assert accepted.status == 202
    plain = chunked_increment("trailed", b"Content-Type: text/plain\r\n", JSON_TYPE)
    [refused] = await exchange(url, plain, 1)
    assert refused.status == 415, refused
    assert json.loads(refused.body)["error"] == "unsupported_media_type"
    [read] = await exchange(url, get_request("/counters/trailed"), 1)
    assert json.loads(read.body)["value"] == 1


async def test_trailer_authorization_does_not_authenticate(tmp_path: Path, sqlite_url: str) -> None:
    """With keys required, a valid key sent only in a chunked body's trailer gets 401 and counts
    nothing; the same key as a header gets 202."""
    key = await add_api_key(sqlite_url, "trailer")
    authorization = b"Authorization: Bearer %s\r\n" % key.encode()
    async with run_service(settings_for(tmp_path, sqlite_url, auth="required")) as svc:
        data = chunked_increment("trailer-auth", JSON_TYPE, authorization)
        [refused] = await exchange(svc.url, data, 1)
        assert refused.status == 401, refused
        assert json.loads(refused.body)["error"] == "unauthorized"
        data = chunked_increment("trailer-auth", JSON_TYPE + authorization, b"")
        [accepted] = await exchange(svc.url, data, 1)
        assert accepted.status == 202
        [read] = await exchange(svc.url, get_request("/counters/trailer-auth", authorization), 1)
        assert json.loads(read.body)["value"] == 1


async def test_trailer_authorization_does_not_escape_a_rate_limit(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A key past its rate limit gets 429 even with another key's Authorization in a trailer."""
    slow = await add_api_key(sqlite_url, "slow", rate=0.001, burst=1)
    other = await add_api_key(sqlite_url, "other")
    slow_header = b"Authorization: Bearer %s\r\n" % slow.encode()
    other_header = b"Authorization: Bearer %s\r\n" % other.encode()
    async with run_service(settings_for(tmp_path, sqlite_url, auth="required")) as svc:
        data = chunked_increment("trailer-rate", JSON_TYPE + slow_header, b"")
        [first] = await exchange(svc.url, data, 1)
        assert first.status == 202
        data = chunked_increment("trailer-rate", JSON_TYPE + slow_header, other_header)
        [second] = await exchange(svc.url, data, 1)
        assert second.status == 429, second
        assert json.loads(second.body)["error"] == "rate_limited"


async def test_two_host_headers_are_refused(url: str) -> None:
    """A request with two Host fields, whatever their spelling, gets 400 and a close, and the
    request pipelined after it no answer (RFC 9112 section 3.2)."""
    for first, second in (
        (b"Host: a", b"Host: b"),
        (b"Host: a", b"Host: a"),
        (b"host: a", b"HOST: a"),
        (b"Host: a", b"hOsT: "),
        (b"hoST: a", b"Host: a"),
    ):
        for version in (b"HTTP/1.1", b"HTTP/1.0"):
            data = b"GET /healthz %s\r\n%s\r\n%s\r\n\r\n" % (version, first, second)
            answers = await exchange(url, data + get_request("/healthz"), 2)
            assert [r.status for r in answers] == [400], (data, answers)
            assert json.loads(answers[0].body)["error"] == "duplicate_host"
            assert answers[0].headers["connection"] == "close"


def http10(line: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    """An HTTP/1.0 request with Connection: keep-alive."""
    return b"%s HTTP/1.0\r\n%sConnection: keep-alive\r\n\r\n%s" % (line, headers, body)


async def test_http10_keep_alive_is_announced(url: str) -> None:
    """Every answer to an HTTP/1.0 request with Connection: keep-alive says Connection:
    keep-alive (fast path, general path, asynchronous read, HEAD, error) and the connection
    stays open; a plain HTTP/1.0 request is answered and closed; HTTP/1.1 answers are as before."""
    body = b'{"key":"http10","value":2}'
    json_type = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    form = b"key=http10&value=3"
    form_type = b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 18\r\n"
    data = (
        http10(b"POST /increment", json_type, body)
        + http10(b"POST /increment", form_type, form)
        + http10(b"POST /increment", json_type + b"Expect: 100-continue\r\n", body)
        + http10(b"GET /counters/http10")
        + http10(b"HEAD /healthz")
        + http10(b"GET /nope")
        + b"GET /healthz HTTP/1.0\r\n\r\n"
    )
    methods = ["POST", "POST", "POST", "GET", "HEAD", "GET", "GET"]
    answers, _ = parse_answers(methods, await read_until_closed(url, data))
    assert [a.status for a in answers] == [202, 202, 202, 200, 200, 404, 200]
    assert json.loads(answers[3].body)["value"] == 7
    assert [a.headers.get("connection") for a in answers] == [*["keep-alive"] * 6, "close"]
    assert all(a.interim == [] for a in answers)  # HTTP/1.0 clients never wait for 100 Continue
    [answer] = await exchange(url, increment_request("http11", 1), 1)
    assert answer.status == 202 and "connection" not in answer.headers


async def test_ab_keep_alive_completes(tmp_path: Path, sqlite_url: str) -> None:
    """ApacheBench with -k (HTTP/1.0 keep-alive, a real client that waits for the close unless
    told otherwise) completes 100 increments without a timeout, and they all count."""
    ab = shutil.which("ab")
    if ab is None:
        skip_or_fail("ab (Debian apache2-utils) is not installed")
        return
    body = tmp_path / "body.json"
    body.write_bytes(b'{"key":"ab-keep-alive","value":1}')
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        ab_run = await asyncio.create_subprocess_exec(
            ab,
            *("-k", "-n", "100", "-c", "1", "-s", "5", "-p", str(body)),
            *("-T", "application/json", f"{svc.url}/increment"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ab_run.communicate(), 60)
        report = out.decode() + err.decode()
        assert ab_run.returncode == 0, report
        assert re.search(r"Complete requests:\s+100\n", report), report
        assert re.search(r"Failed requests:\s+0\n", report), report
        assert re.search(r"Keep-Alive requests:\s+100\n", report), report
        [read] = await exchange(svc.url, get_request("/counters/ab-keep-alive"), 1)
        assert json.loads(read.body)["value"] == 100
