"""What a route says when it refuses: the media types it reads, the methods it answers (HEAD
on every GET route), and a key whose percent-encoding is broken."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import run_service, settings_for


async def test_415_names_what_the_route_reads(tmp_path: Path, sqlite_url: str) -> None:
    """POST /increments reads JSON only and says so; POST /increment also reads forms."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        batch = await client.post("/increments", content=b"key=a&value=1", headers=form)
        assert batch.status_code == 415
        assert batch.json()["detail"].endswith("send application/json.")
        assert "form" not in batch.json()["detail"].split("send", 1)[1]
        one = await client.post("/increment", content=b"x", headers={"Content-Type": "text/plain"})
        assert one.status_code == 415
        assert one.json()["detail"].endswith(
            "send application/json or application/x-www-form-urlencoded."
        )


async def test_allow_lists_head_where_head_works(tmp_path: Path, sqlite_url: str) -> None:
    """GET routes answer HEAD, and their 405 says `Allow: GET, HEAD`; POST routes say POST."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/counters/x"):
            wrong = await client.post(path)
            assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET, HEAD"), path
            head = await client.head(path)
            got = await client.get(path)
            assert head.status_code == got.status_code != 405, path
            assert head.content == b""
        for path in ("/increment", "/increments"):
            for method in ("GET", "HEAD", "PUT"):
                wrong = await client.request(method, path)
                assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST"), (method, path)


async def test_broken_percent_encoding_is_a_400(tmp_path: Path, sqlite_url: str) -> None:
    """GET /counters/%ZZ and a truncated escape are 400 invalid_key, not a 404 for a key
    spelled with a literal %; %25 is a %."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for path in ("/counters/%ZZ", "/counters/a%2", "/counters/%", "/counters/%G0"):
            resp = await client.get(path)
            assert resp.status_code == 400, path
            assert resp.json()["error"] == "invalid_key"
            assert "percent-encoding" in resp.json()["detail"]
        assert (
            await client.post("/increment", json={"key": "100%", "value": 3})
        ).status_code == 202
        assert (await client.get("/counters/100%25")).json() == {"key": "100%", "value": 3}


async def test_json_sent_as_a_form_is_told_the_content_type(
    tmp_path: Path, sqlite_url: str
) -> None:
    """`curl -d '{"key":...}'` (JSON labelled as a form, curl's default) and JSON with no
    Content-Type are told to send Content-Type: application/json; nothing counts; a real form
    still works."""
    curl_d = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b'{"key":"curl","value":1}'
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        as_form = await client.post("/increment", content=body, headers=curl_d)
        spaced = await client.post("/increment", content=b"\n  [" + body + b"]", headers=curl_d)
        untyped = await client.post("/increment", content=body)
        batch = await client.post("/increments", content=b"[" + body + b"]", headers=curl_d)
        form = await client.post("/increment", content=b"key=curl-form&value=2", headers=curl_d)
        missing = await client.get("/counters/curl")
    assert (as_form.status_code, as_form.json()["error"]) == (400, "malformed_form")
    assert (spaced.status_code, spaced.json()["error"]) == (400, "malformed_form")
    assert (untyped.status_code, batch.status_code) == (415, 415)
    for answer in (as_form, spaced, untyped, batch):
        assert "send it with Content-Type: application/json" in answer.json()["detail"], answer
    assert form.status_code == 202
    assert missing.status_code == 404


async def test_a_missing_counter_says_what_a_read_includes(tmp_path: Path, sqlite_url: str) -> None:
    """The 404 of an unknown counter says that unflushed increments on other instances are not
    included, and how to read your own writes."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        missing = await client.get("/counters/never-written")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    detail = missing.json()["detail"]
    assert "Unflushed increments on other instances" in detail
    assert "are not included" in detail
    assert "read on the connection that wrote them" in detail
