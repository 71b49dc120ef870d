"""The chart's alert rules: valid for promtool, and each one fired by a unit test."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.helm.chart import Tools, by_kind

UNIT_TESTS = Path(__file__).parent / "alerts.test.yaml"


def render_rules(tools: Tools, out: Path) -> list[str]:
    """The PrometheusRule's groups as a Prometheus rule file; returns the alert names."""
    rule = by_kind(tools.render("--set", "prometheusRule.enabled=true"), "PrometheusRule")[0]
    (out / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules_and_their_unit_tests_fire_every_alert(
    tools: Tools, tmp_path: Path
) -> None:
    alerts = render_rules(tools, tmp_path)
    assert set(alerts) == {
        "LLMTrainingJobFailed",
        "LLMTrainingJobRestartsClimbing",
        "LLMTrainingJobStalled",
        "LLMOperatorDown",
        "LLMOperatorReconcileErrors",
    }
    checked = tools.run("promtool", "check", "rules", str(tmp_path / "rules.yaml"))
    assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout

    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    tested = tools.run("promtool", "test", "rules", str(tmp_path / UNIT_TESTS.name), check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout

    # Coverage: an alert without a unit test that expects it to fire could be dead code.
    fired = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alerts)
