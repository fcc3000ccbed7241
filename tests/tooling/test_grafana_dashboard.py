"""ops/grafana/edge.json: importable, every query parses, every metric is one the daemons export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.tooling.conftest import get

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "edge.json"
# Grafana's variables, as an operator with the example scrape config would have them
VARIABLES = {"$__rate_interval": "1m", "$agent_job": "edge-agent", "$worker_job": "edge-worker"}
# Counters that get a series only after trouble (a limit reached, a broker refusal): the live
# daemon declares them (HELP/TYPE) but a healthy run gives them no sample.
ONLY_AFTER_TROUBLE = {"edge_busy_rejections", "edge_answers_refused"}
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_is_importable_json():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in d["templating"]["list"]}
    assert names == {"datasource", "agent_job", "worker_job"}
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def test_dashboard_covers_what_the_issue_asks_for():
    text = " ".join(queries())
    for metric in ("edge_jobs_total", "edge_job_queue_wait_seconds_bucket",
                   "edge_job_run_seconds_bucket", "edge_queue_depth", "edge_outbox_length",
                   "edge_outbox_oldest_pending_seconds", "edge_busy_rejections_total",
                   "edge_answers_refused_total", "edge_models_ready",
                   "process_resident_memory_bytes", "process_cpu_seconds_total",
                   "edge_device_jobs_total"):
        assert metric in text, metric


def test_every_query_parses_with_prometheus_own_parser(tmp_path):
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's `prometheus`")
    # promtool parses recording rules' expressions with Prometheus' PromQL parser
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": concrete(e)}
        for i, e in enumerate(queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries())} rules found" in out.stdout


def exported(port: int) -> tuple[set[str], set[str]]:
    """(families declared, families with at least one sample) on a live /metrics."""
    fams = list(text_string_to_metric_families(get(f"http://127.0.0.1:{port}/metrics").body))
    return {f.name for f in fams}, {f.name for f in fams if f.samples}


@pytest.mark.integration
@pytest.mark.slow
def test_every_metric_in_the_dashboard_is_exported_by_the_daemon_it_is_read_from(live):
    d, agent_port, worker_port = live
    with d.device("dev-dash") as dev:
        assert dev.request("tokenize", text="dashboards", request_id="dash-1",
                           params={"model": "all-minilm-l6-v2"}).ok
        assert not dev.request("nosuchtask", text="x", request_id="dash-2").ok
    d.wait_online()  # a fresh status round: queue gauges set
    procs = {"edge-agent": exported(agent_port), "edge-worker": exported(worker_port)}
    checked: set[str] = set()
    for expr in queries():
        for selector in re.finditer(r"\b([a-z_]+)\{([^}]*)\}", expr):
            name, labels = selector.groups()
            job = re.search(r'job=~"\$(agent|worker)_job"', labels)
            if name in ("up",) or job is None:
                continue
            declared, sampled = procs[f"edge-{job.group(1)}"]
            fam = family(name)
            assert fam in declared, f"{name} is not exported by the {job.group(1)}: {expr}"
            if fam not in ONLY_AFTER_TROUBLE:
                assert fam in sampled, f"{name} has no sample on the {job.group(1)}: {expr}"
            checked.add(name)
    # every daemon metric a query reads was looked up in the process its job selector names
    used = {m for e in queries() for m in re.findall(r"\b((?:edge|process)_[a-z_]+)\b", e)}
    assert used and used == checked, used - checked
