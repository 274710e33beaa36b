"""API key administration: names, rotation with a grace period, reuse of a revoked name, the
listing, and the log line of a reload that changes the key set."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import httpx
import pytest
from support import add_api_key, run_cli, run_service, settings_for, unique, wait_until

from incrementer.auth import admin as keys
from incrementer.store import open_store


def test_keys_list_has_a_header_and_json(tmp_path: Path) -> None:
    """keys list prints a header row over aligned columns; --json gives every field but the
    secret, revoked keys included."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    secret = run_cli(
        "keys", "create", "alice", "--rate", "100", "--database-url", url, cwd=tmp_path
    )
    assert secret.returncode == 0, secret.stderr
    assert run_cli("keys", "create", "bob", "--database-url", url, cwd=tmp_path).returncode == 0
    assert run_cli("keys", "revoke", "bob", "--database-url", url, cwd=tmp_path).returncode == 0
    listed = run_cli("keys", "list", "--database-url", url, cwd=tmp_path)
    header, alice, bob = listed.stdout.splitlines()
    assert header.split() == [
        "NAME", "KEY", "ID", "STATE", "SCOPES", "PREFIX", "RATE", "BURST", "CREATED"
    ]  # fmt: skip
    assert alice.split()[:6] == [
        "alice",
        secret.stdout.split(".")[0].removeprefix("ik_"),
        "active",
        "write,read,admin",
        "-",
        "100",
    ]
    assert bob.split()[2] == "revoked"
    assert alice.index("active") == header.index("STATE")  # aligned under the header
    assert secret.stdout.split(".")[1].strip() not in listed.stdout
    rows = json.loads(run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path).stdout)
    assert [(r["name"], r["active"], r["rate"]) for r in rows] == [
        ("alice", True, 100.0),
        ("bob", False, None),
    ]
    assert set(rows[0]) == {
        "name", "key_id", "active", "scopes", "prefix", "rate", "burst", "created_at", "revoked_at"
    }  # fmt: skip
    assert (rows[0]["scopes"], rows[0]["prefix"]) == (["write", "read", "admin"], None)
    assert rows[0]["created_at"].endswith("Z") and rows[1]["revoked_at"].endswith("Z")


async def test_a_revoked_name_can_be_used_again(tmp_path: Path, db_url: str) -> None:
    """A name holds one unrevoked key: a second create is refused until the first is revoked,
    then the name takes a new key."""
    name = unique("reuse-")
    await keys.create(db_url, name, None, None)
    with pytest.raises(click.ClickException, match="already exists"):
        await keys.create(db_url, name, None, None)
    assert await keys.revoke(db_url, name)
    await keys.create(db_url, name, None, None)
    mine = [k for k in await keys.listing(db_url) if k.name == name]
    assert [k.active for k in mine] == [False, True]


async def test_rotation_keeps_the_old_key_for_its_grace_period(tmp_path: Path, db_url: str) -> None:
    """keys rotate: the new key works at once, the old one keeps working during --grace and
    stops after a revoke; with no grace it stops at the next reload."""
    name = unique("rotate-")
    first = await add_api_key(db_url, name)
    settings = settings_for(tmp_path, db_url, auth="required", auth_refresh=0.2)
    body = {"key": "rotated", "value": 1}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:

        async def status(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return (await client.post("/increment", json=body, headers=headers)).status_code

        assert await status(first) == 202
        second = await keys.rotate(db_url, name, 3600, None, None)
        assert await status(second) == 202
        await asyncio.sleep(0.5)  # reloads pass (--auth-refresh 0.2)
        assert await status(first) == 202  # in its grace period
        third = await keys.rotate(db_url, name, 0, None, None)
        assert await status(third) == 202

        async def stopped(key: str) -> bool:
            return await status(key) == 401

        await wait_until(lambda: stopped(second), timeout=5)  # rotated out with no grace
        assert await status(first) == 202  # still in its hour
        assert await keys.revoke(db_url, name)
        await wait_until(lambda: stopped(first), timeout=5)
        await wait_until(lambda: stopped(third), timeout=5)
    listed = [k for k in await keys.listing(db_url) if k.name == name]
    assert len(listed) == 3 and not any(k.active for k in listed)


def test_rotate_keeps_the_old_key_an_hour_by_default(tmp_path: Path) -> None:
    """`keys rotate NAME` without --grace leaves the old key working for an hour, and says until
    when; `--grace 0` revokes it at once."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert run_cli("keys", "create", "app", "--database-url", url, cwd=tmp_path).returncode == 0
    before = datetime.now(UTC)
    rotated = run_cli("keys", "rotate", "app", "--database-url", url, cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert "keeps working for 3600 s more, until 20" in rotated.stderr
    assert "--grace 0 revokes it now" in rotated.stderr
    listed = run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path)
    old, new = json.loads(listed.stdout)
    assert (old["active"], new["active"]) == (True, True)
    until = datetime.fromisoformat(old["revoked_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=55) < until - before < timedelta(minutes=65)
    now = run_cli("keys", "rotate", "app", "--grace", "0", "--database-url", url, cwd=tmp_path)
    assert "the old one is revoked now" in now.stderr
    listed = run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path)
    assert [k["active"] for k in json.loads(listed.stdout)] == [True, False, True]


async def test_a_reload_that_changes_the_key_set_logs_one_line(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One info line names the keys a reload found new or gone; reloads that change nothing
    say nothing."""
    await add_api_key(sqlite_url, "kept")
    settings = settings_for(tmp_path, sqlite_url, auth="required", auth_refresh=0.1)
    caplog.set_level(logging.INFO, logger="incrementer.auth")
    async with run_service(settings):
        await add_api_key(sqlite_url, "added")
        await wait_until(lambda: _reload_lines(caplog), timeout=5)
        await keys.revoke(sqlite_url, "kept")
        await wait_until(lambda: len(_reload_lines(caplog)) == 2, timeout=5)
        await asyncio.sleep(0.5)  # several more reloads, nothing changed
    first, second = _reload_lines(caplog)
    assert first.startswith("API keys reloaded: 2 active; new: 'added' (")
    assert second.startswith("API keys reloaded: 1 active; gone: 'kept' (")
    store = open_store(sqlite_url)
    await store.open()
    try:
        assert [k.name for k in await store.api_keys()] == ["added"]
    finally:
        await store.close()


def _reload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("API keys reloaded")
    ]


@pytest.mark.parametrize(
    "name",
    [
        "evil\u2028INFO incrementer.auth: API key 'admin' revoked",  # line separator
        "para\u2029graph",
        "gnp.\u202eexe",  # right-to-left override
        "isolate\u2066x\u2069",
        "zero\u200bwidth",
        "bom\ufeff",
        "nel\x85",
        "tab\there",
    ],
)
def test_key_names_refuse_format_and_separator_characters(tmp_path: Path, name: str) -> None:
    """Guards key names: control, format (bidi, zero-width) and line or paragraph separator
    characters are a one-line usage error from keys create and keys rotate, naming the code
    point, and nothing is stored."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    for command in ("create", "rotate"):
        refused = run_cli("keys", command, name, "--database-url", url, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr and "U+" in refused.stderr
    listed = run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path)
    assert json.loads(listed.stdout or "[]") == []


def test_key_names_are_quoted_in_log_lines() -> None:
    """Guards the logs: a name is logged quoted (repr), so no character of it can end the line
    or pass for another field, even for a name stored before names were checked."""
    from incrementer.auth.source import describe_change

    forged = "x\u2028INFO incrementer.auth: API key 'admin' revoked"
    line = describe_change({}, {"0123456789ab": forged})
    assert "\u2028" not in line and "\\u2028" in line
    assert line == "new: " + repr(forged) + " (0123456789ab)"


@pytest.mark.parametrize("grace", ["inf", "1e300", "nan", "-1", "-inf"])
def test_rotate_refuses_a_grace_it_cannot_store(tmp_path: Path, grace: str) -> None:
    """Guards keys rotate --grace: an infinite, huge, NaN or negative grace is a one-line
    usage error, not a traceback, and the old key is left as it was."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert run_cli("keys", "create", "app", "--database-url", url, cwd=tmp_path).returncode == 0
    refused = run_cli(
        "keys", "rotate", "app", "--grace", grace, "--database-url", url, cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and "--grace" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    listed = run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path)
    assert [(k["active"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [(True, None)]
