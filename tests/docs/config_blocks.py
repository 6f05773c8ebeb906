"""YAML blocks of the documentation, run as what they are: a relay config (or a part of one:
a `source:`, `sink:`, `lease:` ... section) through `outbox-relay check`, Helm values rendered
with the repository's chart (and the relay config in the rendered ConfigMap checked in turn), a
chart dependency compared with the chart it names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from click.testing import CliRunner

from outbox_relay.cli import cli
from tests.docs.markdown_blocks import ROOT

CHART = ROOT / "helm" / "outbox-relay"
#: The sections of one outbox: a block made of these alone is completed into a whole config.
OUTBOX_SECTIONS = {"source", "sink", "retry", "pipeline", "dead_letter", "lease"}
_BASE_OUTBOX: dict[str, Any] = {
    "name": "docs",
    "source": {"type": "postgres-polling", "dsn": "${DATABASE_URL}"},
    "sink": {"type": "stdout"},
}
#: Values for the ${VAR}s the documented configs use; any other variable gets "stand-in".
STAND_INS = {
    "DATABASE_URL": "postgresql://relay:stand-in@db.example:5432/app",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka.example:9092",
}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def chart_values_keys() -> set[str]:
    return set(yaml.safe_load((CHART / "values.yaml").read_text()))


def relay_check(config_text: str, tmp: Path) -> None:
    """`outbox-relay check -c FILE` in this process, with a stand-in for every ${VAR} used."""
    path = tmp / "relay.yaml"
    path.write_text(config_text)
    env = {name: STAND_INS.get(name, "stand-in") for name in _VARIABLE.findall(config_text)}
    result = CliRunner().invoke(cli, ["check", "-c", str(path)], env=env)
    assert result.exit_code == 0, f"outbox-relay check refused it:\n{result.output}"


def render_chart(values: dict[str, Any], tmp: Path) -> None:
    """Render the chart with these values (the chart's schema and its templates' own refusals
    apply), then check the relay config of the rendered ConfigMap."""
    with helm.Chart.load(str(CHART)) as loaded:
        files = loaded.render(values, name="docs", namespace="docs")
    for path, text in files.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "ConfigMap" and "relay.yaml" in doc.get("data", {}):
                relay_check(doc["data"]["relay.yaml"], tmp)


def check_dependency(document: dict[str, Any]) -> None:
    """A Chart.yaml's dependency on this chart names it with its current version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ours = [d for d in document["dependencies"] if d.get("name") == chart["name"]]
    assert ours, f"no dependency named {chart['name']}"
    for dependency in ours:
        assert dependency.get("version") == chart["version"], f"the chart's version is {chart['version']}"


def run_yaml(text: str, tmp: Path) -> str:
    """Exercise one YAML block; returns what it was taken for, or raises what is wrong."""
    document = yaml.safe_load(text)
    assert isinstance(document, dict), "a YAML block must be a mapping"
    keys = set(document)
    if "outboxes" in keys:
        relay_check(text, tmp)
        return "relay config"
    if keys <= OUTBOX_SECTIONS:
        relay_check(yaml.safe_dump({"outboxes": [{**_BASE_OUTBOX, **document}]}), tmp)
        return "part of a relay config"
    if keys == {"dependencies"}:
        check_dependency(document)
        return "chart dependency"
    if keys == {CHART.name}:
        render_chart(document[CHART.name], tmp)
        return "values of a parent chart"
    if keys <= chart_values_keys():
        render_chart(document, tmp)
        return "chart values"
    raise AssertionError(f"neither a relay config nor chart values: keys {sorted(keys)}")
