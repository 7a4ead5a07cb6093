"""The Kubernetes manifests (deploy/k8s), offline: every overlay and the overlay + component
combinations we ship are rendered with `kubectl kustomize`, each object is validated strictly
(unknown fields refused) against the Kubernetes API of K8S_VERSION, the custom resources
(KEDA's ScaledObject, the Prometheus Operator's ServiceMonitor) against typed models of their
CRDs, and then cross-checked as no schema does: selectors, ports, referenced Secrets and
ConfigMaps, scale targets, shutdown timing, and the loragate settings the pods get.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pydantic
import pytest
import yaml

from server.metrics import Metrics
from server.settings import ServerSettings, Settings
from tests.k8s_tools import find_kubectl, kustomize

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.31"
NAMESPACE = "loragate"
GRACEFUL_SHUTDOWN_S = 30  # server/cli.py: the gateway's drain

# Every render we ship: an overlay, and the components that go with it.
RENDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "cpu+hpa+monitoring": ("overlays/cpu", ("components/hpa", "components/monitoring")),
    "cpu+keda+monitoring": ("overlays/cpu", ("components/keda", "components/monitoring")),
    "gpu+hpa+monitoring": ("overlays/gpu", ("components/hpa", "components/monitoring")),
    "gpu+keda+monitoring": ("overlays/gpu", ("components/keda", "components/monitoring")),
}

# Secrets the operator creates (deploy/k8s/README.md says how), never rendered: a real value in
# the repository would be deployed. name -> keys the manifests read by name (envFrom: none).
OPERATOR_SECRETS: dict[str, set[str]] = {
    "loragate-tenants": {"tenants.yaml"},
    "loragate-engine-key": {"api-key"},
    "loragate-s3": set(),  # envFrom: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace"}


def custom_models() -> dict[tuple[str, str], type[pydantic.BaseModel]]:
    # Imported here: the generated models take a few seconds to import.
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
        ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
    }


CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


# -- rendering --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubectl() -> Path:
    return find_kubectl()


@pytest.fixture(scope="session")
def renders(kubectl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    out: dict[str, list[Obj]] = {}
    for name, (overlay, components) in RENDERS.items():
        if components:
            # What an operator's own overlay does. kustomize takes only relative paths.
            work = tmp_path_factory.mktemp(name.replace("+", "-"))
            (work / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": [os.path.relpath(K8S / overlay, work)],
                        "components": [os.path.relpath(K8S / c, work) for c in components],
                    }
                )
            )
            text = kustomize(kubectl, work)
        else:
            text = kustomize(kubectl, K8S / overlay)
        out[name] = [d for d in yaml.safe_load_all(text) if d]
    return out


@pytest.fixture(params=sorted(RENDERS))
def render(request: pytest.FixtureRequest, renders: dict[str, list[Obj]]) -> list[Obj]:
    return renders[request.param]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> Iterator[Obj]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(workload: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label_selector(selector: Obj) -> dict[str, str]:
    """A LabelSelector's matchLabels; matchExpressions are not used in these manifests."""
    assert not selector.get("matchExpressions"), "cross-checks handle matchLabels only"
    labels: dict[str, str] = selector.get("matchLabels", {})
    return labels


def selected_workloads(objs: list[Obj], selector: dict[str, str], namespace: str) -> list[Obj]:
    assert selector, "an empty selector selects every pod"
    return [
        w
        for w in workloads(objs)
        if w["metadata"].get("namespace") == namespace
        and matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def gateway(objs: list[Obj]) -> Obj:
    return named(objs, "Deployment", "loragate-gateway")


def engine(objs: list[Obj]) -> Obj:
    return named(objs, "Deployment", "loragate-engine")


def config_map_data(objs: list[Obj], name: str) -> dict[str, str]:
    data: dict[str, str] = named(objs, "ConfigMap", name).get("data", {})
    return data


def container_env(objs: list[Obj], c: Obj) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env.
    Values from Secrets are None."""
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map_data(objs, source["configMapRef"]["name"]))
    for var in c.get("env", []):
        env[var["name"]] = var.get("value") if "valueFrom" not in var else None
    return env


def port_number(c: Obj, port: int | str) -> int:
    """A container port by name or number; fails when the container does not declare it."""
    ports = c.get("ports", [])
    for p in ports:
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"container {c['name']} declares no port {port!r}: {ports}")


# -- schemas ----------------------------------------------------------------------------------


def test_renders_are_not_empty(render: list[Obj]) -> None:
    kinds = {o["kind"] for o in render}
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in render]
    assert len(keys) == len(set(keys)), "duplicate objects"


def test_builtin_objects_validate_strictly(render: list[Obj]) -> None:
    for obj in render:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {e.json_path}")


def validate_custom(obj: Obj) -> None:
    """Against the CRD's typed model; a field the model does not know is refused (the model
    would drop it silently: the object must survive a round trip unchanged)."""
    model = custom_models().get((obj["apiVersion"], obj["kind"]))
    assert model is not None, f"no model for {obj['apiVersion']} {obj['kind']}"
    parsed = model.model_validate(obj)
    back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert back == obj, f"{obj['kind']}/{obj['metadata']['name']} has fields its CRD lacks"


def test_custom_resources_match_their_crds(render: list[Obj]) -> None:
    for obj in render:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            validate_custom(obj)


def test_validators_refuse_unknown_fields(renders: dict[str, list[Obj]]) -> None:
    objs = renders["cpu+keda+monitoring"]
    deployment = copy.deepcopy(engine(objs))
    pod_spec(deployment)["containers"][0]["startupprobe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = copy.deepcopy(named(objs, "ScaledObject", "loragate-engine"))
    scaled["spec"]["maxReplicas"] = 3  # the HPA's spelling, not KEDA's
    with pytest.raises(AssertionError, match="fields its CRD lacks"):
        validate_custom(scaled)
    monitor = copy.deepcopy(of_kind(objs, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["targetport"] = "metrics"
    with pytest.raises(AssertionError, match="fields its CRD lacks"):
        validate_custom(monitor)


def test_every_namespaced_object_is_in_the_namespace(render: list[Obj]) -> None:
    for obj in render:
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
    assert [n["metadata"]["name"] for n in of_kind(render, "Namespace")] == [NAMESPACE]


# -- cross-references -------------------------------------------------------------------------


def test_workload_selectors_match_their_templates(render: list[Obj]) -> None:
    for w in workloads(render):
        selector = label_selector(w["spec"]["selector"])
        assert selector
        assert matches(selector, w["spec"]["template"]["metadata"]["labels"])


def test_service_selectors_and_target_ports(render: list[Obj]) -> None:
    for svc in of_kind(render, "Service"):
        ns = svc["metadata"]["namespace"]
        targets = selected_workloads(render, svc["spec"]["selector"], ns)
        assert targets, f"Service {svc['metadata']['name']} selects no workload"
        for w in targets:
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(
                    target in (p.get("name"), p["containerPort"])
                    for c in pod_spec(w)["containers"]
                    for p in c.get("ports", [])
                ), f"Service {svc['metadata']['name']}: no container port {target!r}"


def test_network_policy_selectors_and_ports(render: list[Obj]) -> None:
    for policy in of_kind(render, "NetworkPolicy"):
        ns = policy["metadata"]["namespace"]
        targets = selected_workloads(render, label_selector(policy["spec"]["podSelector"]), ns)
        assert targets, f"NetworkPolicy {policy['metadata']['name']} selects no workload"
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for w in targets:
                    assert any(
                        port["port"] in (p.get("name"), p["containerPort"])
                        for c in pod_spec(w)["containers"]
                        for p in c.get("ports", [])
                    )
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    # A peer in the policy's own namespace: it must be one of ours.
                    peers = label_selector(peer["podSelector"])
                    assert selected_workloads(render, peers, ns), policy["metadata"]["name"]


def test_only_gateways_reach_engines(render: list[Obj]) -> None:
    engine_labels = engine(render)["spec"]["template"]["metadata"]["labels"]
    gateway_labels = gateway(render)["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in of_kind(render, "NetworkPolicy")
        if matches(label_selector(p["spec"]["podSelector"]), engine_labels)
    ]
    assert policies
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` admits every pod"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "peers in other namespaces or by IP"
                assert matches(label_selector(peer["podSelector"]), gateway_labels)
                assert not matches(label_selector(peer["podSelector"]), engine_labels)
            assert [p["port"] for p in rule["ports"]] == [8100]


def test_pdb_selectors(render: list[Obj]) -> None:
    covered = set()
    for pdb in of_kind(render, "PodDisruptionBudget"):
        selector = label_selector(pdb["spec"]["selector"])
        targets = selected_workloads(render, selector, pdb["metadata"]["namespace"])
        assert len(targets) == 1, f"PDB {pdb['metadata']['name']} selects {len(targets)}"
        covered.add(targets[0]["metadata"]["name"])
    assert {"loragate-gateway", "loragate-engine"} <= covered


def test_service_monitors_select_a_service_port(render: list[Obj]) -> None:
    for monitor in of_kind(render, "ServiceMonitor"):
        selector = label_selector(monitor["spec"]["selector"])
        services = [
            s
            for s in of_kind(render, "Service")
            if s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
            and matches(selector, s["metadata"].get("labels", {}))
        ]
        assert len(services) == 1, f"ServiceMonitor selects {len(services)} Services"
        (svc,) = services
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        # It scrapes the gateways' metrics listener, not the public port.
        (target,) = selected_workloads(
            render, svc["spec"]["selector"], svc["metadata"]["namespace"]
        )
        assert target["metadata"]["name"] == "loragate-gateway"
        gw = container(target, "gateway")
        env = container_env(render, gw)
        for port in svc["spec"]["ports"]:
            assert port_number(gw, port["targetPort"]) == int(env["LORAGATE_METRICS__PORT"] or 0)


def test_probe_ports_exist(render: list[Obj]) -> None:
    for w in workloads(render):
        for c in pod_spec(w)["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = c.get(probe, {})
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in action:
                        port_number(c, action[handler]["port"])


def referenced(objs: list[Obj]) -> Iterator[tuple[str, str, str | None, str]]:
    """(kind, name, key or None, where) for every Secret and ConfigMap a pod template names."""
    for w in workloads(objs):
        where = w["metadata"]["name"]
        for c in all_containers(w):
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    yield "Secret", source["secretRef"]["name"], None, where
                if "configMapRef" in source:
                    yield "ConfigMap", source["configMapRef"]["name"], None, where
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], where
                if "configMapKeyRef" in ref:
                    key_ref = ref["configMapKeyRef"]
                    yield "ConfigMap", key_ref["name"], key_ref["key"], where
        for volume in pod_spec(w).get("volumes", []):
            sources = [volume, *volume.get("projected", {}).get("sources", [])]
            for source in sources:
                for kind, field, name_field in (
                    ("Secret", "secret", "secretName"),
                    ("ConfigMap", "configMap", "name"),
                ):
                    if field in source:
                        ref = source[field]
                        keys = [i["key"] for i in ref.get("items", [])] or [None]
                        for key in keys:
                            yield kind, ref[name_field], key, where


def test_referenced_secrets_and_config_maps_exist(render: list[Obj]) -> None:
    used_operator_secrets = set()
    for kind, name, key, where in referenced(render):
        rendered = [o for o in of_kind(render, kind) if o["metadata"]["name"] == name]
        if rendered:
            (obj,) = rendered
            if key is not None:
                assert key in {**obj.get("data", {}), **obj.get("stringData", {})}, (
                    f"{where}: {kind} {name} has no key {key}"
                )
            continue
        assert kind == "Secret" and name in OPERATOR_SECRETS, (
            f"{where} names {kind} {name}, neither rendered nor supplied by the operator"
        )
        if key is not None:
            assert key in OPERATOR_SECRETS[name], f"{where}: undocumented key {key} of {name}"
        used_operator_secrets.add(name)
    assert used_operator_secrets == set(OPERATOR_SECRETS), "a listed Secret nobody uses"


def test_operator_secrets_are_documented() -> None:
    readme = (K8S / "README.md").read_text()
    for name, keys in OPERATOR_SECRETS.items():
        assert re.search(rf"kubectl -n \S+ create secret generic {name} ", readme), name
        for key in keys:
            assert key in readme, key


def test_scale_targets_exist(render: list[Obj]) -> None:
    scalers = of_kind(render, "HorizontalPodAutoscaler") + of_kind(render, "ScaledObject")
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    assert len(targets) == len(set(targets)), "two autoscalers on one workload"
    for scaler in scalers:
        ref = scaler["spec"]["scaleTargetRef"]
        target = named(render, ref.get("kind", "Deployment"), ref["name"])
        assert ref.get("apiVersion", "apps/v1") == target["apiVersion"]
        assert "replicas" not in target["spec"], f"{ref['name']}: an apply would reset it"
        spec = scaler["spec"]
        if scaler["kind"] == "HorizontalPodAutoscaler":
            low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
        else:
            low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        assert 1 <= low <= high, scaler["metadata"]["name"]


def metric_named(query: str) -> str:
    found = re.findall(r"loragate_\w+", query)
    assert len(found) == 1, query
    return str(found[0])


def test_engine_autoscaling_follows_what_waits_for_engines(render: list[Obj]) -> None:
    exported = {m.name for m in Metrics().registry.collect()}
    # What waits in the gateways, what waits in the engines (their own report), what runs.
    sources = {
        "loragate_engine_queue_depth",
        "loragate_engine_reported_requests",
        "loragate_engine_requests_running",
    }
    assert sources <= exported
    scaled_on = {"loragate_engine_requests_waiting", "loragate_engine_requests_running"}
    for hpa in of_kind(render, "HorizontalPodAutoscaler"):
        behavior = hpa["spec"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert behavior["scaleUp"].get("stabilizationWindowSeconds", 0) == 0
        if hpa["spec"]["scaleTargetRef"]["name"] != "loragate-engine":
            continue
        names = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
        assert names == scaled_on
        rules = yaml.safe_load(
            config_map_data(render, "loragate-prometheus-adapter-rules")["config.yaml"]
        )
        served = {r["name"]["as"] for r in rules["externalRules"]}
        assert names <= served
        used = set()
        for rule in rules["externalRules"]:
            assert metric_named(rule["seriesQuery"]) in exported
            used.add(metric_named(rule["seriesQuery"]))  # what <<.Series>> stands for
            used |= set(re.findall(r"loragate_\w+", rule["metricsQuery"]))
        assert used == sources
    for scaled in of_kind(render, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] != "loragate-engine":
            continue
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
        assert {m for q in queries for m in re.findall(r"loragate_\w+", q)} == sources
        for q in queries:
            assert f'namespace="{scaled["metadata"]["namespace"]}"' in q


def test_gateways_scale_on_cpu_and_on_the_requests_they_serve(render: list[Obj]) -> None:
    exported = {m.name for m in Metrics().registry.collect()}
    for hpa in of_kind(render, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] != "loragate-gateway":
            continue
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
        assert pods_metric == "loragate_requests_in_flight" and pods_metric in exported
        rules = yaml.safe_load(
            config_map_data(render, "loragate-prometheus-adapter-rules")["config.yaml"]
        )
        [rule] = [r for r in rules["rules"] if r["name"]["as"] == pods_metric]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert ServerSettings().max_connections >= 4 * int(
            metrics["Pods"]["pods"]["target"]["averageValue"]
        )
    for scaled in of_kind(render, "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] != "loragate-gateway":
            continue
        kinds = {t["type"] for t in scaled["spec"]["triggers"]}
        assert kinds == {"cpu", "prometheus"}
        [query] = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] != "cpu"]
        assert metric_named(query) == "loragate_requests_in_flight"


def test_shutdown_outlasts_the_drain(render: list[Obj]) -> None:
    for w in (gateway(render), engine(render)):
        spec = pod_spec(w)
        (main,) = spec["containers"]
        sleep = main["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep >= 5
        assert spec["terminationGracePeriodSeconds"] > sleep + GRACEFUL_SHUTDOWN_S


def test_gateway_finds_the_engines_through_the_headless_service(render: list[Obj]) -> None:
    env = container_env(render, container(gateway(render), "gateway"))
    urls = json.loads(env["LORAGATE_ENGINE__URLS"] or "")
    assert len(urls) == 1
    m = re.fullmatch(
        r"dns\+http://([a-z0-9-]+)(\.[a-z0-9-]+(\.svc(\.cluster\.local)?)?)?:(\d+)", urls[0]
    )
    assert m, urls[0]
    name, port = m[1], int(m[5])
    if m[2]:
        assert m[2].split(".")[1] == NAMESPACE
    svc = named(render, "Service", name)
    assert svc["spec"]["clusterIP"] == "None", "a ClusterIP would resolve to one address"
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    (target,) = selected_workloads(render, svc["spec"]["selector"], NAMESPACE)
    assert target["metadata"]["name"] == "loragate-engine"
    main = container(target, "engine")
    assert port_number(main, svc_port["targetPort"]) == 8100
    command = main["command"] + main.get("args", [])
    assert command[:2] == ["loragate", "engine"]
    assert command[command.index("--port") + 1] == "8100"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--restart" in command


# -- what the pods get ------------------------------------------------------------------------


def is_setting(variable: str) -> bool:
    """Whether LORAGATE_A__B names a field of Settings (pydantic-settings ignores the rest)."""
    model: type[pydantic.BaseModel] = Settings
    *groups, field = variable.removeprefix("LORAGATE_").lower().split("__")
    for group in groups:
        info = model.model_fields.get(group)
        if info is None or not isinstance(info.annotation, type):
            return False
        if not issubclass(info.annotation, pydantic.BaseModel):
            return False
        model = info.annotation
    return field in model.model_fields


def loragate_settings(render: list[Obj], c: Obj, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the container's environment makes; Secret values get stand-ins."""
    for key in list(os.environ):
        if key.startswith("LORAGATE_"):
            monkeypatch.delenv(key)
    for key, value in container_env(render, c).items():
        if key.startswith("LORAGATE_"):
            assert is_setting(key), f"{c['name']}: {key} is no loragate setting"
            monkeypatch.setenv(key, "x" * 32 if value is None else value)
    return Settings()


def test_settings_check_knows_the_settings() -> None:
    assert is_setting("LORAGATE_ENGINE__MAX_LORAS") and is_setting("LORAGATE_CACHE_DIR")
    assert not is_setting("LORAGATE_ENGINE__MAX_LORA") and not is_setting("LORAGATE_CACHE__DIR")
    assert not is_setting("LORAGATE_HOST__X")


def test_settings_load_from_the_manifests(
    render: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = loragate_settings(render, container(gateway(render), "gateway"), monkeypatch)
    eng = loragate_settings(render, container(engine(render), "engine"), monkeypatch)
    assert gw.host == "0.0.0.0" and gw.port == 8000
    assert gw.metrics.host == "0.0.0.0" and gw.metrics.port == 9464
    assert gw.engine.api_key is not None and eng.engine.api_key is not None
    assert gw.redis_url is not None and gw.store_url and gw.store_url.startswith("s3://")
    # What `/readyz` and routing compare between the two sides.
    assert gw.model == eng.model and gw.store_url == eng.store_url
    assert gw.engine.max_loras == eng.engine.max_loras
    assert gw.max_loaded_adapters == eng.max_loaded_adapters
    # The tenants file is the mounted Secret.
    mounts = {
        m["name"]: m["mountPath"] for m in container(gateway(render), "gateway")["volumeMounts"]
    }
    volumes = {v["name"]: v for v in pod_spec(gateway(render))["volumes"]}
    assert gw.tenants_file is not None
    (tenants,) = [n for n, path in mounts.items() if str(gw.tenants_file.parent) == path]
    secret = volumes[tenants]["secret"]
    assert secret["secretName"] == "loragate-tenants"
    assert [i["path"] for i in secret["items"]] == [gw.tenants_file.name]
    # Redis is the rendered Service.
    assert gw.redis_url.host is not None
    redis = named(render, "Service", gw.redis_url.host)
    assert gw.redis_url.port in [p["port"] for p in redis["spec"]["ports"]]
    for settings, w in ((gw, gateway(render)), (eng, engine(render))):
        cache_volume = {
            m["mountPath"]: m["name"] for m in pod_spec(w)["containers"][0]["volumeMounts"]
        }
        name = cache_volume[str(settings.cache_dir)]
        assert "emptyDir" in {v["name"]: v for v in pod_spec(w)["volumes"]}[name]


def test_pods_are_locked_down(render: list[Obj]) -> None:
    for w in workloads(render):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        # Else every Service named loragate-* injects LORAGATE_<NAME>_PORT=tcp://… variables.
        assert spec.get("enableServiceLinks") is False
        for c in all_containers(w):
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"]["drop"] == ["ALL"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], bound)
            image = c["image"]
            assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+", image), image
            assert not image.endswith(":latest")


def test_probes(render: list[Obj]) -> None:
    gw = container(gateway(render), "gateway")
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    eng = container(engine(render), "engine")
    startup = eng["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # vLLM takes tens of seconds to load; a large model on a GPU, minutes.
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 300
    assert eng["livenessProbe"]["httpGet"]["path"] == "/health"
    assert eng["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_images_and_engine_resources(overlay: str, renders: dict[str, list[Obj]]) -> None:
    objs = renders[overlay]
    assert container(gateway(objs), "gateway")["image"].startswith("loragate/gateway:")
    eng = container(engine(objs), "engine")
    assert eng["image"].startswith(f"loragate/engine-{overlay}:")
    for init in pod_spec(engine(objs)).get("initContainers", []):
        assert init["image"] == eng["image"]
    env = container_env(objs, eng)
    tolerations = pod_spec(engine(objs)).get("tolerations", [])
    if overlay == "gpu":
        assert eng["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        assert env["LORAGATE_ENGINE__DTYPE"] == "auto"
        assert env["LORAGATE_ENGINE__GPU_MEMORY_UTILIZATION"] == "0.9"
        assert env["LORAGATE_ENGINE__KV_CACHE_GIB"] == "0"
    else:
        assert "nvidia.com/gpu" not in eng["resources"]["limits"]
        assert not tolerations
        assert "LORAGATE_ENGINE__DTYPE" not in env  # the CPU default, float32
