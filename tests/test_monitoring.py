"""The Grafana dashboard and the Prometheus alert rules in scripts/deploy/: Prometheus' own
checker accepts them, the rule tests pass, and they read only metrics the mirror exports.

`promtool` (Debian's `prometheus` package) checks the rules and runs our rule tests; the
dashboard's expressions are checked by the same parser, as recording rules of a scratch file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.harness.promtool import (DASHBOARD, RULE_TESTS, RULES, grafana_to_promql, metric_names,
                                    promtool)


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, its variables and panels."""
    board = json.loads(DASHBOARD.read_text())
    found = [(f"variable {v['name']}", v["definition"].removeprefix("label_values(").rsplit(",", 1)[0])
             for v in board["templating"]["list"] if v.get("type") == "query"]
    for panel in board["panels"]:
        found += [(panel["title"], grafana_to_promql(t["expr"])) for t in panel.get("targets", [])]
    return found


def rule_expressions() -> list[tuple[str, str]]:
    groups = load_yaml(RULES)["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_promtool_runs_the_rule_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_cover_what_an_operator_pages_on() -> None:
    alerts = {name for name, _ in rule_expressions()}
    assert alerts == {"LifecRegistryDown", "LifecRegistryTeleportMissesRising", "LifecRegistryUpstreamErrors",
                      "LifecRegistryAnswersFailing", "LifecRegistryServingStale", "LifecRegistryCredentialExpiring"}
    tested = {t["alertname"] for case in load_yaml(RULE_TESTS)["tests"] for t in case["alert_rule_test"]}
    assert tested == alerts


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_expressions())
    ]}]}
    scratch = tmp_path / "dashboard.rules.yaml"
    with scratch.open("w") as f:
        YAML(typ="safe").dump(rules, f)
    result = promtool("check", "rules", str(scratch))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(e) for _, e in dashboard_expressions()))
    for name in ("acr_teleport_decisions_total", "acr_upstream_request_duration_seconds_bucket",
                 "acr_upstream_responses_total", "acr_streamed_bytes_total", "acr_stale_answers_total",
                 "acr_upstream_backoff_seconds", "acr_credential_expiry_timestamp_seconds"):
        assert name in used, name


@pytest.mark.parametrize("expr, names", [
    ('sum by (reason) (rate(acr_x_total{instance=~"a|b", reason!="y"}[5m]))', {"acr_x_total"}),
    ("histogram_quantile(0.95, sum by (le, kind) (rate(acr_y_seconds_bucket[5m])))", {"acr_y_seconds_bucket"}),
    ("(acr_expiry_seconds - time()) < 600", {"acr_expiry_seconds"}),
    ('a / on(instance) group_left(x) b offset 1h > 1e3', {"a", "b"}),
    ('up{job="lifec-registry"} == 0', {"up"}),
])
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
