"""The Prometheus rules: deploy/monitoring/rules.yaml is valid (`promtool check rules`), every
recording and alerting rule in it has a promtool unit test in rules_test.yaml and they pass, and
the PrometheusRule of components/monitoring holds exactly the same groups. Also the Grafana
dashboard's shape (tests/api/test_prometheus_scrape.py runs its queries).

The plain file is the source; after editing it, regenerate the PrometheusRule with
`.venv/bin/python -m tests.unit.test_prometheus_rules`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "monitoring" / "rules_test.yaml"
MONITORING = ROOT / "deploy" / "k8s" / "components" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheus-rules.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"

CR_HEADER = """\
# Generated from deploy/monitoring/rules.yaml (the source: edit that, then run
# `.venv/bin/python -m tests.unit.test_prometheus_rules`); tests/unit/test_prometheus_rules.py
# checks that the groups are the same. The Prometheus Operator loads it when your Prometheus
# selects it (its ruleSelector; kube-prometheus-stack selects `release: <its release name>` by
# default: add that label in your overlay).
"""


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make prometheus`")
    return binary


def plain_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rules(kind: str) -> list[dict[str, Any]]:
    return [rule for group in plain_groups() for rule in group["rules"] if kind in rule]


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "loragate",
            "namespace": "loragate",  # the base's; an overlay's `namespace:` replaces it
            "labels": {
                "app.kubernetes.io/name": "loragate",
                "app.kubernetes.io/component": "monitoring",
            },
        },
        "spec": {"groups": plain_groups()},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_prometheus_rule() -> str:
    return CR_HEADER + yaml.dump(
        prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=96, allow_unicode=True
    )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_are_valid() -> None:
    done = run("check", "rules", str(RULES.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules('record')) + len(rules('alert'))} rules found" in done.stdout


def test_rule_unit_tests_pass() -> None:
    done = run("test", "rules", str(RULES_TEST.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_rule_has_a_unit_test() -> None:
    spec = yaml.safe_load(RULES_TEST.read_text())
    assert spec["rule_files"] == ["rules.yaml"]
    exprs = {t["expr"] for test in spec["tests"] for t in test.get("promql_expr_test", [])}
    alert_tests = [t for test in spec["tests"] for t in test.get("alert_rule_test", [])]
    for rule in rules("record"):
        # Its own series, queried and its samples checked (not just named somewhere).
        assert rule["record"] in exprs, f"no promql_expr_test for {rule['record']}"
    for rule in rules("alert"):
        name = rule["alert"]
        fired = [t for t in alert_tests if t["alertname"] == name and t["exp_alerts"]]
        quiet = [t for t in alert_tests if t["alertname"] == name and not t["exp_alerts"]]
        assert fired, f"no test sees {name} fire"
        assert quiet, f"no test sees {name} stay quiet"


def test_every_alert_says_what_and_how_bad() -> None:
    for rule in rules("alert"):
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    assert {rule["alert"] for rule in rules("alert")} >= {
        "LoragateEngineDown",
        "LoragateHighErrorRatio",
        "LoragateTTFTBudgetBurnFast",
        "LoragateTTFTBudgetBurnSlow",
        "LoragateRedisDown",
        "LoragateCacheHitRatioCollapse",
        "LoragateAdapterLoadFailures",
    }


def test_scaler_series_are_recorded_per_namespace() -> None:
    recorded = {rule["record"]: rule["expr"] for rule in rules("record")}
    for metric in ("loragate_engine_queue_depth", "loragate_engine_requests_running"):
        assert recorded[f"namespace:{metric}:sum"] == f"sum by (namespace) ({metric})"


def test_prometheus_rule_has_the_plain_files_groups() -> None:
    cr = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert cr["apiVersion"] == "monitoring.coreos.com/v1" and cr["kind"] == "PrometheusRule"
    assert cr["spec"]["groups"] == plain_groups(), (
        "stale: run `.venv/bin/python -m tests.unit.test_prometheus_rules`"
    )
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule()


def test_monitoring_component_ships_the_rules() -> None:
    component = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.name in component["resources"]


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"], panel["title"]
    # What it must show, by the metrics it reads.
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in (
        "loragate_requests_total",
        "loragate_time_to_first_token_seconds_bucket",
        "loragate_request_duration_seconds_bucket",
        "loragate_generation_tokens_total",
        "loragate_cache_requests_total",
        "loragate_engine_queue_depth",
        "loragate_engine_reported_requests",
        "loragate_engine_requests_running",
        "loragate_adapter_loads_total",
        "loragate_adapter_unloads_total",
        "loragate_limit_rejections_total",
        "loragate_redis_up",
    ):
        assert metric in exprs, f"no panel shows {metric}"


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
