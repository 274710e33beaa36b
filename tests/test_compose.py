"""deploy/compose/compose.yaml: valid against the Compose specification's schema (offline, the
copy check-jsonschema ships), read the same by podman-compose, and wired as the runbook says:
two instances each on its own WAL volume, stopped within their drain, nginx with the shipped
config (only its upstream servers replaced), Prometheus with the shipped rules and a scrape
config promtool accepts, Grafana with the shipped dashboard. It is not run here: PostgreSQL,
nginx, Prometheus and Grafana come from registry images, which cannot be pulled on this machine,
and Debian 12's podman 4.3.1 cannot start its dependent services under podman-compose
(docs/operations.md, "Compose")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from support import skip_or_fail

from bench.harness.containers import dockerfile
from incrementer.config import EXIT_GRACE, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE / "compose.yaml"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name
    if not found.exists():
        skip_or_fail(f"{name} is not installed (it is in the test extra)")
    return str(found)


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stack() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def test_the_compose_file_is_valid_against_the_compose_schema(tmp_path: Path) -> None:
    """check-jsonschema's vendored Compose schema accepts the file, and refuses it with a misspelt
    service key (the check can fail)."""
    checked = schema_check(COMPOSE_FILE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace:"))
    refused = schema_check(broken)
    assert refused.returncode == 1 and "stop_grace" in refused.stdout, refused.stdout


def test_podman_compose_reads_every_service() -> None:
    """`podman-compose config` resolves the file (anchors, variables, relative paths) into the
    seven services, the instances with the database URL built from POSTGRES_PASSWORD."""
    done = subprocess.run(
        [tool("podman-compose"), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "s3cret"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert set(resolved) == {
        "postgres",
        "setup",
        "incrementer-1",
        "incrementer-2",
        "nginx",
        "prometheus",
        "grafana",
    }
    url = "postgresql://incrementer:s3cret@postgres:5432/counters"
    for name in ("setup", "incrementer-1", "incrementer-2"):
        assert resolved[name]["environment"]["INCREMENTER_DATABASE_URL"] == url


def test_each_instance_has_its_own_wal_volume_and_drains_before_it_is_killed() -> None:
    """incrementer-1 and -2 mount distinct named volumes on the image's data volume, wait for
    the migration, get a stop grace period above --shutdown-timeout plus the exit grace, and
    leave the per-address connection cap to nginx (every connection comes from it)."""
    services = stack()["services"]
    volume = dockerfile("VOLUME").strip('[]"')
    mounts = []
    for name in ("incrementer-1", "incrementer-2"):
        service = services[name]
        (mount,) = service["volumes"]
        source, target = mount.split(":")
        assert target == volume and source in stack()["volumes"]
        mounts.append(source)
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > Settings().shutdown_timeout + EXIT_GRACE
        assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert service["environment"]["INCREMENTER_MIGRATE"] == "false"
        # behind nginx, one address is every client: the per-address cap is nginx's
        per_ip = int(service["environment"]["INCREMENTER_MAX_CONNECTIONS_PER_IP"])
        assert per_ip == Settings().max_connections
    assert len(set(mounts)) == 2


def mounted(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts from this directory: container path -> the file here."""
    found = {}
    for mount in service.get("volumes", []):
        source, target = mount.split(":")[:2]
        if source.startswith("."):
            path = (COMPOSE / source).resolve()
            assert path.exists(), source
            found[target] = str(path.relative_to(ROOT))
    return found


def test_nginx_prometheus_and_grafana_use_the_shipped_files() -> None:
    """nginx runs deploy/nginx/incrementer.conf with only the upstream's server lines replaced by
    the two instances; Prometheus loads deploy/prometheus/alerts.yml and scrapes both instances
    with the setup service's key; Grafana provisions deploy/grafana/incrementer.json on a
    Prometheus data source."""
    services = stack()["services"]
    nginx = services["nginx"]
    assert mounted(nginx) == {"/deploy/incrementer.conf": "deploy/nginx/incrementer.conf"}
    script = nginx["command"][-1]
    sed = re.fullmatch(r"(sed .*?) /deploy/incrementer.conf > (\S+) && exec nginx .*", script)
    assert sed and sed.group(2).startswith("/etc/nginx/conf.d/"), script
    shipped = (ROOT / "deploy" / "nginx" / "incrementer.conf").read_text()
    made = subprocess.run(
        ["/bin/sh", "-c", sed.group(1).replace("$$", "$")],
        input=shipped,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    servers = re.findall(r"^\s*server (\S+) ", made, re.MULTILINE)
    assert servers == ["incrementer-1:3333", "incrementer-2:3333"]
    unchanged = [line for line in shipped.splitlines() if "server 127.0.0.1:" not in line]
    kept = [line for line in made.splitlines() if not line.startswith("server incrementer-")]
    assert kept == unchanged

    prometheus = services["prometheus"]
    assert mounted(prometheus) == {
        "/etc/prometheus/prometheus.yml": "deploy/compose/prometheus.yml",
        "/etc/prometheus/alerts.yml": "deploy/prometheus/alerts.yml",
    }
    assert "keys:/etc/prometheus/keys:ro" in prometheus["volumes"]
    grafana = services["grafana"]
    assert mounted(grafana)["/var/lib/grafana/dashboards/incrementer.json"] == (
        "deploy/grafana/incrementer.json"
    )
    sources = yaml.safe_load((COMPOSE / "grafana" / "datasources.yaml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "incrementer.json").read_text())
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])


def test_the_compose_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """The stack's prometheus.yml, with the rules and a key file where it names them, passes
    `promtool check config`; it scrapes job="incrementer", which the rules select."""
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (Debian: apt-get install -y prometheus)")
    assert promtool is not None
    key = tmp_path / "prometheus.key"
    key.write_text("ik_000000000000.example\n")
    config = (COMPOSE / "prometheus.yml").read_text()
    assert "/etc/prometheus/keys/prometheus.key" in config and "job_name: incrementer" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/keys/prometheus.key", str(key))
    )
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path)
    checked = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
