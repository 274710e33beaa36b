"""Command line: thin. Builds Settings and calls into the service, the migrator, the WAL or the
keys. Every command takes --config and the INCREMENTER_* variables for the settings it uses, and
reports failures through cli_errors.CommandLine: one line, exit 2 for usage, 1 at run time.

Shell completion comes from click: `eval "$(_INCREMENTER_COMPLETE=bash_source incrementer)"`
(zsh_source, fish_source for the other shells; docs/operations.md).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from incrementer.cli.errors import RUNTIME_ERRORS, CommandLine
from incrementer.config import (
    AUTH_MODES,
    DURABILITY_MODES,
    ENV_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    load_toml,
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
    "auth_lookup_rate": (
        "Database lookups per second, at most, of API keys not yet loaded (a new key works on "
        "its first request; unknown ones are remembered as absent until the next reload); "
        "0 = new keys wait for the next reload."
    ),
    "rate_limit": "Default requests/s per API key (per client IP with auth off); 0 = unlimited.",
    "rate_burst": "Default bucket size for --rate-limit; 0 = one second's worth.",
    "idempotency_window": (
        "Seconds an Idempotency-Key is remembered (a retry within it is applied once); keys "
        "older than this are swept from the database."
    ),
    "log_format": "text or json.",
    "log_level": "debug, info, warning or error.",
    "workers": (
        "Server processes sharing --host:--port, each with its own data dir (--data-dir/worker-N) "
        "under one supervisor; auto = one per usable CPU; 1 = this process serves alone."
    ),
}
CHOICES = {
    "auth": AUTH_MODES,
    "durability": DURABILITY_MODES,
    "log_format": LOG_FORMATS,
    "log_level": LOG_LEVELS,
}
TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "Path": str, "Durability": str}


SOURCES_NOTE = (
    "Every option can also be set by the environment variable shown with it, or in the TOML "
    "file named by --config (top level or an [incrementer] table, keys as the option names); a "
    "flag wins over the environment, which wins over the file."
)
CONFIGURED = "incrementer.configured"  # ctx.meta: the settings given anywhere, not defaulted


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config, plus one flag per named Settings field (every field when none are named), each
    also read from INCREMENTER_<NAME>. The command receives `settings`, built and validated from
    flags > environment > file > defaults; a bad value is a usage error naming where it was set.
    Defaults live in Settings, so the file can sit between the environment and them."""
    chosen = [f for f in fields(Settings) if not names or f.name in names]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            config: Path | None = kwargs.pop("config")
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            sources = {name: _source(ctx, name) for name in values}
            settings = build_settings(config, values, sources)
            from_file = load_toml(config).keys() if config is not None else set()
            ctx.meta[CONFIGURED] = {k for k, v in values.items() if v is not None} | from_file
            return func(settings=settings, **kwargs)

        command.__doc__ = f"{inspect.cleandoc(func.__doc__ or '')}\n\n{SOURCES_NOTE}"
        for field in reversed(chosen):
            command = _setting_option(field.name, str(field.type), field.default)(command)
        return click.option(
            "--config",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar=ENV_PREFIX + "CONFIG",
            help=f"TOML file with settings; flags and environment variables win. "
            f"[env: {ENV_PREFIX}CONFIG]",
        )(command)

    return decorate


def _setting_option(name: str, kind: str, default: Any) -> Callable[..., Any]:
    flag = name.replace("_", "-")
    envvar = ENV_PREFIX + name.upper()
    help_text = f"{HELP[name]} [default: {default}] [env: {envvar}]"
    if kind == "bool":
        return click.option(
            f"--{flag}/--no-{flag}", name, default=None, envvar=envvar, help=help_text
        )
    param_type: Any = click.Choice(CHOICES[name]) if name in CHOICES else TYPES[kind]
    if name == "workers":
        param_type = str  # a number or `auto`: config.parse_workers reads it, for TOML files too
    return click.option(
        f"--{flag}", name, type=param_type, default=None, envvar=envvar, help=help_text
    )


def _source(ctx: click.Context, name: str) -> str:
    """Where a parameter's value came from, as an error message names it."""
    source = ctx.get_parameter_source(name)
    if source == ParameterSource.COMMANDLINE:
        return f"from --{name.replace('_', '-')}"
    if source == ParameterSource.ENVIRONMENT:
        return f"from {ENV_PREFIX}{name.upper()}"
    return ""


def build_settings(
    config: Path | None, values: dict[str, Any], sources: dict[str, str] | None = None
) -> Settings:
    """Settings from the flags and environment (values) over the file; a ConfigError is reported
    by cli_errors as a usage error."""
    return Settings.build(values, config, sources)


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="incrementer")
def main() -> None:
    """incrementer: counter increments over HTTP, coalesced, logged, flushed exactly once.

    Every command reads its settings from flags, INCREMENTER_* environment variables and the TOML
    file named by --config; `incrementer COMMAND -h` lists them. A failure is one line on stderr,
    exit status 2 for a usage error and 1 for a failure at run time.
    """


@main.command()
@settings_options()
def serve(settings: Settings) -> None:
    """Run the service."""
    from incrementer import logs
    from incrementer.service import Service

    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from incrementer.process.supervisor import CannotStart, Supervisor

        try:
            code = Supervisor(settings).run()
        except (CannotStart, *RUNTIME_ERRORS) as exc:
            raise click.ClickException(f"cannot start: {exc}") from None
        sys.exit(code)  # 1: a worker did not drain cleanly (the log says which)
    import uvloop

    service = Service(settings)
    try:
        uvloop.run(service.serve())
    except RUNTIME_ERRORS as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    if not service.clean:
        sys.exit(1)  # the log says what was left unflushed (in the WAL, replayed at next start)


@main.command("migrate")
@settings_options("database_url")
def migrate_command(settings: Settings) -> None:
    """Apply pending schema migrations."""
    from incrementer.store.migrate import migrate

    applied = migrate(settings.database_url)
    click.echo(
        f"applied {len(applied)} migrations"
        + (f": {', '.join(applied)}" if applied else " (schema up to date)")
    )


@main.command("incr")
@click.argument("key")
@click.argument("value", type=int, default=1)
@click.option(
    "--url",
    envvar=ENV_PREFIX + "URL",
    help="The server [default: http://HOST:PORT of --host and --port] [env: INCREMENTER_URL]",
)
@click.option("--api-key", envvar=ENV_PREFIX + "API_KEY", help="An API key (ik_...).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to keep retrying before giving up (exit status 1).",
)
@settings_options("host", "port")
def incr_command(
    settings: Settings, key: str, value: int, url: str | None, api_key: str | None, timeout: float
) -> None:
    """Add VALUE (default 1) to the counter KEY on a running server, exactly once: retried under
    one Idempotency-Key until acknowledged. For shell scripts and cron jobs."""
    from incrementer.cli.incr import incr

    incr(url or settings.local_url, key, value, api_key, timeout)


@main.group()
def wal() -> None:
    """Inspect or drain the write-ahead log."""


@wal.command("inspect")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options("data_dir", "database_url")
def wal_inspect(settings: Settings, as_json: bool) -> None:
    """Segments, frames, increments and seq range of the WAL in --data-dir; with a database URL
    (flag, environment or file), how many of them the database has applied and how many are
    pending. Reads only: creates, locks and migrates nothing."""
    from incrementer.cli import wal as wal_report

    configured = click.get_current_context().meta[CONFIGURED]
    database_url = settings.database_url if "database_url" in configured else None
    report = asyncio.run(wal_report.inspect(settings.data_dir, database_url))
    if as_json:
        import msgspec

        click.echo(msgspec.json.encode(report.as_json()).decode())
        return
    for line in report.lines():
        click.echo(line)


@wal.command("drain")
@settings_options("data_dir", "database_url")
def wal_drain(settings: Settings) -> None:
    """Apply what a stopped instance's WAL in --data-dir holds (its own and its worker-N dirs'),
    exactly once, and mark it retired. Refused while a live process holds the data dir or one of
    its worker dirs; safe to run twice: the second run finds nothing after the applied seq."""
    from incrementer.node import retire as retiring

    if not settings.data_dir.is_dir():
        raise click.UsageError(f"no data dir at {settings.data_dir}")
    try:
        drained = asyncio.run(retiring.drain_data_dir(settings.data_dir, settings.database_url))
    except RUNTIME_ERRORS as exc:
        raise click.ClickException(f"cannot drain {settings.data_dir}: {exc}") from None
    for node in drained:
        click.echo(node.describe())


@main.group()
def keys() -> None:
    """Create, list, rotate and revoke API keys (stored hashed in the service's database)."""


rate_option = click.option(
    "--rate", type=float, help="Requests per second for this key (default: --rate-limit)."
)
burst_option = click.option(
    "--burst", type=int, help="Bucket size for this key (default: --rate-burst)."
)


@keys.command("create")
@click.argument("name")
@rate_option
@burst_option
@settings_options("database_url")
def keys_create(name: str, rate: float | None, burst: int | None, settings: Settings) -> None:
    """Create a key and print it once: only its hash is stored. A name can hold one unrevoked
    key; the name of a revoked key can be used again."""
    from incrementer.auth import admin as key_admin

    key = asyncio.run(key_admin.create(settings.database_url, name, rate, burst))
    click.echo(key)
    click.echo(f"created API key {name!r}; it is shown only now, store it safely", err=True)


@keys.command("rotate")
@click.argument("name")
@click.option(
    "--grace",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds the old key keeps working, for clients to switch to the new one.",
)
@rate_option
@burst_option
@settings_options("database_url")
def keys_rotate(
    name: str, grace: float, rate: float | None, burst: int | None, settings: Settings
) -> None:
    """Issue a new key for NAME and print it once; the old key is revoked after --grace seconds
    (every instance stops taking it within --auth-refresh after that). The new key keeps the
    old one's limits unless --rate or --burst are given."""
    from incrementer.auth import admin as key_admin

    key = asyncio.run(key_admin.rotate(settings.database_url, name, grace, rate, burst))
    click.echo(key)
    when = f"in {grace:g} s" if grace else "now"
    click.echo(
        f"rotated API key {name!r}: the new key is shown only now; the old one is revoked {when}",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options("database_url")
def keys_list(settings: Settings, as_json: bool) -> None:
    """List keys (names, ids, state, limits, dates; never secrets), revoked ones too. Reads
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


@main.command()
@click.argument("url", required=False)
@click.option(
    "--api-key",
    envvar=ENV_PREFIX + "API_KEY",
    help="Key for /metrics when the server requires one. [env: INCREMENTER_API_KEY]",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds."
)
@click.option("--once", is_flag=True, help="Print one interval's figures and exit.")
@settings_options("host", "port")
def top(
    url: str | None, api_key: str | None, interval: float, once: bool, settings: Settings
) -> None:
    """Live figures of a running server, read from URL/metrics: by default the server that
    --host and --port (or their variables, or --config) describe. Needs `incrementer[top]`."""
    from incrementer.cli.top import TopError, run

    try:
        run(url or settings.local_url, api_key, interval, once)
    except TopError as exc:
        raise click.ClickException(f"top: {exc}") from None
