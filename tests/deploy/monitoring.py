"""What the Prometheus tests share: the chart's alert rules as Helm renders them (into a rules file
Prometheus and promtool read), the dashboard's queries, and Prometheus' own binaries."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from tests.deploy.support import CHART

RELEASE, NAMESPACE = "orders", "shop"
#: The job label a ServiceMonitor gives the release's series: the Service's name.
JOB = "orders-outbox-relay"
RULES_FILE = "outbox-relay-rules.yaml"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
DASHBOARD = CHART / "dashboards" / "outbox-relay.json"


def binary(name: str) -> str:
    """The path of `promtool` or `prometheus` (Debian's `prometheus` package has both)."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run tests/install-servers.sh (Debian package prometheus)")
    return found


def rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The PrometheusRule's groups, rendered with `prometheusRule.enabled` (and `values`)."""
    with helm.Chart.load(str(CHART)) as loaded:
        files = loaded.render(
            {"prometheusRule": {"enabled": True}, **(values or {})}, name=RELEASE, namespace=NAMESPACE
        )
    rule: dict[str, Any] = yaml.safe_load(files["outbox-relay/templates/prometheusrule.yaml"])
    assert rule["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def rules_text(groups: list[dict[str, Any]]) -> str:
    """The groups as a Prometheus rules file (what the Prometheus Operator makes of the CRD)."""
    return yaml.safe_dump({"groups": groups}, sort_keys=False)


def write_rules_file(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / RULES_FILE
    path.write_text(rules_text(groups))
    return path


def alert_names(groups: list[dict[str, Any]]) -> set[str]:
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL query of the dashboard: a panel's target, or a template variable's."""

    where: str  # "panel 3 (Lag) A" or "variable outbox"
    expr: str
    instant: bool = False  # a stat panel's value now, not a time series
    legend: str = ""  # the legendFormat, e.g. "{{outbox}} {{pod}}"
    title: str = ""  # the panel's


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries(board: dict[str, Any]) -> list[DashboardQuery]:
    return [
        DashboardQuery(
            f"panel {panel['id']} ({panel['title']}) {target.get('refId', '?')}",
            target["expr"],
            bool(target.get("instant", False)),
            target.get("legendFormat", ""),
            panel["title"],
        )
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def variable_queries(board: dict[str, Any]) -> list[DashboardQuery]:
    """The `label_values(...)` queries of the template variables of type query."""
    out: list[DashboardQuery] = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expr = query["query"] if isinstance(query, dict) else query
            out.append(DashboardQuery(f"variable {variable['name']}", expr))
    return out
