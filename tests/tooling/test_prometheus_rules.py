"""ops/prometheus: the alert rules and the example scrape config, checked with promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROM = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's `prometheus`")
    return subprocess.run([tool, *args], cwd=PROM, capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_are_valid():
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_example_scrape_config_is_valid_and_loads_the_rules():
    out = promtool("check", "config", "prometheus.example.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alerts.yml" in (PROM / "prometheus.example.yml").read_text()


def test_alert_unit_tests_pass():
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_alerts_operations_md_asks_for_are_all_there():
    assert set(alert_names()) >= {
        "EdgeOutboxStuck", "EdgeQueueWithoutWorker", "EdgeBusyRejections", "EdgeModelsNotReady",
        "EdgeAnswersRefused", "EdgeAgentDown", "EdgeWorkerDown", "EdgeRedisMemoryHigh",
        "EdgeOutboxGrowing"}


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in alert_names():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


def test_every_metric_the_rules_use_is_one_the_daemon_defines():
    from edge import metrics

    defined = {m.name for m in metrics.REGISTRY.collect()}
    for m in list(defined):
        defined |= {m + "_total", m + "_bucket", m + "_sum", m + "_count"}
    text = (PROM / "alerts.yml").read_text()
    used = set(re.findall(r"\b(edge_[a-z_]+)", text))
    assert used and used <= defined, used - defined
