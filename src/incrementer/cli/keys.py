"""`incrementer keys create|rotate|list|revoke`: API keys, stored hashed in the service's
database (auth/admin.py does the work)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import click

from incrementer.cli.options import settings_options
from incrementer.config import Settings


@click.group()
def keys() -> None:
    """Create, list, rotate and revoke API keys (stored hashed in the service's database)."""


# A rotation is routine (a leaked key is revoked at once with --grace 0, or `keys revoke`), so
# by default the old key keeps working long enough for every client to be given the new one:
# revoking it at once stops every client that has not switched yet.
DEFAULT_GRACE = 3600.0

rate_option = click.option(
    "--rate", type=float, help="Requests per second for this key (default: --rate-limit)."
)
burst_option = click.option(
    "--burst", type=int, help="Bucket size for this key (default: --rate-burst)."
)
scope_help = (
    "What the key may do, comma-separated: write (POST /increment, /increments), read (GET "
    "/counters...), admin (GET /metrics, the details of /readyz)."
)
prefix_help = (
    "Limit the key to counters whose names start with this: every key it increments or reads, "
    "and the prefix of any listing or top N it asks for."
)


@keys.command("create")
@click.argument("name")
@rate_option
@burst_option
@click.option("--scope", "scope", default="write,read,admin", show_default=True, help=scope_help)
@click.option("--prefix", help=prefix_help + " Default: any counter.")
@settings_options("database_url")
def keys_create(
    name: str,
    rate: float | None,
    burst: int | None,
    scope: str,
    prefix: str | None,
    settings: Settings,
) -> None:
    """Create a key and print it once: only its hash is stored. A name can hold one unrevoked
    key; the name of a revoked key can be used again."""
    from incrementer.auth import admin as key_admin

    scopes = key_admin.check_scopes(scope)
    key = asyncio.run(key_admin.create(settings.database_url, name, rate, burst, scopes, prefix))
    click.echo(key)
    click.echo(f"created API key {name!r}; it is shown only now, store it safely", err=True)


@keys.command("rotate")
@click.argument("name")
@click.option(
    "--grace",
    type=float,
    default=DEFAULT_GRACE,
    show_default=True,
    help="Seconds the old key keeps working, for clients to switch to the new one; 0 revokes "
    "it now (a leaked key).",
)
@rate_option
@burst_option
@click.option("--scope", "scope", help=scope_help + " Default: the old key's.")
@click.option("--prefix", help=prefix_help + " Default: the old key's.")
@settings_options("database_url")
def keys_rotate(
    name: str,
    grace: float,
    rate: float | None,
    burst: int | None,
    scope: str | None,
    prefix: str | None,
    settings: Settings,
) -> None:
    """Issue a new key for NAME and print it once; the old key is revoked after --grace seconds
    (every instance stops taking it within --auth-refresh after that). The new key keeps the
    old one's limits, scopes and prefix unless --rate, --burst, --scope or --prefix are
    given."""
    from incrementer.auth import admin as key_admin

    scopes = None if scope is None else key_admin.check_scopes(scope)
    key = asyncio.run(
        key_admin.rotate(settings.database_url, name, grace, rate, burst, scopes, prefix)
    )
    click.echo(key)
    if grace:
        until = datetime.now(UTC) + timedelta(seconds=grace)
        when = (
            f"keeps working for {grace:g} s more, until {until:%Y-%m-%dT%H:%M:%SZ} "
            "(--grace 0 revokes it now)"
        )
    else:
        when = "is revoked now"
    click.echo(
        f"rotated API key {name!r}: the new key is shown only now; the old one {when}", err=True
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options("database_url")
def keys_list(settings: Settings, as_json: bool) -> None:
    """List keys (names, ids, state, scopes, prefix, limits, dates; never secrets), revoked
    ones too. Reads
    only: creates and migrates nothing."""
    from incrementer.auth import admin as key_admin

    found = asyncio.run(key_admin.listing(settings.database_url))
    if as_json:
        import msgspec

        click.echo(msgspec.json.encode(key_admin.as_json(found)).decode())
        return
    for line in key_admin.table(found):
        click.echo(line)


@keys.command("revoke")
@click.argument("name")
@settings_options("database_url")
def keys_revoke(name: str, settings: Settings) -> None:
    """Revoke NAME's keys (a rotated-out key still in its grace period too); every instance
    stops accepting them within --auth-refresh seconds."""
    from incrementer.auth import admin as key_admin

    if not asyncio.run(key_admin.revoke(settings.database_url, name)):
        raise click.ClickException(f"no active API key named {name!r}")
    click.echo(f"revoked API key {name!r}")
