"""One typed settings object, built from flags > env INCREMENTER_* > TOML file > defaults.

Every option is a field of Settings; the CLI builds its flags from the same fields, so a flag, its
environment variable and its TOML key can never drift apart. An error names the option, the bad
value and where the value came from (the flag, the variable, or the file and its key).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from incrementer import periods
from incrementer.urls import check_redis_url, parse_database_url, redact_url

Durability = Literal["memory", "wal", "wal-fsync"]
DURABILITY_MODES: tuple[Durability, ...] = ("memory", "wal", "wal-fsync")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_MODES = ("auto", "required", "off")
STORE_DOWN_MODES = ("open", "closed")
ENV_PREFIX = "INCREMENTER_"
# Each worker is a whole server with its own event loop: past a few per core they only take turns.
WORKERS_PER_CPU_MAX = 4
# After the shutdown deadline (--shutdown-timeout) the drain gives up on whatever still hangs;
# this long after it, the process exits even if giving up hangs too (a thread stuck in a syscall
# on a frozen disk). A supervisor waits this long, and a little more, before it kills a worker.
EXIT_GRACE = 3.0


class ConfigError(ValueError):
    """A setting has a bad value; the message names the option and the value, and where the
    value came from once Settings.build knows it."""

    def __init__(self, head: str, why: str = "", option: str | None = None) -> None:
        super().__init__(f"{head}: {why}" if why else head)
        self.head = head
        self.why = why
        self.option = option
        """The Settings field at fault, if one is."""

    def came_from(self, source: str) -> ConfigError:
        """The same error, saying where the bad value was set."""
        return ConfigError(f"{self.head} ({source})", self.why, self.option)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3333
    database_url: str = "sqlite:///incrementer.db"
    migrate: bool = True
    durability: Durability = "wal"
    data_dir: Path = Path("incrementer-data")
    fsync_interval: float = 1.0
    flush_interval: float = 0.1
    flush_interval_max: float = 0.5
    flush_max_keys: int = 20_000
    max_pending_keys: int = 1_000_000
    max_pending_keys_per_client: int = 0
    max_key_bytes: int = 256
    allow_negative: bool = False
    max_body_bytes: int = 1_048_576
    max_header_bytes: int = 8192
    max_batch_items: int = 10_000
    max_connections: int = 10_000
    max_connections_per_ip: int = 0  # 0: a quarter of max_connections (connections_per_ip)
    idle_timeout: float = 60.0
    request_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    lag_bound: float = 10.0
    database_timeout: float = 3.0
    auth: str = "auto"
    insecure_no_auth: bool = False
    auth_refresh: float = 10.0
    auth_lookup_rate: float = 20.0
    rate_limit: float = 0.0
    rate_burst: int = 0
    rate_limit_store: str = ""
    rate_limit_store_down: str = "open"
    rate_limit_sync: float = 0.05
    idempotency_window: float = 86_400.0
    idempotency_keys_per_client: int = 1_000_000
    log_format: str = "text"
    log_level: str = "info"
    workers: int = 1
    worker_timeout: float = 30.0
    # Counting per period (time buckets) and the read side.
    buckets: str = ""
    bucket_retention: str = "minute=2d,hour=90d,day=5y"
    bucket_past: float = 3600.0
    max_read_keys: int = 1000
    max_series_points: int = 2000

    def __post_init__(self) -> None:
        _check(self.port, "port", 0 <= self.port <= 65535, "must be between 0 and 65535")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            _check(
                self.host,
                "host",
                self.host == "localhost" or "." in self.host or self.host.isalnum(),
                "must be an IP address or host name",
            )
        try:
            parse_database_url(self.database_url)  # the same rule open_store applies later
        except ValueError as exc:
            shown = redact_url(self.database_url)
            raise ConfigError(f"invalid database-url={shown!r}", str(exc), "database_url") from None
        _check(
            self.durability,
            "durability",
            self.durability in DURABILITY_MODES,
            f"must be one of {', '.join(DURABILITY_MODES)}",
        )
        for name in (
            "fsync_interval",
            "flush_interval",
            "flush_interval_max",
            "idle_timeout",
            "request_timeout",
            "shutdown_timeout",
            "lag_bound",
            "idempotency_window",
            "database_timeout",
        ):
            value = getattr(self, name)
            _check(value, name, value > 0, "must be a positive number of seconds")
        for name in ("flush_interval", "flush_interval_max"):
            value = getattr(self, name)
            _check(
                value,
                name,
                value < self.lag_bound,
                f"must be below the lag bound ({self.lag_bound} s)",
            )
        for name in (
            "flush_max_keys",
            "max_pending_keys",
            "max_body_bytes",
            "max_header_bytes",
            "max_batch_items",
            "max_connections",
        ):
            value = getattr(self, name)
            _check(value, name, value >= 1, "must be at least 1")
        _check(
            self.max_connections_per_ip,
            "max_connections_per_ip",
            self.max_connections_per_ip >= 0,
            "must be >= 0 (0 = a quarter of max-connections)",
        )
        _check(
            self.max_key_bytes,
            "max_key_bytes",
            1 <= self.max_key_bytes <= 65535,
            "must be between 1 and 65535",
        )
        _check(
            self.max_pending_keys,
            "max_pending_keys",
            self.max_pending_keys >= 2 * self.flush_max_keys,
            f"must be at least twice flush-max-keys ({self.flush_max_keys}): while a batch of "
            "up to flush-max-keys keys is being flushed, the buffer needs as much room again, "
            "or new keys are refused with a healthy database",
        )
        _check(
            self.max_pending_keys_per_client,
            "max_pending_keys_per_client",
            0 <= self.max_pending_keys_per_client <= self.max_pending_keys,
            f"must be between 0 (a quarter of max-pending-keys) and max-pending-keys "
            f"({self.max_pending_keys})",
        )
        _check(
            self.auth, "auth", self.auth in AUTH_MODES, f"must be one of {', '.join(AUTH_MODES)}"
        )
        _check(
            self.host,
            "host",
            self.auth != "off" or self.loopback or self.insecure_no_auth,
            "--auth off would let anyone on the network change any counter; bind a loopback "
            "address, use --auth required, or pass --insecure-no-auth if something in front "
            "of this service already authenticates",
        )
        _check(self.auth_refresh, "auth_refresh", self.auth_refresh > 0, "must be positive")
        _check(
            self.auth_lookup_rate,
            "auth_lookup_rate",
            self.auth_lookup_rate >= 0,
            "must be >= 0 (0 = new keys work only after the next reload)",
        )
        _check(self.rate_limit, "rate_limit", self.rate_limit >= 0, "must be >= 0 (0 = no limit)")
        _check(self.rate_burst, "rate_burst", self.rate_burst >= 0, "must be >= 0")
        _check(
            self.idempotency_keys_per_client,
            "idempotency_keys_per_client",
            self.idempotency_keys_per_client >= 0,
            "must be >= 0 (0 = no limit)",
        )
        if self.rate_limit_store:
            try:
                check_redis_url(self.rate_limit_store)
            except ValueError as exc:
                shown = redact_url(self.rate_limit_store)
                raise ConfigError(
                    f"invalid rate-limit-store={shown!r}", str(exc), "rate_limit_store"
                ) from None
        _check(
            self.rate_limit_store_down,
            "rate_limit_store_down",
            self.rate_limit_store_down in STORE_DOWN_MODES,
            f"must be one of {', '.join(STORE_DOWN_MODES)}",
        )
        _check(
            self.rate_limit_sync,
            "rate_limit_sync",
            0 < self.rate_limit_sync <= 1,
            "must be a number of seconds above 0 and at most 1 (the overshoot a shared limit "
            "allows grows with it)",
        )
        _check(
            self.worker_timeout,
            "worker_timeout",
            self.worker_timeout > 0,
            "must be a positive number of seconds",
        )
        _check(
            self.log_format,
            "log_format",
            self.log_format in LOG_FORMATS,
            f"must be one of {', '.join(LOG_FORMATS)}",
        )
        _check(
            self.log_level,
            "log_level",
            self.log_level in LOG_LEVELS,
            f"must be one of {', '.join(LOG_LEVELS)}",
        )

        self._check_buckets()

        cpus = usable_cpus()
        _check(self.workers, "workers", self.workers >= 1, "must be at least 1, or auto")
        _check(
            self.workers,
            "workers",
            self.workers <= WORKERS_PER_CPU_MAX * cpus,
            f"far above the {cpus} usable CPUs (at most {WORKERS_PER_CPU_MAX * cpus}): each "
            "worker is a whole server, and beyond the cores they only take turns; auto starts "
            "one per CPU",
        )

    def _check_buckets(self) -> None:
        try:
            granularities = periods.parse_granularities(self.buckets)
        except ValueError as exc:
            raise ConfigError(f"invalid buckets={self.buckets!r}", str(exc), "buckets") from None
        try:
            retention = periods.parse_retention(self.bucket_retention)
        except ValueError as exc:
            raise ConfigError(
                f"invalid bucket-retention={self.bucket_retention!r}", str(exc), "bucket_retention"
            ) from None
        _check(self.bucket_past, "bucket_past", self.bucket_past >= 0, "must be >= 0 seconds")
        for length in granularities:
            kept = retention[length]
            _check(
                self.bucket_retention,
                "bucket_retention",
                kept is None or kept > self.bucket_past + length,
                f"keeps {periods.describe(length)} buckets for {kept} s, not longer than "
                f"--bucket-past ({self.bucket_past:g} s) plus one bucket: an increment accepted "
                'with an "at" could land in a bucket already swept',
            )
        for name in ("max_read_keys", "max_series_points"):
            value = getattr(self, name)
            _check(value, name, value >= 1, "must be at least 1")

    @property
    def granularities(self) -> tuple[int, ...]:
        """The bucket lengths kept (--buckets), in seconds, ascending; () when off."""
        return periods.parse_granularities(self.buckets)

    @property
    def retention(self) -> dict[int, int | None]:
        """Seconds each kept granularity's buckets are kept (None: forever)."""
        retention = periods.parse_retention(self.bucket_retention)
        return {length: retention[length] for length in self.granularities}

    @property
    def connections_per_ip(self) -> int:
        """Open connections one client address may hold: --max-connections-per-ip, else a
        quarter of --max-connections (at least one)."""
        return self.max_connections_per_ip or max(1, self.max_connections // 4)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def local_url(self) -> str:
        """The URL of a server bound to host:port, from the same machine (a wildcard bind
        answers on loopback): where `incrementer top` and `incrementer incr` look by default."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def auth_required(self) -> bool:
        """auto: keys are required unless the service is bound to loopback only."""
        return self.auth == "required" or (self.auth == "auto" and not self.loopback)

    @property
    def client_key_share(self) -> int:
        """New keys one client may make pending between two flush cuts (0 in the option: a
        quarter of --max-pending-keys)."""
        return self.max_pending_keys_per_client or max(1, self.max_pending_keys // 4)

    @property
    def default_burst(self) -> int:
        return self.rate_burst or max(1, int(self.rate_limit))

    @classmethod
    def build(
        cls,
        explicit: dict[str, Any],
        config_file: Path | None = None,
        sources: dict[str, str] | None = None,
    ) -> Settings:
        """Explicit values (flags and env, already resolved by the CLI) override the TOML file.
        sources says where each explicit value came from (`from --port`, `from
        INCREMENTER_PORT`), for the error message; the file's keys are named by build itself."""
        values: dict[str, Any] = {}
        where: dict[str, str] = {}
        if config_file is not None:
            for name, (key, value) in load_toml(config_file).items():
                if name not in FIELD_TYPES:
                    raise ConfigError(
                        f"unknown option {key!r} (in {config_file})", did_you_mean(key), name
                    )
                values[name] = value
                where[name] = f"in {config_file}, key {key}"
        for name, value in explicit.items():
            if value is not None:
                values[name] = value
                where[name] = (sources or {}).get(name, "")
        try:
            return cls(**{k: coerce(k, v) for k, v in values.items()})
        except ConfigError as exc:
            source = where.get(exc.option or "")
            raise (exc.came_from(source) if source else exc) from None


def _check(value: object, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name.replace('_', '-')}={value!r}", why, name)


FIELD_TYPES = {f.name: f.type for f in fields(Settings)}


# What a value of each field type must be, in the words an error says it with.
EXPECTED = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "Path": "a path (a string)",
    "str": "a string",
    "Durability": "a string",
}
_WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")


def coerce(name: str, value: Any) -> Any:
    """Turn a TOML/CLI value into the field's type, with an error naming the option and saying
    what it expected (never Python's own text: `invalid literal for int()`)."""
    kind = FIELD_TYPES.get(name)
    if kind is None:
        raise ConfigError(f"unknown option {name.replace('_', '-')!r}", did_you_mean(name), name)
    if name == "workers":
        return parse_workers(value)
    converted = _converted(str(kind), value)
    if converted is None:
        raise ConfigError(
            f"invalid {name.replace('_', '-')}={value!r}", f"expected {EXPECTED[str(kind)]}", name
        )
    return converted


def _converted(kind: str, value: Any) -> Any:
    """value as kind, or None when it is not one (a bool is never a number, a fraction never a
    whole number, infinity and NaN never a number of seconds)."""
    if isinstance(value, bool) or kind == "bool":
        return value if isinstance(value, bool) and kind == "bool" else None
    if kind == "int":
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, str) and _WHOLE.fullmatch(value) else None
    if kind == "float":
        number: float | None = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return None
        return number if number is not None and math.isfinite(number) else None
    if not isinstance(value, str):
        return None
    return Path(value) if kind == "Path" else value


def did_you_mean(key: str) -> str:
    """The option a misspelt key was probably meant to be, spelt as the key was (dashes or
    underscores); else where the options are listed."""
    dashed = "-" in key
    names = [name.replace("_", "-") if dashed else name for name in FIELD_TYPES]
    close = difflib.get_close_matches(key.lower(), names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return (
        "no such option (settings go at the top level or under [incrementer]; "
        "`incrementer serve -h` lists them)"
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow),
    not every CPU of the machine."""
    return len(os.sched_getaffinity(0)) or 1


def parse_workers(value: object) -> int:
    """`auto` (one per usable CPU) or a whole number; range checks happen in Settings."""
    if value == "auto":
        return usable_cpus()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"invalid workers={value!r}", "expected a whole number or auto", "workers")


def load_toml(path: Path) -> dict[str, tuple[str, Any]]:
    """{field name: (the key as the file spells it, its value)} of the file's settings, read from
    the top level or from an [incrementer] table."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}", str(exc.strerror)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML", str(exc)) from None
    table = raw.get("incrementer", raw)
    return {str(k).replace("-", "_"): (str(k), v) for k, v in table.items()}
