"""The documentation site builds with --strict (no broken link, anchor or nav entry), its
configuration reference is made from the config models and covers every key, and its runbook
has a section for every alert the chart installs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from outbox_relay.config import config_json_schema
from outbox_relay.config.reference import config_reference
from tests.docs.markdown_blocks import DOCS, ROOT

PROMETHEUS_RULE = ROOT / "helm" / "outbox-relay" / "templates" / "prometheusrule.yaml"
RUNBOOK = DOCS / "operations" / "alerts.md"


def test_the_site_builds_with_strict_checks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = ["build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", *build],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    configuration = (site / "configuration" / "index.html").read_text()
    assert "max_in_flight" in configuration, "the generated reference is missing from the page"
    assert "config-reference" not in configuration, "the marker was not replaced"


def test_the_configuration_reference_has_every_key_of_every_model() -> None:
    schema = config_json_schema()
    reference = config_reference(schema)
    sections = dict(re.findall(r"^### (\w+)\n(.*?)(?=^### |\Z)", reference, re.MULTILINE | re.DOTALL))
    models = {"RelayConfig": schema, **schema["$defs"]}
    assert set(sections) == set(models)
    for name, model in models.items():
        keys = set(re.findall(r"^\| `([^`]+)` \|", sections[name], re.MULTILINE))
        assert keys == set(model["properties"]), name


def test_the_configuration_reference_says_what_each_key_takes() -> None:
    reference = config_reference()
    assert "| `max_in_flight` | integer | `10000` |" in reference
    assert "| `shutdown_grace` | duration | `30s` |" in reference
    assert "| `on_poison` | `dead_letter` \\| `block` |" in reference
    assert "| `dsn` | string | **required** |" in reference


def test_every_alert_of_the_chart_has_a_runbook_section() -> None:
    alerts = re.findall(r"^\s*- alert: (\w+)\s*$", PROMETHEUS_RULE.read_text(), re.MULTILINE)
    sections = re.findall(r"^### (\w+)\s*$", RUNBOOK.read_text(), re.MULTILINE)
    assert len(alerts) >= 7
    assert sorted(alerts) == sorted(sections)


def test_the_test_servers_page_exists_for_the_nav() -> None:
    assert (DOCS / "test-servers.md").read_text().startswith("# Test servers\n")
