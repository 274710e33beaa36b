"""API key administration for the CLI: migrate, then one store call each."""

from __future__ import annotations

import asyncio

import click

from incrementer.auth import new_key
from incrementer.store import open_store
from incrementer.store.base import ApiKey, DuplicateKeyName, Store
from incrementer.store.migrate import migrate


async def _open(database_url: str) -> Store:
    await asyncio.to_thread(migrate, database_url)
    store = open_store(database_url)
    await store.open()
    return store


async def create(database_url: str, name: str, rate: float | None, burst: int | None) -> str:
    if rate is not None and rate <= 0:
        raise click.BadParameter(f"--rate={rate}: must be positive")
    if burst is not None and burst < 1:
        raise click.BadParameter(f"--burst={burst}: must be at least 1")
    key, key_id, key_hash = new_key()
    store = await _open(database_url)
    try:
        await store.create_api_key(ApiKey(name, key_id, key_hash, rate, burst))
    except DuplicateKeyName:
        raise click.ClickException(f"an API key named {name!r} already exists") from None
    finally:
        await store.close()
    return key


async def listing(database_url: str) -> list[ApiKey]:
    store = await _open(database_url)
    try:
        return await store.api_keys(include_revoked=True)
    finally:
        await store.close()


async def revoke(database_url: str, name: str) -> bool:
    store = await _open(database_url)
    try:
        return await store.revoke_api_key(name)
    finally:
        await store.close()
