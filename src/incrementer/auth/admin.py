"""API key administration for the CLI: one store call each. Commands that change keys migrate
first; `keys list` only reads (it never creates a database file, nor migrates one)."""

from __future__ import annotations

import asyncio
import math
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import click

from incrementer.auth.keyring import new_key
from incrementer.store import open_store
from incrementer.store.base import SCOPES, ApiKey, DuplicateKeyName, Store, scopes_text
from incrementer.store.migrate import migrate

LIST_COLUMNS = ("NAME", "KEY ID", "STATE", "SCOPES", "PREFIX", "RATE", "BURST", "CREATED")
# Control characters (Cc), format characters (Cf: the bidi controls, zero-width ones, soft
# hyphen) and the line and paragraph separators (Zl, Zp): a terminal, a log viewer or a shell
# would show them as nothing, reorder the text around them, or start a new line with them.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
MAX_GRACE = 10 * 365 * 86400.0


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


def check_name(name: str, what: str = "NAME") -> str:
    """A key's name (or prefix) as given; refused (a usage error) when blank or holding control,
    format or line-separating characters, which `keys list`, the logs and a shell would show
    as nothing, reorder, or break into lines."""
    if not name.strip():
        noun = "name" if what == "NAME" else "prefix"
        raise click.BadParameter(f"an API key needs a {noun} that is not blank", param_hint=what)
    for c in name:
        category = unicodedata.category(c)
        if category == "Cc":
            why = f"holds control characters (U+{ord(c):04X})"
        elif category in REFUSED_CATEGORIES:
            why = f"holds U+{ord(c):04X}, a format or line separator character"
        else:
            continue
        raise click.BadParameter(f"{name!r} {why}", param_hint=what)
    return name


def check_scopes(text: str) -> tuple[str, ...]:
    """`write,read,admin` (any of them, in any order) -> the scopes in SCOPES' order."""
    named = [part.strip() for part in text.split(",")]
    unknown = [part for part in named if part not in SCOPES]
    if unknown or not text.strip():
        raise click.BadParameter(
            f"{text!r}: give one or more of {', '.join(SCOPES)}, separated by commas",
            param_hint="--scope",
        )
    return tuple(s for s in SCOPES if s in named)


def check_grace(grace: float) -> None:
    """Seconds from now, finite: the database has to store the time it ends."""
    if not math.isfinite(grace) or grace < 0 or grace > MAX_GRACE:
        raise click.BadParameter(
            f"{grace:g}: give seconds from 0 to {MAX_GRACE:.0f} (ten years); "
            "`keys revoke` ends a key for good",
            param_hint="--grace",
        )


def check_limits(rate: float | None, burst: int | None) -> None:
    if rate is not None and rate <= 0:
        raise click.BadParameter(f"{rate}: must be positive", param_hint="--rate")
    if burst is not None and burst < 1:
        raise click.BadParameter(f"{burst}: must be at least 1", param_hint="--burst")


async def create(
    database_url: str,
    name: str,
    rate: float | None,
    burst: int | None,
    scopes: tuple[str, ...] = SCOPES,
    prefix: str | None = None,
) -> str:
    check_name(name)
    check_limits(rate, burst)
    if prefix is not None:
        check_name(prefix, "--prefix")
    key, key_id, key_hash = new_key()
    new = ApiKey(name, key_id, key_hash, rate, burst, scopes=scopes, prefix=prefix)
    async with _opened(database_url) as store:
        try:
            await store.create_api_key(new)
        except DuplicateKeyName:
            raise click.ClickException(
                f"an API key named {name!r} already exists (`keys rotate` replaces it)"
            ) from None
    return key


async def rotate(
    database_url: str,
    name: str,
    grace: float,
    rate: float | None,
    burst: int | None,
    scopes: tuple[str, ...] | None = None,
    prefix: str | None = None,
) -> str:
    """A new key for name; the old one is revoked grace seconds from now. The new key keeps
    the old one's limits, scopes and prefix unless rate, burst, scopes or prefix say
    otherwise."""
    check_name(name)
    check_limits(rate, burst)
    check_grace(grace)
    if prefix is not None:
        check_name(prefix, "--prefix")
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
            scopes=scopes if scopes is not None else current[0].scopes,
            prefix=prefix if prefix is not None else current[0].prefix,
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
            scopes_text(key.scopes) or "none",
            "-" if key.prefix is None else repr(key.prefix),
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
            "scopes": list(key.scopes),
            "prefix": key.prefix,
            "rate": key.rate,
            "burst": key.burst,
            "created_at": key.created_at,
            "revoked_at": key.revoked_at,
        }
        for key in keys
    ]
