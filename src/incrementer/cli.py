"""Command line: thin. Builds Settings and calls into the service, the migrator or the WAL."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from incrementer.config import (
    AUTH_MODES,
    DURABILITY_MODES,
    ENV_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    Settings,
)

DEFAULTS = Settings()
HELP = {
    "host": "Address to bind.",
    "port": "Port to bind; 0 picks a free one.",
    "database_url": "sqlite:///PATH or postgresql://USER@HOST:PORT/DB.",
    "migrate": "Apply pending schema migrations at start.",
    "durability": "When to acknowledge: memory, wal (after write()), wal-fsync (after fsync).",
    "data_dir": "Directory for the WAL segments, the node id and the lock file.",
    "fsync_interval": "Seconds between WAL fsyncs in durability wal.",
    "flush_interval": "Seconds between flushes (a flush also starts at --flush-max-keys).",
    "flush_interval_max": (
        "How far the flush interval stretches while flushes are slow (the database is the "
        "bottleneck), so more increments share each row written; a value no higher than "
        "--flush-interval keeps the interval fixed."
    ),
    "flush_max_keys": "Flush early once this many distinct keys are dirty.",
    "max_pending_keys": "Distinct unflushed keys before new keys get 503 + Retry-After.",
    "max_key_bytes": "Longest key accepted, in UTF-8 bytes.",
    "allow_negative": "Accept zero and negative values.",
    "max_body_bytes": "Largest request body accepted (413 above).",
    "max_header_bytes": "Largest request line plus headers accepted (431 above).",
    "max_batch_items": "Most increments in one POST /increments.",
    "max_connections": "Open connections; past it the longest-idle one makes room, else 503.",
    "idle_timeout": "Seconds a keep-alive connection may sit idle between requests.",
    "request_timeout": "Seconds to send one whole request, the first from the accept (slowloris).",
    "shutdown_timeout": "Seconds to finish requests and the final flush on SIGTERM.",
    "lag_bound": "Persistence lag above which /readyz answers 503.",
    "auth": "API keys: required, off (loopback binds only), auto (off on loopback, else required).",
    "insecure_no_auth": "Allow --auth off on a non-loopback bind (something in front authenticates).",
    "auth_refresh": "Seconds between reloads of the API keys (a revoked key stops within this).",
    "rate_limit": "Default requests/s per API key (per client IP with auth off); 0 = unlimited.",
    "rate_burst": "Default bucket size for --rate-limit; 0 = one second's worth.",
    "log_format": "text or json.",
    "log_level": "debug, info, warning or error.",
}
CHOICES = {
    "auth": AUTH_MODES,
    "durability": DURABILITY_MODES,
    "log_format": LOG_FORMATS,
    "log_level": LOG_LEVELS,
}
TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "Path": str, "Durability": str}


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per Settings field, each also read from INCREMENTER_<NAME>; defaults live in
    Settings so a TOML file can sit between the environment and them."""
    for field in reversed(fields(Settings)):
        name = field.name
        flag = name.replace("_", "-")
        envvar = ENV_PREFIX + name.upper()
        default = field.default
        help_text = f"{HELP[name]} [default: {default}] [env: {envvar}]"
        if field.type == "bool":
            decl = f"--{flag}/--no-{flag}"
            func = click.option(decl, name, default=None, envvar=envvar, help=help_text)(func)
            continue
        kind: Any = click.Choice(CHOICES[name]) if name in CHOICES else TYPES[str(field.type)]
        func = click.option(
            f"--{flag}", name, type=kind, default=None, envvar=envvar, help=help_text
        )(func)
    return func


def build_settings(config: Path | None, values: dict[str, Any]) -> Settings:
    try:
        return Settings.build(values, config)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.version_option(package_name="incrementer")
def main() -> None:
    """incrementer: counter increments over HTTP, coalesced, logged, flushed exactly once."""


@main.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=ENV_PREFIX + "CONFIG",
    help="TOML file with settings (flags and env win).",
)
@settings_options
def serve(config: Path | None, **values: Any) -> None:
    """Run the service."""
    from incrementer import logs
    from incrementer.datadir import DataDirError
    from incrementer.ingest.wal import WalCorruptError
    from incrementer.service import Service
    from incrementer.store.base import BackendError

    settings = build_settings(config, values)
    logs.configure(settings.log_level, settings.log_format)
    import uvloop

    service = Service(settings)
    try:
        uvloop.run(service.serve())
    except (DataDirError, WalCorruptError, BackendError, OSError) as exc:
        click.echo(f"incrementer: cannot start: {exc}", err=True)
        sys.exit(2)
    if not service.clean:
        sys.exit(1)  # the log says what was left unflushed (in the WAL, replayed at next start)


# For the commands other than serve, which take only the database from Settings.
database_url_option = click.option(
    "--database-url",
    envvar=ENV_PREFIX + "DATABASE_URL",
    default=DEFAULTS.database_url,
    show_default=True,
    help=HELP["database_url"],
)


@main.command("migrate")
@database_url_option
def migrate_command(database_url: str) -> None:
    """Apply pending schema migrations."""
    from incrementer.store.migrate import migrate

    applied = migrate(database_url)
    click.echo(
        f"applied {len(applied)} migrations"
        + (f": {', '.join(applied)}" if applied else " (schema up to date)")
    )


@main.group()
def wal() -> None:
    """Inspect the write-ahead log."""


@wal.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar=ENV_PREFIX + "DATA_DIR",
    default=DEFAULTS.data_dir,
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(data_dir: Path, as_json: bool) -> None:
    """Segments, frames, increments and sequence range pending in the WAL."""
    from incrementer.ingest.wal import summarize

    summary = summarize(data_dir / "wal")
    if as_json:
        import msgspec

        payload = dataclasses.asdict(summary)
        payload["segments"] = [seg._asdict() for seg in summary.segments]
        click.echo(msgspec.json.encode(payload).decode())
        return
    click.echo(
        f"WAL in {data_dir / 'wal'}: {len(summary.segments)} segments, "
        f"{summary.frames} frames, {summary.records} increments, {summary.bytes} bytes, "
        f"seq {summary.first_seq}..{summary.last_seq}"
    )
    for seg in summary.segments:
        click.echo(
            f"  {seg.name}: {seg.bytes} bytes, seq {seg.first_seq}..{seg.last_seq}, "
            f"{seg.frames} frames, {seg.records} increments"
        )
    if summary.torn_tail:
        click.echo(f"torn tail (dropped at next start): {summary.torn_tail}")
    for problem in summary.problems:
        click.echo(f"PROBLEM: {problem}")


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed in the service's database)."""


@keys.command("create")
@click.argument("name")
@click.option(
    "--rate", type=float, help="Requests per second for this key (default: --rate-limit)."
)
@click.option("--burst", type=int, help="Bucket size for this key (default: --rate-burst).")
@database_url_option
def keys_create(name: str, rate: float | None, burst: int | None, database_url: str) -> None:
    """Create a key and print it once: only its hash is stored."""
    from incrementer import keys as key_admin

    key = asyncio.run(key_admin.create(database_url, name, rate, burst))
    click.echo(key)
    click.echo(f"created API key {name!r}; it is shown only now, store it safely", err=True)


@keys.command("list")
@database_url_option
def keys_list(database_url: str) -> None:
    """List keys (names, limits, dates; never secrets)."""
    from incrementer import keys as key_admin

    for key in asyncio.run(key_admin.listing(database_url)):
        state = f"revoked {key.revoked_at}" if key.revoked_at else "active"
        limit = f"rate={key.rate if key.rate is not None else 'default'}"
        limit += f" burst={key.burst if key.burst is not None else 'default'}"
        click.echo(f"{key.name}\t{key.key_id}\t{state}\t{limit}\tcreated {key.created_at}")


@keys.command("revoke")
@click.argument("name")
@database_url_option
def keys_revoke(name: str, database_url: str) -> None:
    """Revoke a key; every instance stops accepting it within --auth-refresh seconds."""
    from incrementer import keys as key_admin

    if not asyncio.run(key_admin.revoke(database_url, name)):
        raise click.ClickException(f"no active API key named {name!r}")
    click.echo(f"revoked API key {name!r}")


@main.command()
@click.argument("url", default="http://127.0.0.1:3333")
@click.option(
    "--api-key",
    envvar=ENV_PREFIX + "API_KEY",
    help="Key for /metrics when the server requires one. [env: INCREMENTER_API_KEY]",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds."
)
@click.option("--once", is_flag=True, help="Print one interval's figures and exit.")
def top(url: str, api_key: str | None, interval: float, once: bool) -> None:
    """Live figures of a running server, read from URL/metrics (needs `incrementer[top]`)."""
    from incrementer.top import TopError, run

    try:
        run(url, api_key, interval, once)
    except TopError as exc:
        click.echo(f"incrementer top: {exc}", err=True)
        sys.exit(1)
