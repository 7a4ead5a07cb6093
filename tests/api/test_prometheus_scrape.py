"""The shipped queries against a real Prometheus scraping a real gateway.

`loragate serve` runs on the fake engine (with Redis, adapters, a tenant limit and a tight
admission queue, so that every series has samples), gets traffic of every kind, and a real
`prometheus` scrapes its metrics listener every second and evaluates deploy/monitoring/rules.yaml
every second. Then each query the fleet depends on must return data: the engine autoscalers'
(prometheus-adapter rules and KEDA triggers, read from deploy/k8s/components), every Grafana panel
target (deploy/monitoring/grafana-dashboard.json) and every recording rule; and every metric any
of them (or an alert) names must be one the gateway exports.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from server.engines.process import free_loopback_port
from tests.adapter_factory import SMOLLM2_CONFIG, write_peft_adapter
from tests.prometheus_server import PrometheusServer
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, TENANT_KEYS, fake_serve_env, write_tenants_file

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ROOT / "deploy" / "k8s" / "components"
RULES = ROOT / "deploy" / "monitoring" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
LORAGATE = str(Path(sys.executable).parent / "loragate")
# The labels the scrape of a gateway pod adds (the ServiceMonitor's): the scalers select on
# `namespace`, the alerts name the `pod`.
NAMESPACE = "loragate"
POD = "loragate-gateway-0"
# What Grafana puts in place of the dashboard's variables.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "${namespace}": NAMESPACE, "$namespace": NAMESPACE}
ADAPTERS = ("helper-a", "helper-b")
# Exported metric names a query may name: a series name ends in one of these for histograms.
METRIC_NAME = re.compile(r"(?<![\w:])loragate_[a-z0-9_]+")


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    redis: RedisServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(
        self, path: str, body: dict[str, Any], tenant: str = "acme", cached: bool = True
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
        if not cached:
            headers["Cache-Control"] = "no-cache"
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)

    def chat(self, content: str, model: str = "", **kwargs: Any) -> httpx.Response:
        # Greedy: cacheable (a sampled answer is not the same answer twice).
        body = {
            "model": model or self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
        }
        return self.post("/v1/chat/completions", body, **kwargs)

    @functools.cached_property
    def model(self) -> str:
        """The base model's served name."""
        headers = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
        models = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=10).json()
        return str(models["data"][0]["id"])


@pytest.fixture
def gateway(tmp_path: Path, redis: RedisServer) -> Iterator[Gateway]:
    port, metrics_port = free_loopback_port(), free_loopback_port()
    env = fake_serve_env(
        tmp_path,
        port=port,
        metrics_port=metrics_port,
        LORAGATE_REDIS_URL=redis.url,
        LORAGATE_REDIS__RETRY_AFTER_S="0.5",
        # One adapter at a time: serving the other evicts it.
        LORAGATE_MAX_LOADED_ADAPTERS="1",
        LORAGATE_ENGINE__MAX_LORAS="1",
        # One request on the engine, one waiting, the next refused (503).
        LORAGATE_ADMISSION__MAX_RUNNING="1",
        LORAGATE_ADMISSION__MAX_QUEUED="1",
        LORAGATE_ENGINE__EXTRA_ARGS='["--ttft-ms", "200"]',
        # The engine's own running/waiting counts, read often enough for a short test.
        LORAGATE_ENGINE__LOAD_POLL_S="1",
    )
    # globex may send one request a minute: its second is refused (429).
    write_tenants_file(tmp_path / "tenants.yaml", {"globex": {"requests_per_minute": 1}})
    (tmp_path / "model").mkdir()  # the base model's shapes, which uploads are checked against
    (tmp_path / "model" / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([LORAGATE, "serve"], env=env, stdout=out, stderr=out)
    gw = Gateway(proc, port, metrics_port, log_path, redis)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(f"{gw.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield gw
    finally:
        redis.resume()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path, gateway: Gateway) -> Iterator[PrometheusServer]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "loragate-gateway",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{gateway.metrics_port}"],
                        "labels": {"namespace": NAMESPACE, "pod": POD},
                    }
                ],
            }
        ],
    }
    server = PrometheusServer(workdir, config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def upload_adapters(gateway: Gateway, tmp_path: Path) -> None:
    for seed, name in enumerate(ADAPTERS):
        directory = write_peft_adapter(tmp_path / "adapters" / name, seed=seed)
        files = {
            "adapter_config": (CONFIG_FILE, (directory / CONFIG_FILE).read_bytes()),
            "adapter_model": (WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes()),
        }
        response = httpx.put(
            f"{gateway.url}/admin/v1/tenants/acme/adapters/{name}",
            files=files,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=60,
        )
        assert response.status_code in (200, 201), response.text


def send_traffic(gateway: Gateway, round_: int) -> None:
    """Every kind of request once: each series gets samples, and rates move between rounds."""
    model = gateway.model
    # Cache: a miss, then a hit.
    for _ in range(2):
        assert gateway.chat(f"cached question {round_}").status_code == 200
    # Streams (time to first token, tokens from the usage chunk).
    prompts: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"stream {round_}"}]}),
        ("/v1/completions", {"prompt": f"stream prompt {round_}"}),
    ]
    for path, prompt in prompts:
        body = {**prompt, "model": model, "stream": True, "stream_options": {"include_usage": True}}
        streamed = gateway.post(path, body, cached=False)
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text, streamed.text
    # No such adapter: 404.
    assert gateway.chat("hello", model="no-such-adapter").status_code == 404
    # Both adapters, alternately: loads, and evictions (one slot).
    for name in ADAPTERS:
        assert gateway.chat(f"adapter {round_}", model=name, cached=False).status_code == 200
    # A tenant over its limit: 429.
    statuses = [gateway.chat(f"limited {round_} {i}", tenant="globex").status_code for i in (0, 1)]
    assert 429 in statuses, statuses
    with ThreadPoolExecutor(6) as pool:
        # Identical requests at once: one engine call, the other coalesced onto it.
        same = list(pool.map(lambda _: gateway.chat(f"together {round_}"), range(2)))
        assert [r.status_code for r in same] == [200, 200]
        # More than the engine runs and queues: 503 for the rest (5xx, admission rejections).
        burst = list(
            pool.map(lambda i: gateway.chat(f"burst {round_} {i}", cached=False), range(6))
        )
        assert 503 in [r.status_code for r in burst], [r.text for r in burst]
    # Redis stalls: its calls time out (Redis errors, limits checked locally), then it is back.
    gateway.redis.pause()
    try:
        assert gateway.chat(f"while redis stalls {round_}").status_code == 200
    finally:
        gateway.redis.resume()


def hpa_queries() -> list[tuple[str, str, dict[str, str]]]:
    """(seriesQuery, metricsQuery rendered as prometheus-adapter renders it for an HPA in
    NAMESPACE, the labels of the one sample it must answer) of every prometheus-adapter rule
    under deploy/k8s/components: External rules (`externalRules`) are asked per namespace, Pods
    rules (`rules`) per pod, for the pods the HPA targets."""
    queries = []
    for path in sorted(COMPONENTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "ConfigMap":
                continue
            for text in doc.get("data", {}).values():
                config = yaml.safe_load(text)
                if not isinstance(config, dict):
                    continue
                kinds = [
                    (config.get("externalRules", []), f'namespace="{NAMESPACE}"', "namespace"),
                    (config.get("rules", []), f'namespace="{NAMESPACE}",pod=~"{POD}"', "pod"),
                ]
                for rules_of_kind, matchers, group_by in kinds:
                    for rule in rules_of_kind:
                        series = rule["seriesQuery"].strip("'")
                        name = series.split("{", 1)[0]
                        rendered = (
                            rule["metricsQuery"]
                            .replace("<<.Series>>", name)
                            .replace("<<.LabelMatchers>>", matchers)
                            .replace("<<.GroupBy>>", group_by)
                        )
                        expected = {"namespace": NAMESPACE} if group_by == "namespace" else {}
                        if group_by == "pod":
                            expected = {"pod": POD}
                        queries.append((series, rendered, expected))
    return queries


def keda_queries() -> list[str]:
    queries = []
    for path in sorted(COMPONENTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "ScaledObject":
                continue
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    queries.append(trigger["metadata"]["query"])
    return queries


def dashboard_queries() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = []
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable left in {expr}"
            queries.append(expr)
    return queries


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def wait_for_data(prometheus: PrometheusServer, queries: list[str]) -> dict[str, list[Any]]:
    """Each query's result once every one has samples (rules and rates need a few scrapes)."""
    deadline = time.monotonic() + 20
    while True:
        results = {q: prometheus.query(q) for q in queries}
        empty = [q for q, result in results.items() if not result]
        if not empty or time.monotonic() > deadline:
            assert not empty, "no data for:\n" + "\n".join(empty)
            return results
        time.sleep(1)


def test_shipped_queries_return_data(
    gateway: Gateway, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    upload_adapters(gateway, tmp_path)
    # Two rounds a few scrapes apart, so that every counter has moved within the rate windows.
    send_traffic(gateway, 1)
    time.sleep(2.5)
    send_traffic(gateway, 2)

    hpa, keda = hpa_queries(), keda_queries()
    assert hpa and keda, "no scaler queries found under deploy/k8s/components"
    dashboard = dashboard_queries()
    recorded = [
        f'{rule["record"]}{{namespace="{NAMESPACE}"}}' for rule in rules() if "record" in rule
    ]
    queries = [metrics_query for _, metrics_query, _ in hpa] + keda + dashboard + recorded
    results = wait_for_data(prometheus, list(dict.fromkeys(queries)))

    # The numbers are numbers: each query's rates moved, its ratios have a denominator (one
    # series may still be NaN, such as a quantile of Redis pings, which only start-up sends).
    for query, result in results.items():
        values = [float(sample["value"][1]) for sample in result]
        assert any(not math.isnan(v) for v in values), f"only NaN from {query}: {result}"

    # prometheus-adapter: its seriesQuery finds series with the namespace label it maps to the
    # HPA's namespace; its metricsQuery answers one sample for that namespace.
    for series_query, metrics_query, labels in hpa:
        series = prometheus.api("series", **{"match[]": series_query})
        assert series and all(s.get("namespace") == NAMESPACE for s in series), series
        [sample] = results[metrics_query]
        assert sample["metric"] == labels, (metrics_query, sample)
    # KEDA: one sample, whatever its labels (more than one is an error to its scaler).
    for query in keda:
        assert len(results[query]) == 1, (query, results[query])
    # The recorded series keep the namespace, alone: what a scaler or an alert selects on.
    for query in recorded:
        for sample in results[query]:
            labels = {k: v for k, v in sample["metric"].items() if k != "__name__"}
            assert labels == {"namespace": NAMESPACE}, (query, sample)

    # Alerts are valid queries (they return nothing while all is well).
    alerts = [rule["expr"] for rule in rules() if "alert" in rule]
    for expr in alerts:
        prometheus.query(expr)

    # Every metric any of these names is one the gateway exports.
    exported = exported_names(
        httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
    )
    everything = queries + alerts + [rule["expr"] for rule in rules() if "record" in rule]
    everything += [series_query for series_query, _, _ in hpa]
    named = {name for query in everything for name in METRIC_NAME.findall(query)}
    assert named, "no metric names found in the queries"
    assert named <= exported, f"not exported by the gateway: {sorted(named - exported)}"
