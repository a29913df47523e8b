"""cluster/: the deployment files parse, pass Ray's own checks, and match what qwen-batch asks of a cluster.

- ray-cluster.yaml goes through Ray's `prepare_config` + `validate_config` (what `ray up` runs before it
  talks to a cloud), and a GPU node type must be able to hold one qwen-image-df11 worker.
- The KubeRay manifests have the kinds/API versions KubeRay serves, a GPU worker group with one
  `nvidia.com/gpu` and enough memory per pod, and entrypoints that are `qwen-batch submit`.
- GPU workers scale from zero everywhere (qwen-batch's pending workers are the autoscaler's demand), and a
  KubeRay pod being deleted drains its Ray node before it is killed.
- The Grafana dashboard only queries metric names that Ray 2.60 really exports for our metrics (the naming
  rule is checked against the installed Ray's exporter, in a subprocess) or Ray's node metrics, with labels
  those metrics carry, and every metric of ours appears in some panel.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qwen_worker.presets import get_preset

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
GiB = 1024**3

# --------------------------------------------------------------------------------------------------------
# Our metrics (ray.util.metrics names and tag keys) and the Prometheus names Ray exports for them.
# --------------------------------------------------------------------------------------------------------
OUR_METRICS = {
    "qwen_batch_rows_rendered": ("counter", {"job_id", "worker"}),
    "qwen_batch_rows_failed": ("counter", {"job_id", "worker"}),
    "qwen_batch_rows_skipped": ("counter", {"job_id"}),
    "qwen_batch_render_seconds": ("histogram", {"job_id", "worker"}),
    "qwen_batch_upload_seconds": ("histogram", {"job_id", "worker"}),
    "qwen_batch_rows_in_flight": ("gauge", {"job_id"}),
    "qwen_batch_upload_retries": ("counter", {"job_id", "worker"}),
}

# Ray 2.60 exports through OpenTelemetry's Prometheus exporter (ray/_private/telemetry/
# open_telemetry_metric_recorder.py): names get the `ray_` namespace, counters the `_total` suffix (no bare
# gauge copy any more), histograms `_bucket`/`_sum`/`_count`, and unit "1" adds no unit suffix.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names(name: str, kind: str) -> list[str]:
    return [f"ray_{name}{suffix}" for suffix in SUFFIXES[kind]]


# Exported name -> (kind of sample, labels it carries).
OUR_EXPORTED: dict[str, tuple[str, set[str]]] = {}
for _name, (_kind, _tags) in OUR_METRICS.items():
    for _exported in exported_names(_name, _kind):
        _sample_kind = "bucket" if _exported.endswith("_bucket") else _kind
        OUR_EXPORTED[_exported] = (_sample_kind, _tags | ({"le"} if _sample_kind == "bucket" else set()))


def test_export_naming_rule_matches_the_installed_ray():
    """Drive the installed Ray's own metric recorder (the one the dashboard agent serves on
    --metrics-export-port) with one metric of each kind and read the Prometheus exposition it produces."""
    script = textwrap.dedent(
        """
        import json
        from prometheus_client import REGISTRY
        from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder

        recorder = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=600)
        recorder.register_counter_metric("probe_counter", "")
        recorder.set_metric_value("probe_counter", {"job_id": "j"}, 2.0)
        recorder.register_gauge_metric("probe_gauge", "")
        recorder.set_metric_value("probe_gauge", {"job_id": "j"}, 1.0)
        recorder.register_histogram_metric("probe_histogram", "", [1.0, 10.0])
        recorder.record_histogram_aggregated_batch(
            "probe_histogram", [{"tags": {"job_id": "j"}, "bucket_counts": [1, 1, 0]}]
        )
        names = sorted({s.name for family in REGISTRY.collect() for s in family.samples if "probe" in s.name})
        print(json.dumps(names))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = set(json.loads(result.stdout.strip().splitlines()[-1]))
    expected = {
        name
        for probe, kind in [("probe_counter", "counter"), ("probe_gauge", "gauge"), ("probe_histogram", "histogram")]
        for name in exported_names(probe, kind)
    }
    assert seen == expected


# --------------------------------------------------------------------------------------------------------
# Ray's own node metrics (reporter agent), with the labels each carries.
# --------------------------------------------------------------------------------------------------------
def ray_node_metrics() -> dict[str, set[str]]:
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    return {
        f"ray_{name}": {str(column) for column in gauge.view.columns}
        for name, gauge in METRICS_GAUGES.items()
        if name.startswith("node_")
    }


def test_ray_node_metric_names_used_by_the_dashboard_exist():
    node = ray_node_metrics()
    for name in ("ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available", "ray_node_mem_used"):
        assert name in node
    assert {"ip", "GpuIndex", "GpuDeviceName"} <= node["ray_node_gram_used"]


# --------------------------------------------------------------------------------------------------------
# A small PromQL reader: enough to list the metric selectors, their label matchers and groupings.
# --------------------------------------------------------------------------------------------------------
PROMQL_FUNCTIONS = {
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "rate", "irate", "increase", "histogram_quantile",
    "max_over_time", "min_over_time", "avg_over_time", "clamp_min", "clamp_max", "label_values",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
RANGE_NEEDED = {"counter", "bucket", "histogram"}  # rate()/increase() material: never read as an instant value


class PromQLError(ValueError):
    pass


def parse_promql(expr: str) -> tuple[list[tuple[str, set[str], bool]], set[str]]:
    """([(metric, matcher labels, has range)], grouping labels) of one expression; PromQLError for names
    that are neither metrics nor known functions, and for selectors without a metric name."""
    if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
        raise PromQLError(f"unbalanced brackets in: {expr}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    grouping: set[str] = set()
    for match in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w$])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)
    selectors = []
    pattern = re.compile(r"(\$?[A-Za-z_:][A-Za-z0-9_:]*)?\s*(\{[^}]*\})?\s*(\[[^\]]*\])?\s*(\()?")
    for match in pattern.finditer(text):
        name, matchers, range_, call = match.groups()
        if not (name or matchers):
            continue
        if name and name.startswith("$"):
            continue  # a Grafana variable such as $__range inside a range
        if call and not matchers and not range_:
            if name not in PROMQL_FUNCTIONS:
                raise PromQLError(f"unknown function {name!r} in: {expr}")
            continue
        if name in PROMQL_KEYWORDS:
            continue
        if not name:
            raise PromQLError(f"selector without a metric name in: {expr}")
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        selectors.append((name, labels, bool(range_)))
    return selectors, grouping


def check_expr(expr: str, known: dict[str, tuple[str, set[str]]], *, series_only: bool = False) -> list[str]:
    """The exported metric names `expr` reads; PromQLError if it reads a name we do not export, filters or
    groups by a label its metrics do not carry, or reads a counter/bucket without a range (unless
    `series_only`: a series selector that only lists label values)."""
    selectors, grouping = parse_promql(expr)
    if not selectors:
        raise PromQLError(f"no metric in: {expr}")
    carried: set[str] = set()
    for name, labels, has_range in selectors:
        if name not in known:
            raise PromQLError(f"unknown metric {name!r} in: {expr}")
        kind, metric_labels = known[name]
        if not labels <= metric_labels:
            raise PromQLError(f"{name} has no label(s) {sorted(labels - metric_labels)} in: {expr}")
        if kind in RANGE_NEEDED and not has_range and not series_only:
            raise PromQLError(f"{name} is a {kind}: read it with rate()/increase() over a range in: {expr}")
        carried |= metric_labels
    if not grouping <= carried:
        raise PromQLError(f"grouping by {sorted(grouping - carried)} that no metric carries in: {expr}")
    if any(name.endswith("_bucket") for name, _, _ in selectors) and (
        "histogram_quantile" not in expr or "le" not in grouping
    ):
        raise PromQLError(f"buckets must feed histogram_quantile(... by (le ...)) in: {expr}")
    return [name for name, _, _ in selectors]


def check_label_values(query: str, known: dict[str, tuple[str, set[str]]]) -> str:
    """A Grafana variable query `label_values(<series selector>, <label>)`: the metric it reads."""
    match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\s*\)", query.strip())
    if not match:
        raise PromQLError(f"not a label_values(<selector>, <label>) query: {query}")
    (name,) = check_expr(match.group(1), known, series_only=True)
    if match.group(2) not in known[name][1]:
        raise PromQLError(f"{name} has no label {match.group(2)!r} in: {query}")
    return name


@pytest.fixture(scope="module")
def known_metrics() -> dict[str, tuple[str, set[str]]]:
    known = dict(OUR_EXPORTED)
    known.update({name: ("gauge", labels) for name, labels in ray_node_metrics().items()})
    return known


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ('sum(rate(ray_qwen_batch_rows_rendered{job_id=~"$job_id"}[5m]))', r"unknown metric 'ray_qwen_batch_rows_rendered'"),
        ("sum(rate(qwen_batch_rows_rendered_total[5m]))", r"unknown metric 'qwen_batch_rows_rendered_total'"),
        ('sum(ray_qwen_batch_rows_skipped_total{worker=~"$worker"}[5m])', r"has no label\(s\) \['worker'\]"),
        ("sum(ray_qwen_batch_rows_rendered_total)", r"is a counter: read it with rate"),
        ("histogram_quantile(0.9, sum by (worker) (rate(ray_qwen_batch_render_seconds_bucket[5m])))", r"by \(le"),
        ("sum by (GpuIndex) (rate(ray_qwen_batch_rows_failed_total[5m]))", r"grouping by \['GpuIndex'\]"),
        ("sumx(rate(ray_qwen_batch_rows_failed_total[5m]))", r"unknown function 'sumx'"),
        ("sum(rate(ray_qwen_batch_rows_failed_total[5m])", r"unbalanced brackets"),
        ('sum({job_id="x"})', r"selector without a metric name"),
    ],
)
def test_promql_checker_rejects(expr, error, known_metrics):
    with pytest.raises(PromQLError, match=error):
        check_expr(expr, known_metrics)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ('label_values(ray_qwen_batch_rows_in_flight{job_id=~"$job_id"}, worker)', r"has no label 'worker'"),
        ("label_values(ray_qwen_batch_rows_rendered, job_id)", r"unknown metric 'ray_qwen_batch_rows_rendered'"),
        ("label_values(job_id)", r"not a label_values\(<selector>, <label>\) query"),
    ],
)
def test_variable_checker_rejects(query, error, known_metrics):
    with pytest.raises(PromQLError, match=error):
        check_label_values(query, known_metrics)


def test_promql_checker_accepts_a_quantile_over_buckets(known_metrics):
    expr = (
        'histogram_quantile(0.99, sum by (le, worker) (rate(ray_qwen_batch_upload_seconds_bucket'
        '{job_id=~"$job_id", worker=~"$worker"}[$__rate_interval])))'
    )
    assert check_expr(expr, known_metrics) == ["ray_qwen_batch_upload_seconds_bucket"]


# --------------------------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((CLUSTER / "grafana-dashboard.json").read_text(encoding="utf-8"))


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_structure(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job_id", "worker"} <= variables.keys()
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert len(queried) >= 10
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def check_dashboard_metrics(dashboard: dict, known_metrics: dict) -> None:
    """Every query reads only known exported names (PromQLError otherwise) and every metric of ours is
    shown somewhere (AssertionError otherwise)."""
    used: set[str] = set()
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            used |= set(check_expr(target["expr"], known_metrics))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used.add(check_label_values(variable["definition"], known_metrics))
            assert variable["query"]["query"] == variable["definition"]
    for name, (kind, _) in OUR_METRICS.items():
        needed = f"ray_{name}_bucket" if kind == "histogram" else exported_names(name, kind)[0]
        assert needed in used, f"no panel shows {name} ({needed})"
    assert {"ray_node_gpus_utilization", "ray_node_gram_used"} <= used


def test_dashboard_queries_only_exported_names_and_covers_every_metric(dashboard, known_metrics):
    check_dashboard_metrics(dashboard, known_metrics)


def test_dashboard_has_percentiles_for_render_and_upload(dashboard):
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    for metric in ("ray_qwen_batch_render_seconds_bucket", "ray_qwen_batch_upload_seconds_bucket"):
        for q in ("0.5", "0.9", "0.99"):
            assert any(e.startswith(f"histogram_quantile({q},") and metric in e for e in exprs), (metric, q)


def test_dashboard_coverage_check_can_fail(dashboard, known_metrics):
    """Dropping the only panels that read upload retries must be noticed."""
    pruned = copy.deepcopy(dashboard)
    pruned["panels"] = [
        p for p in pruned["panels"] if not any("upload_retries" in t["expr"] for t in p.get("targets", []))
    ]
    with pytest.raises(AssertionError, match="no panel shows qwen_batch_upload_retries"):
        check_dashboard_metrics(pruned, known_metrics)


# --------------------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text(encoding="utf-8"))


def ray_validate(config: dict) -> dict:
    """What `ray up` does before contacting the cloud: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_ray_validation(launcher_config):
    prepared = ray_validate(launcher_config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any('"qwen-batch[gpu]' in command for command in prepared["worker_setup_commands"])
    assert any("hf download DFloat11/Qwen-Image-DF11" in command for command in prepared["worker_setup_commands"])


@pytest.mark.parametrize(
    ("mutate", "error_type", "error"),
    [
        (lambda c: c.pop("provider"), Exception, r"'provider' is a required property"),
        (lambda c: c["available_node_types"]["ray.worker.gpu24"].pop("node_config"), Exception,
         r"'node_config' is a required property"),
        (lambda c: c["available_node_types"]["ray.worker.gpu24"]["resources"].update(GPU=0.5), Exception,
         r"0\.5 is not of type 'integer'"),
        (lambda c: c.pop("head_node_type"), ValueError, r"You must specify `head_node_type`"),
        (lambda c: (c.update(max_workers=1), c["available_node_types"]["ray.worker.gpu24"].update(min_workers=2)),
         ValueError, r"smaller than the sum of `min_workers`"),
    ],
)
def test_launcher_validation_can_fail(launcher_config, mutate, error_type, error):
    broken = copy.deepcopy(launcher_config)
    mutate(broken)
    with pytest.raises(error_type, match=error):
        ray_validate(broken)


def test_launcher_gpu_node_type_fits_one_worker(launcher_config):
    preset = get_preset("qwen-image-df11")
    node_types = launcher_config["available_node_types"]
    head = node_types[launcher_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu_types = {name: spec for name, spec in node_types.items() if spec["resources"].get("GPU")}
    assert gpu_types, "no GPU node type"
    for name, spec in gpu_types.items():
        assert spec["resources"]["GPU"] == 1, name
        # Ray's `memory` resource must hold the worker's host-RAM request, or the actor never schedules.
        assert spec["resources"]["memory"] >= preset.host_memory_gb * GiB, name
        # from zero: a job's pending workers make the autoscaler add GPU nodes, up to max_workers
        assert spec["min_workers"] == 0 < spec["max_workers"] <= launcher_config["max_workers"], name
    assert launcher_config["idle_timeout_minutes"] <= 10  # released GPU nodes do not linger
    for command in launcher_config["head_start_ray_commands"] + launcher_config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "--metrics-export-port=8080" in command
    worker_start = " ".join(launcher_config["worker_start_ray_commands"])
    assert "--object-store-memory=" in worker_start and "HF_HUB_OFFLINE=1" in worker_start


# --------------------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------------------
def load_documents(name: str) -> dict[str, dict]:
    documents = [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text(encoding="utf-8")) if doc]
    by_kind = {}
    for doc in documents:
        assert set(doc) >= {"apiVersion", "kind", "metadata", "spec"}, name
        assert doc["kind"] not in by_kind, f"two {doc['kind']} in {name}"
        by_kind[doc["kind"]] = doc
    return by_kind


# Field names of KubeRay's ray.io/v1 API types (a typo there is silently dropped by the API server).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headServiceAnnotations", "headGroupSpec",
    "workerGroupSpecs", "suspend", "managedBy", "gcsFaultToleranceOptions", "upgradeStrategy",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "securityContext", "env", "envFrom",
    "resources", "volumeMounts", "version",
}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams", "template",
    "scaleStrategy", "suspend", "numOfHosts", "headService", "serviceType",
}


def quantity_bytes(quantity: str) -> float:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": GiB, "Ti": 1024**4, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def check_ray_cluster_spec(spec: dict) -> None:
    preset = get_preset("qwen-image-df11")
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, sorted(set(spec) - RAYCLUSTER_SPEC_FIELDS)
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert {"secretRef": {"name": "qwen-batch-s3"}} in head_container["envFrom"]
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, sorted(set(group) - WORKER_GROUP_FIELDS)
        container = group["template"]["spec"]["containers"][0]
        if container["resources"]["limits"].get("nvidia.com/gpu"):
            gpu_groups.append((group, container))
    assert gpu_groups, "no GPU worker group"
    for group, container in gpu_groups:
        pod = group["template"]["spec"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources["requests"]["nvidia.com/gpu"] == 1
        # KubeRay hands the memory limit to Ray as --memory; the request is what the scheduler reserves.
        assert quantity_bytes(resources["requests"]["memory"]) >= 48 * GiB
        assert quantity_bytes(resources["limits"]["memory"]) >= preset.host_memory_gb * GiB
        assert container["image"] == "rayproject/ray:2.60.0-py311-gpu"
        assert {"secretRef": {"name": "qwen-batch-s3"}} in container["envFrom"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert claims.get("hf-cache") == "qwen-batch-hf-cache" and mounts.get("hf-cache") == "/mnt/hf-cache"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"] == "/mnt/hf-cache" and env["HF_HUB_OFFLINE"] == "1"
    check_gpu_groups_scale_from_zero(spec)


def check_gpu_groups_scale_from_zero(spec: dict) -> None:
    """The autoscaler runs and GPU groups start at zero pods (qwen-batch's pending workers are its demand);
    a GPU pod being deleted drains its Ray node (Ray 2.60's SIGTERM drain) within its grace period."""
    from ray._private import ray_constants

    assert spec.get("enableInTreeAutoscaling") is True, "no autoscaler: GPU pods never join for pending workers"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS
    assert hasattr(ray_constants, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")  # the variable below is Ray's
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        if not container["resources"]["limits"].get("nvidia.com/gpu"):
            continue
        assert group["minReplicas"] == group["replicas"] == 0 < group["maxReplicas"], (
            f"GPU group {group['groupName']} does not scale from zero")
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert 0 < float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) < pod["terminationGracePeriodSeconds"]


def test_kuberay_raycluster():
    docs = load_documents("kuberay-raycluster.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster"}
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert docs["PersistentVolumeClaim"]["apiVersion"] == "v1"
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == "qwen-batch-hf-cache"
    check_ray_cluster_spec(docs["RayCluster"]["spec"])


def test_a_fixed_gpu_pool_is_flagged():
    spec = copy.deepcopy(load_documents("kuberay-raycluster.yaml")["RayCluster"]["spec"])
    spec["workerGroupSpecs"][0].update(replicas=2, minReplicas=2, maxReplicas=2)
    with pytest.raises(AssertionError, match="GPU group gpu24 does not scale from zero"):
        check_gpu_groups_scale_from_zero(spec)
    spec["enableInTreeAutoscaling"] = False
    with pytest.raises(AssertionError, match="no autoscaler"):
        check_gpu_groups_scale_from_zero(spec)


def test_kuberay_rayjob():
    docs = load_documents("kuberay-rayjob.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "RayJob"}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, sorted(set(spec) - RAYJOB_SPEC_FIELDS)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert docs["PersistentVolumeClaim"] == load_documents("kuberay-raycluster.yaml")["PersistentVolumeClaim"]

    from ray.runtime_env import RuntimeEnv

    runtime_env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def submit_arguments(command: str) -> list[str]:
    words = command.split()
    assert words[:2] == ["qwen-batch", "submit"], f"not a qwen-batch submit: {command!r}"
    return words[2:]


def test_entrypoints_are_qwen_batch_submit_with_options_the_cli_has():
    from jobs.cli.submit_cmd import submit

    options = {opt for param in submit.params for opt in getattr(param, "opts", [])}
    entrypoint = load_documents("kuberay-rayjob.yaml")["RayJob"]["spec"]["entrypoint"]
    words = submit_arguments(entrypoint)
    assert words[0].startswith("s3://") and words[0].endswith(".parquet")
    flags = [word for word in words if word.startswith("--")]
    assert set(flags) <= options, sorted(set(flags) - options)
    assert words[words.index("--address") + 1] == "auto"
    with pytest.raises(AssertionError, match="not a qwen-batch submit"):
        submit_arguments("python -m jobs submit x.parquet")
