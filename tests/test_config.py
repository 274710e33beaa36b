"""Settings: precedence flag > env > TOML file > default, and errors that name the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import run_cli, spawned

from incrementer.cli import main as cli
from incrementer.cli import options
from incrementer.config import ConfigError, Settings


def resolved(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Run the real `serve` option parsing and capture the Settings it builds."""
    captured: list[Settings] = []
    monkeypatch.setattr(options, "build_settings", _capture(captured))
    result = CliRunner().invoke(cli.main, ["serve", *args], env=env)
    assert captured, result.output
    return captured[0]


def _capture(into: list[Settings]):  # type: ignore[no-untyped-def]
    real = options.build_settings

    def build(
        config: Path | None, values: dict[str, object], sources: dict[str, str] | None = None
    ) -> Settings:
        into.append(real(config, values, sources))
        raise SystemExit(0)

    return build


def test_precedence_flag_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    config = tmp_path / "incrementer.toml"
    config.write_text(
        'port = 4000\nflush_interval = 0.5\nmax-key-bytes = 64\nlog_level = "debug"\n'
    )
    env = {"INCREMENTER_FLUSH_INTERVAL": "0.25", "INCREMENTER_PORT": "4001"}
    settings = resolved(["--config", str(config), "--port", "4002"], env, monkeypatch)
    assert settings.port == 4002  # flag
    assert settings.flush_interval == 0.25  # env over file
    assert settings.max_key_bytes == 64  # file over default
    assert settings.log_level == "debug"
    assert settings.durability == "wal"  # default


def test_bad_values_name_the_option(tmp_path: Path) -> None:
    """Validation errors say which option and which value."""
    with pytest.raises(ConfigError, match=r"invalid port=70000"):
        Settings(port=70000)
    with pytest.raises(ConfigError, match=r"invalid durability='fast'"):
        Settings(durability="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"invalid database-url="):
        Settings(database_url="mysql://x")
    with pytest.raises(ConfigError, match=r"invalid database-url=.*in-memory"):
        Settings(database_url="sqlite:///:memory:")
    with pytest.raises(ConfigError, match=r"invalid database-url=.*names no SQLite file"):
        Settings(database_url="sqlite:///")
    with pytest.raises(ConfigError, match=r"invalid database-url='mysql://u:\*\*\*@h/d'"):
        Settings(database_url="mysql://u:secret@h/d")  # the password is not echoed
    Settings(database_url="POSTGRES://h/db")  # scheme case as open_store reads it
    with pytest.raises(ConfigError, match=r"invalid flush-interval=.*lag bound"):
        Settings(flush_interval=20)
    with pytest.raises(ConfigError, match=r"invalid flush-interval-max=.*lag bound"):
        Settings(lag_bound=0.4)  # the default --flush-interval-max (0.5 s) would exceed it
    Settings(lag_bound=0.4, flush_interval_max=0.3)
    with pytest.raises(ConfigError, match=r"invalid max-pending-keys=1000: .*twice flush-max-keys"):
        Settings(max_pending_keys=1000, flush_max_keys=1000)  # refused new keys when healthy
    with pytest.raises(ConfigError, match=r"invalid max-pending-keys=1999"):
        Settings(max_pending_keys=1999, flush_max_keys=1000)
    Settings(max_pending_keys=2000, flush_max_keys=1000)
    with pytest.raises(ConfigError, match=r"invalid max-pending-keys-per-client=2001: .*2000"):
        Settings(max_pending_keys=2000, flush_max_keys=1000, max_pending_keys_per_client=2001)
    with pytest.raises(ConfigError, match=r"invalid max-pending-keys-per-client=-1"):
        Settings(max_pending_keys_per_client=-1)
    assert Settings(max_pending_keys=2000, flush_max_keys=1000).client_key_share == 500
    assert Settings(max_pending_keys_per_client=7).client_key_share == 7
    with pytest.raises(ConfigError, match=r"unknown option 'colour'"):
        Settings.build({}, _toml(tmp_path, "colour = 1\n"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("prot = 3400\n", "unknown option 'prot' (in {file}): did you mean 'port'?"),
        ("flush_intervall = 1\n", "did you mean 'flush_interval'?"),
        ("[incrementer]\nmax-key-byte = 9\n", "did you mean 'max-key-bytes'?"),
        ("[server]\nport = 1\n", "unknown option 'server' (in {file}): no such option"),
        ('port = "abc"\n', "invalid port='abc' (in {file}, key port): expected a whole number"),
        ("port = 3.5\n", "invalid port=3.5 (in {file}, key port): expected a whole number"),
        ('flush_interval = "fast"\n', "invalid flush-interval='fast' (in {file}, key"),
        ('flush_interval = "inf"\n', "expected a number"),
        ("data_dir = 1\n", "invalid data-dir=1 (in {file}, key data_dir): expected a path"),
        ('migrate = "yes"\n', "expected true or false"),
        ("max_body_bytes = true\n", "expected a whole number"),
    ],
)
def test_config_file_mistakes_are_said_in_our_words(tmp_path: Path, text: str, says: str) -> None:
    """A misspelt key gets "did you mean ...?"; a bad value says what was expected, never
    Python's own text (`invalid literal for int()`), and a fraction is not a whole number."""
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        Settings.build({}, path)
    assert says.format(file=path) in str(raised.value)
    assert "literal" not in str(raised.value) and "convert" not in str(raised.value)


def test_whole_numbers_may_be_written_as_text(tmp_path: Path) -> None:
    """A whole number as text (`port = " 4000 "`) is read as one."""
    assert Settings.build({}, _toml(tmp_path, 'port = " 4000 "\n')).port == 4000


def _toml(directory: Path, text: str) -> Path:
    path = directory / "bad.toml"
    path.write_text(text)
    return path


def test_cli_reports_bad_config_as_usage_error(tmp_path: Path) -> None:
    """A bad flag value exits 2 with the option named, before anything starts."""
    proc = run_cli("serve", "--max-key-bytes", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "max-key-bytes=0" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [")
    proc = run_cli("serve", "--config", str(broken), cwd=tmp_path)
    assert proc.returncode == 2
    assert "not valid TOML" in proc.stderr


def test_json_logs_and_default_sqlite_quickstart(tmp_path: Path) -> None:
    """`incrementer serve` with no options works from an empty directory (embedded SQLite),
    and --log-format json emits one JSON object per line."""
    with spawned(["--log-format", "json"], cwd=tmp_path) as server:
        server.stop_cleanly()
    lines = [json.loads(line) for line in server.read_log().splitlines() if line.strip()]
    assert any("listening on http://127.0.0.1:" in line["message"] for line in lines)
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert (tmp_path / "incrementer.db").exists()
    assert (tmp_path / "incrementer-data" / "node_id").exists()


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("rate_limit_store", "redis://:pw@/0", "names no host"),
        ("rate_limit_store", "memcached://h:1", "unsupported rate-limit store URL"),
        ("rate_limit_store", "redis://h:99999/0", "the port must be a number"),
        ("rate_limit_store_down", "maybe", "must be one of open, closed"),
        ("rate_limit_sync", 0.0, "above 0 and at most 1"),
        ("rate_limit_sync", 5.0, "above 0 and at most 1"),
        ("worker_timeout", 0.0, "must be a positive number of seconds"),
    ],
)
def test_the_shared_limits_and_the_watchdog_refuse_bad_values(
    field: str, value: object, why: str
) -> None:
    """The options of the shared rate limits and of the watchdog refuse a bad value naming the
    option and the value (a store URL's password as ***)."""
    with pytest.raises(ConfigError, match=f"invalid {field.replace('_', '-')}=") as caught:
        Settings(**{field: value})
    assert why in str(caught.value) and "pw" not in str(caught.value)
    Settings(rate_limit_store="rediss://user:pw@cache.internal:6380/3", worker_timeout=0.5)


@pytest.mark.parametrize(
    ("overrides", "named", "why"),
    [
        ({"buckets": "minute,week"}, "buckets='minute,week'", "unknown granularity 'week'"),
        ({"buckets": "hour,hour"}, "buckets='hour,hour'", "named twice"),
        ({"bucket_retention": "minute=2"}, "bucket-retention='minute=2'", "is not a duration"),
        ({"bucket_retention": "minute=0d"}, "bucket-retention='minute=0d'", "is not a duration"),
        ({"bucket_retention": "second=1d"}, "bucket-retention='second=1d'", "GRANULARITY=DURATION"),
        (
            {"buckets": "minute", "bucket_retention": "minute=30m"},
            "bucket-retention='minute=30m'",
            "not longer than --bucket-past",
        ),
        ({"bucket_past": -1.0}, "bucket-past=-1.0", "must be >= 0"),
        ({"max_read_keys": 0}, "max-read-keys=0", "at least 1"),
        ({"max_series_points": 0}, "max-series-points=0", "at least 1"),
    ],
)
def test_bucket_settings_are_checked_naming_the_option(
    overrides: dict[str, object], named: str, why: str
) -> None:
    """Time bucket and read settings refuse bad values with an error naming the option, the
    value and what is wrong."""
    with pytest.raises(ConfigError) as refused:
        Settings(**overrides)  # type: ignore[arg-type]
    assert named in str(refused.value) and why in str(refused.value)


def test_bucket_settings_read_as_lengths_and_retention() -> None:
    """--buckets in any order gives the lengths ascending; a retention names only the kept
    granularities, defaults for those not named, forever as None."""
    settings = Settings(buckets="day, minute", bucket_retention="day=forever,minute=36h")
    assert settings.granularities == (60, 86400)
    assert settings.retention == {60: 36 * 3600, 86400: None}
    assert Settings().granularities == () and Settings().retention == {}
    assert Settings(buckets="hour").retention == {3600: 90 * 86400}
