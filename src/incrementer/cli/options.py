"""The settings as options: one flag per Settings field, each also an INCREMENTER_* variable,
plus --config for a TOML file. Every command takes the ones it uses through settings_options."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from incrementer.config import (
    AUTH_MODES,
    DURABILITY_MODES,
    ENV_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    STORE_DOWN_MODES,
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
    "max_pending_keys_per_client": (
        "New keys one client (API key name, or client IP with auth off) may make pending "
        "before the next flush cut; past it that client's new keys get 503 + Retry-After while "
        "others' are accepted. Per process; 0 = a quarter of --max-pending-keys."
    ),
    "max_key_bytes": "Longest key accepted, in UTF-8 bytes.",
    "allow_negative": "Accept zero and negative values.",
    "max_body_bytes": "Largest request body accepted (413 above).",
    "max_header_bytes": "Largest request line plus headers accepted (431 above).",
    "max_batch_items": "Most increments in one POST /increments.",
    "max_connections": (
        "Open connections; past it the longest-idle one makes room, else the one sending its "
        "first request the longest, else 503."
    ),
    "max_connections_per_ip": (
        "Open connections from one client address; past it that address's longest-idle (or "
        "longest-unfinished first request) makes room, else 503; 0 = a quarter of "
        "--max-connections (behind a proxy, set it to --max-connections)."
    ),
    "idle_timeout": "Seconds a keep-alive connection may sit idle between requests.",
    "request_timeout": "Seconds to send one whole request, the first from the accept (slowloris).",
    "shutdown_timeout": "Seconds to finish requests and the final flush on SIGTERM.",
    "lag_bound": "Persistence lag above which /readyz answers 503.",
    "database_timeout": (
        "Seconds the database may stay silent (a flush or ping unanswered, a connection "
        "unacknowledged) before /readyz and the log say it is unresponsive and a dead connection "
        "is dropped; a statement is abandoned and retried after 10 times this."
    ),
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
    "rate_limit_store": (
        "redis://[:PASSWORD@]HOST:PORT/DB (or rediss:// for TLS): every instance and worker "
        "shares each rate limit through this Redis; empty = each --workers group shares its "
        "own (through its supervisor), a lone process keeps its own."
    ),
    "rate_limit_store_down": (
        "While the rate-limit store is unreachable: open (each process allows its share of "
        "every limit) or closed (limited requests get 429)."
    ),
    "rate_limit_sync": (
        "Seconds between a process's exchanges with the shared rate-limit store; a limit may "
        "be overshot by about one interval of traffic."
    ),
    "idempotency_window": (
        "Seconds an Idempotency-Key is remembered (a retry within it is applied once); keys "
        "older than this are swept from the database."
    ),
    "idempotency_keys_per_client": (
        "New Idempotency-Keys one API key (one client IP with auth off) may send per "
        "--idempotency-window; more get 429 (a retry under a key already sent is still "
        "answered). Each --workers worker allows its share. 0 = no limit."
    ),
    "log_format": "text or json.",
    "log_level": "debug, info, warning or error.",
    "workers": (
        "Server processes sharing --host:--port, each with its own data dir (--data-dir/worker-N) "
        "under one supervisor; auto = one per usable CPU; 1 = this process serves alone."
    ),
    "buckets": (
        "Also count per time bucket: any of minute,hour,day (UTC); empty = totals only. "
        "Read with GET /counters/{key}/series."
    ),
    "bucket_retention": (
        "How long each granularity's buckets are kept, e.g. minute=2d,hour=90d,day=5y "
        "(units s, m, h, d, w, y; forever = never swept); one not named keeps its default."
    ),
    "bucket_past": (
        'Seconds into the past an increment\'s "at" may lie (older: 422); at most 60 s ahead '
        "of this server's clock."
    ),
    "max_read_keys": "Most keys in one read: keys of GET /counters?key=..., a page, a top N.",
    "max_series_points": "Most buckets (points) one series or windowed read may span.",
    "worker_timeout": (
        "Seconds a --workers worker's event loop may go without a heartbeat before the "
        "supervisor kills and replaces it."
    ),
}
# The same settings as commands that talk to a running server read them: where it listens.
CONNECT_HELP = {
    "host": "Address of the server to talk to (as its --host; a wildcard bind is reached on "
    "loopback).",
    "port": "Port of the server to talk to (as its --port).",
}
CHOICES = {
    "auth": AUTH_MODES,
    "rate_limit_store_down": STORE_DOWN_MODES,
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


def settings_options(
    *names: str, connect: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config, plus one flag per named Settings field (every field when none are named), each
    also read from INCREMENTER_<NAME>. The command receives `settings`, built and validated from
    flags > environment > file > defaults; a bad value is a usage error naming where it was set.
    Defaults live in Settings, so the file can sit between the environment and them. connect:
    the command talks to a running server, so --host and --port say where it is, not what to
    bind."""
    help_texts = {**HELP, **CONNECT_HELP} if connect else HELP
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
            option = _setting_option(field.name, str(field.type), field.default, help_texts)
            command = option(command)
        return click.option(
            "--config",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar=ENV_PREFIX + "CONFIG",
            help=f"TOML file with settings; flags and environment variables win. "
            f"[env: {ENV_PREFIX}CONFIG]",
        )(command)

    return decorate


def _setting_option(
    name: str, kind: str, default: Any, help_texts: dict[str, str]
) -> Callable[..., Any]:
    flag = name.replace("_", "-")
    envvar = ENV_PREFIX + name.upper()
    help_text = f"{help_texts[name]} [default: {default}] [env: {envvar}]"
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
    by cli/errors.py as a usage error."""
    return Settings.build(values, config, sources)
