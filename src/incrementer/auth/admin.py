"""API key administration for the CLI: one store call each. Commands that change keys migrate
first; `keys list` only reads (it never creates a database file, nor migrates one)."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import click

from incrementer.auth.keyring import new_key
from incrementer.store import open_store
from incrementer.store.base import ApiKey, DuplicateKeyName, Store
from incrementer.store.migrate import migrate

LIST_COLUMNS = ("NAME", "KEY ID", "STATE", "RATE", "BURST", "CREATED")


@asynccontextmanager
async def _opened(database_url: str, read_only: bool = False) -> AsyncIterator[Store]:
    if not read_only:
        await asyncio.to_thread(migrate, database_url)
    store = open_store(database_url, read_only=read_only)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def check_name(name: str) -> str:
    """A key's name as given; refused (a usage error) when blank or holding control characters,
    which `keys list`, the logs and a shell would show as nothing or garble."""
    if not name.strip():
        raise click.BadParameter("an API key needs a name that is not blank", param_hint="NAME")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise click.BadParameter(f"{name!r} holds control characters", param_hint="NAME")
    return name


def check_limits(rate: float | None, burst: int | None) -> None:
    if rate is not None and rate <= 0:
        raise click.BadParameter(f"{rate}: must be positive", param_hint="--rate")
    if burst is not None and burst < 1:
        raise click.BadParameter(f"{burst}: must be at least 1", param_hint="--burst")


async def create(database_url: str, name: str, rate: float | None, burst: int | None) -> str:
    check_name(name)
    check_limits(rate, burst)
    key, key_id, key_hash = new_key()
    async with _opened(database_url) as store:
        try:
            await store.create_api_key(ApiKey(name, key_id, key_hash, rate, burst))
        except DuplicateKeyName:
            raise click.ClickException(
                f"an API key named {name!r} already exists (`keys rotate` replaces it)"
            ) from None
    return key


async def rotate(
    database_url: str, name: str, grace: float, rate: float | None, burst: int | None
) -> str:
    """A new key for name; the old one is revoked grace seconds from now. The new key keeps
    the old one's limits unless rate or burst say otherwise."""
    check_limits(rate, burst)
    if grace < 0:
        raise click.BadParameter(f"{grace}: must be >= 0", param_hint="--grace")
    key, key_id, key_hash = new_key()
    async with _opened(database_url) as store:
        current = [k for k in await store.api_keys() if k.name == name and k.revoked_at is None]
        if not current:
            raise click.ClickException(f"no API key named {name!r} to rotate")
        new = ApiKey(
            name,
            key_id,
            key_hash,
            rate if rate is not None else current[0].rate,
            burst if burst is not None else current[0].burst,
        )
        if not await store.rotate_api_key(name, new, grace):
            raise click.ClickException(f"no API key named {name!r} to rotate")
    return key


async def listing(database_url: str) -> list[ApiKey]:
    async with _opened(database_url, read_only=True) as store:
        return await store.api_keys(include_revoked=True)


async def revoke(database_url: str, name: str) -> bool:
    async with _opened(database_url) as store:
        return await store.revoke_api_key(name)


def state(key: ApiKey) -> str:
    if key.revoked_at is None:
        return "active"
    return f"active until {key.revoked_at}" if key.active else f"revoked {key.revoked_at}"


def table(keys: list[ApiKey]) -> list[str]:
    """`keys list`: a header and one aligned row per key."""
    rows = [LIST_COLUMNS] + [
        (
            key.name,
            key.key_id,
            state(key),
            "default" if key.rate is None else f"{key.rate:g}",
            "default" if key.burst is None else str(key.burst),
            key.created_at,
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def as_json(keys: list[ApiKey]) -> list[dict[str, object]]:
    return [
        {
            "name": key.name,
            "key_id": key.key_id,
            "active": key.active,
            "rate": key.rate,
            "burst": key.burst,
            "created_at": key.created_at,
            "revoked_at": key.revoked_at,
        }
        for key in keys
    ]
