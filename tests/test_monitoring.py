"""The monitoring kit is code: the alerting rules pass their promtool unit tests, the scrape config
and every dashboard query are valid, and every metric the rules, the dashboard, the status page
and `incrementer top` name is one a live server exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable
from pathlib import Path

import httpx
import yaml
from fleet import one_per_worker, spawn_group, worker_pids
from prometheus_client.parser import text_string_to_metric_families
from support import run_service, serve_args, settings_for, skip_or_fail, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "incrementer.json"
STATUS_PAGE = ROOT / "src" / "incrementer" / "api" / "status.html"
TOP = ROOT / "src" / "incrementer" / "cli" / "top.py"

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}
# The service's metrics, and prometheus-client's process collector's (`up` is Prometheus's own).
SELECTOR = re.compile(r"\b((?:incrementer|process)_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"')
# Grafana's variables, given values a query can be checked with.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        skip_or_fail("promtool is not installed (Debian: apt-get install -y prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- the alerting rules ------------------------------------------------------------------------


def test_alert_rules_pass_their_unit_tests() -> None:
    """alerts.yml is valid and each alert fires where alerts.test.yml says, and only there."""
    checked = promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for group in _rules()["groups"] for rule in group["rules"]}
    assert names == {
        "IncrementerDown",
        "IncrementerNotReady",
        "IncrementerPersistenceLagHigh",
        "IncrementerFlushFailing",
        "IncrementerShedding",
        "IncrementerRateLimited",
        "IncrementerWalFailing",
        "IncrementerCounterOverflow",
        "IncrementerWorkerRestarting",
    }
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    tested_names = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested_names == names


def test_rule_tests_catch_a_loosened_threshold(tmp_path: Path) -> None:
    """The unit tests bite: with the lag alert's bound moved from 5 s to 50 s, they fail."""
    shutil.copy(PROMETHEUS / "alerts.test.yml", tmp_path)
    rules = (PROMETHEUS / "alerts.yml").read_text()
    loosened = rules.replace(
        "incrementer_oldest_pending_seconds > 5", "incrementer_oldest_pending_seconds > 50"
    )
    assert loosened != rules
    (tmp_path / "alerts.yml").write_text(loosened)
    tested = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "IncrementerPersistenceLagHigh" in tested.stdout + tested.stderr


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    """The example prometheus.yml passes `promtool check config`, with its rules and key file."""
    key_file = tmp_path / "incrementer.key"
    key_file.write_text("ik_000000000000.example\n")
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert "/etc/prometheus/incrementer.key" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/incrementer.key", str(key_file))
    )
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path)
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the dashboard -----------------------------------------------------------------------------


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query parses as PromQL (promtool checks them as recording rules, with Grafana's
    variables given values), and an invalid one would be caught."""
    queries = _dashboard_queries()
    assert len(queries) >= 20

    def check(exprs: list[str]) -> subprocess.CompletedProcess[str]:
        rules = []
        for i, expr in enumerate(exprs):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        path = tmp_path / "dashboard-rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        return promtool("check", "rules", str(path))

    checked = check(queries)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = check([*queries, "sum(rate(incrementer_flushes_total[5m])"])
    assert broken.returncode != 0


def test_dashboard_panels_are_laid_out_and_use_the_chosen_datasource() -> None:
    """Panel ids are unique, panels sit inside the 24-column grid without overlapping, and every
    query uses the dashboard's Prometheus variable and instance filter."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
    titles = " ".join(panel["title"] for panel in panels).lower()
    for topic in ("requests/s", "accepted vs rejected", "lag", "pending keys", "flush duration",
                  "keys per flush", "wal", "not 2xx"):  # fmt: skip
        assert topic in titles, topic


# --- every name used exists --------------------------------------------------------------------


Exported = dict[str, set[str]]
"""Sample name (`incrementer_flush_keys_bucket`) -> the label names seen on it."""


def unknown_names(text: str, exported: Exported, families: set[str] = frozenset()) -> list[str]:
    """Metric names in `text` (and the labels its selectors match on) that `exported` lacks.
    `families`: base names also allowed, for code that adds `_count`/`_sum` itself."""
    problems = []
    for match in SELECTOR.finditer(text):
        name, selector = match.group(1), match.group(2) or ""
        if name not in exported:
            if name not in families:
                problems.append(name)
            continue
        for label in MATCHER.findall(selector):
            if label not in exported[name] | TARGET_LABELS:
                problems.append(f"{name}{{{label}}}")
    return problems


def _exported(metrics_text: str) -> tuple[Exported, set[str]]:
    exported: Exported = {}
    histograms = set()
    for family in text_string_to_metric_families(metrics_text):
        if family.type == "histogram":
            histograms.add(family.name)
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported, histograms


async def test_every_metric_name_used_exists_on_a_live_server(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Scraped from live servers after some traffic, one process and a --workers group (which adds
    its own metrics), /metrics has every metric (and every label matched on) that the alerting
    rules, the dashboard, the status page and top use."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        assert (await client.post("/increment", json={"key": "k", "value": 1})).status_code == 202
        assert (await client.post("/increment", json={"key": "k", "value": 0})).status_code == 400
        await wait_until(lambda: svc.metrics.flushes > 0)
        exported, histograms = _exported((await client.get("/metrics")).text)
    args = ["--database-url", sqlite_url, "--data-dir", str(tmp_path / "group")]
    group = await asyncio.to_thread(spawn_group, args, 2)
    try:
        async with httpx.AsyncClient(base_url=group.url) as client:
            in_group, _ = _exported((await client.get("/metrics")).text)
    finally:
        group.stop_cleanly()
    assert "incrementer_workers" in in_group and "incrementer_workers" not in exported
    for name, labels in in_group.items():
        exported.setdefault(name, set()).update(labels)
    rules = (PROMETHEUS / "alerts.yml").read_text()
    problems = {
        "alerts.yml": unknown_names(rules, exported),
        "alerts.test.yml": unknown_names((PROMETHEUS / "alerts.test.yml").read_text(), exported),
        "incrementer.json": unknown_names(DASHBOARD.read_text(), exported),
        "status.html": unknown_names(STATUS_PAGE.read_text(), exported, histograms),
        "top.py": unknown_names(TOP.read_text(), exported, histograms),
    }
    assert all(not found for found in problems.values()), problems
    used = {name for name, _ in SELECTOR.findall(rules + DASHBOARD.read_text())}
    assert len(used) >= 15


async def test_the_ready_gauge_of_a_group_is_the_groups_verdict(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Under --workers, incrementer_ready (what IncrementerNotReady and the dashboard read) is 1
    for a ready group, not one per worker, and 0 while any worker is unresponsive (frozen with
    SIGSTOP), as /readyz says, whichever worker answers the scrape."""
    args = serve_args(tmp_path, sqlite_url)
    group = await asyncio.to_thread(spawn_group, args, 2)
    frozen = worker_pids(group)[1]
    try:
        conns = await one_per_worker(group.url, 2)

        async def ready_gauge() -> float:
            metrics = await conns[0].request("GET", "/metrics")
            found = re.search(r"(?m)^incrementer_ready (\S+)$", metrics.body.decode())
            assert found is not None
            return float(found.group(1))

        await wait_until(lambda: _equals(ready_gauge(), 1.0))
        os.kill(frozen, signal.SIGSTOP)
        await wait_until(lambda: _equals(ready_gauge(), 0.0), timeout=20)
        assert (await conns[0].request("GET", "/readyz")).status == 503
        os.kill(frozen, signal.SIGCONT)
        await wait_until(lambda: _equals(ready_gauge(), 1.0), timeout=20)
        for conn in conns.values():
            await conn.close()
    finally:
        os.kill(frozen, signal.SIGCONT)
        group.stop_cleanly()


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


def test_the_name_check_catches_a_missing_metric_and_label() -> None:
    """A misspelt metric, a label the metric does not have, and a base name where a sample name is
    needed are all reported; a correct query is not."""
    exported: Exported = {
        "incrementer_http_requests_total": {"route", "status"},
        "incrementer_flush_keys_sum": set(),
        "incrementer_flush_keys_count": set(),
    }
    good = 'sum by (route) (rate(incrementer_http_requests_total{job="incrementer", status="503"}[5m]))'
    assert unknown_names(good, exported) == []
    assert unknown_names("rate(incrementer_http_request_total[5m])", exported) == [
        "incrementer_http_request_total"
    ]
    assert unknown_names('incrementer_http_requests_total{method="GET"}', exported) == [
        "incrementer_http_requests_total{method}"
    ]
    assert unknown_names("incrementer_flush_keys", exported) == ["incrementer_flush_keys"]
    assert unknown_names("incrementer_flush_keys", exported, {"incrementer_flush_keys"}) == []


def _rules() -> dict[str, list[dict[str, list[dict[str, str]]]]]:
    loaded: dict[str, list[dict[str, list[dict[str, str]]]]] = yaml.safe_load(
        (PROMETHEUS / "alerts.yml").read_text()
    )
    return loaded
