"""The chart's alert rules under Prometheus' own rule engine: `promtool test rules` runs the unit
tests in tests/deploy/promtool/ (one file per alert) against the rules exactly as Helm renders
them, and every alert of the chart needs a case where it fires and one where it stays silent."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.monitoring import (
    PROMTOOL_TESTS,
    RULES_FILE,
    alert_names,
    binary,
    rule_groups,
    write_rules_file,
)

FIRES, SILENT = "fires", "stays silent"


def _test_files() -> list[Path]:
    return sorted(PROMTOOL_TESTS.glob("*.yaml"))


def _checks(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(test name, alert_rule_test entry) of one promtool test file."""
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return [(test["name"], check) for test in loaded["tests"] for check in test.get("alert_rule_test", [])]


def _fires(check: dict[str, Any]) -> bool:
    """A firing case names the labels and annotations of every alert it expects."""
    expected = check.get("exp_alerts") or []
    return bool(expected) and all(a.get("exp_labels") and a.get("exp_annotations") for a in expected)


def _cases() -> dict[str, dict[str, list[str]]]:
    """alert name -> {FIRES: [where], SILENT: [where]} over every promtool test file."""
    cases: dict[str, dict[str, list[str]]] = defaultdict(lambda: {FIRES: [], SILENT: []})
    for path in _test_files():
        for name, check in _checks(path):
            where = f"{path.name}: {name} @ {check['eval_time']}"
            kind = SILENT if not check.get("exp_alerts") else FIRES if _fires(check) else None
            if kind is not None:
                cases[check["alertname"]][kind].append(where)
    return cases


def _promtool_test(directory: Path, rules: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """The test files next to the rendered rules file they name, then `promtool test rules`."""
    write_rules_file(directory, rules)
    names = []
    for path in _test_files():
        shutil.copy(path, directory / path.name)
        names.append(path.name)
    return subprocess.run(
        [binary("promtool"), "test", "rules", *names],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_alert_of_the_chart_has_a_case_where_it_fires_and_one_where_it_stays_silent() -> None:
    alerts = alert_names(rule_groups())
    cases = _cases()
    missing = [
        f"{alert}: no case where it {kind}"
        for alert in sorted(alerts)
        for kind in (FIRES, SILENT)
        if not cases[alert][kind]
    ]
    assert missing == [], "every alert needs both kinds of promtool case in tests/deploy/promtool/"
    assert set(cases) <= alerts, f"cases for alerts the chart does not have: {set(cases) - alerts}"


def test_each_promtool_file_reads_the_rendered_rules_file() -> None:
    for path in _test_files():
        loaded = yaml.safe_load(path.read_text())
        assert loaded["rule_files"] == [RULES_FILE], path.name


def test_promtool_passes_every_alert_test_against_the_rendered_rules(tmp_path: Path) -> None:
    rules = rule_groups()
    checked = subprocess.run(
        [binary("promtool"), "check", "rules", str(write_rules_file(tmp_path, rules))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = _promtool_test(tmp_path, rules)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # promtool only warns about a rules file it cannot find, and then tests nothing.
    assert "WARNING" not in output, output
    assert output.count("SUCCESS") == len(_test_files()), output


def test_promtool_fails_when_a_threshold_moves_past_the_cases(tmp_path: Path) -> None:
    """The cases pin the chart's defaults: a lag threshold of 450s no longer fires at a lag of 400s."""
    result = _promtool_test(tmp_path, rule_groups({"prometheusRule": {"enabled": True, "lagSeconds": 450}}))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "alertname: OutboxRelayLagHigh" in output, output
    assert output.count("FAILED") == 1, output
