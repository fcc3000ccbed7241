"""The systemd units: exposure score, the settings the design relies on, the installer."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from edgectl import units

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0


def _settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    units.install(root, bindir=Path("/opt/edge/venv/bin"))
    return root


def test_install_units_writes_units_under_root_and_starts_nothing(tmp_path):
    written = units.install(tmp_path, bindir=Path("/srv/edge/bin"))
    etc = tmp_path / "etc/systemd/system"
    names = {p.relative_to(etc).as_posix() for p in written if etc in p.parents}
    assert {"edge-agent.service", "edge-worker@.service", "edge.target",
            "edge-key-rotation.service", "edge-key-rotation.timer",
            "edge-worker@GPU.service.d/gpu.conf"} <= names
    assert (tmp_path / "etc/sysusers.d/edge.conf").exists()
    agent = (etc / "edge-agent.service").read_text()
    assert "ExecStart=/srv/edge/bin/edge-agent --config /etc/edge/edge.toml" in agent
    assert "/opt/edge/bin/" not in agent
    # Nothing enabled: no .wants symlinks anywhere.
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink() or p.name.endswith(".wants")]


def test_edgectl_install_units_command(tmp_path):
    from edgectl.cli import main

    assert main(["install-units", "--root", str(tmp_path), "--bindir", "/x/bin"]) == 0
    assert "ExecStart=/x/bin/edge-worker --device %i" in (
        tmp_path / "etc/systemd/system/edge-worker@.service").read_text()


def test_units_are_notify_watchdogged_and_stop_warm():
    longest_job = max(t.get("timeout", 60) for t in tomllib.loads(
        (ROOT / "configs/edge.example.toml").read_text())["tasks"].values())
    for name in ("edge-agent.service", "edge-worker@.service"):
        s = _settings(SYSTEMD / name)
        assert s["Type"] == ["notify"] and s["KillMode"] == ["mixed"], name
        assert s["Restart"] == ["on-failure"] and "WatchdogSec" in s, name
        assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"], name
        assert s["MemorySwapMax"] == ["0"] and s["LimitCORE"] == ["0"], name
        assert s["CapabilityBoundingSet"] == [""], name
    worker = _settings(SYSTEMD / "edge-worker@.service")
    assert int(worker["TimeoutStopSec"][0]) > longest_job
    assert worker["LoadCredentialEncrypted"] == ["edge-keyring:/etc/edge/keyring.cred"]
    # OpenVINO's CPU plugin JIT-compiles kernels: W^X must stay off for workers.
    assert worker["MemoryDenyWriteExecute"] == ["no"]
    assert worker["PrivateDevices"] == ["yes"] and "DeviceAllow" not in worker
    gpu = _settings(SYSTEMD / "edge-worker@GPU.service.d/gpu.conf")
    assert gpu["DeviceAllow"] == ["/dev/dri/renderD128 rw"] and gpu["PrivateDevices"] == ["no"]


# Measured (docs/operations.md, "Memory limits"): the agent at rest, and a CPU worker with every
# demo bundle after one job of each task. Re-measure when the models or the runtime change.
AGENT_IDLE_RSS = 61 << 20
WORKER_DEMO_WARM_RSS = 531 << 20


def _bytes(value: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def test_both_units_cap_memory_above_what_their_bounds_let_them_reach():
    from edge.constants import DEFAULT_JOB_MEMORY, MAX_ANSWER_BYTES

    example = tomllib.loads((ROOT / "configs/edge.example.toml").read_text())
    largest_job = max(t["max_bytes"] for t in example["tasks"].values())
    job_memory = example.get("limits", {}).get("job_memory", DEFAULT_JOB_MEMORY)
    agent = _settings(SYSTEMD / "edge-agent.service")
    worker = _settings(SYSTEMD / "edge-worker@.service")
    for name, s in (("agent", agent), ("worker", worker)):
        assert len(s["MemoryHigh"]) == len(s["MemoryMax"]) == 1, name
        assert _bytes(s["MemoryHigh"][0]) < _bytes(s["MemoryMax"][0]), name
    # agent: a job message grows it by < 3x max_bytes; an answer of MAX_ANSWER_BYTES media is
    # held about 4 times over (bytes, base64, JSON, the packet) while it is published
    assert (_bytes(agent["MemoryHigh"][0])
            >= AGENT_IDLE_RSS + 3 * largest_job + 4 * MAX_ANSWER_BYTES)
    # worker: runtime + models (warm) + one job's budget, and a quarter of the warm RSS above
    assert _bytes(worker["MemoryHigh"][0]) >= WORKER_DEMO_WARM_RSS + job_memory
    assert (_bytes(worker["MemoryMax"][0])
            >= WORKER_DEMO_WARM_RSS + job_memory + WORKER_DEMO_WARM_RSS // 4)
    # the sizing table in the operations guide shows the values the units ship with
    docs = (ROOT / "docs/operations.md").read_text()
    for s in (agent, worker):
        for key in ("MemoryHigh", "MemoryMax"):
            assert f"{key}={s[key][0]}" in docs, key


def _exposure(*args: str) -> float:
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", *args],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr[-2000:]
    return float(match.group(1))


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
@pytest.mark.parametrize("unit", ["edge-agent.service", "edge-worker@CPU.service",
                                  "edge-worker@GPU.service"])
def test_systemd_analyze_exposure_is_at_most_2(installed, unit):
    # --root reads etc/systemd/system of the installed tree: the template serves the
    # instance, and the GPU drop-in applies to edge-worker@GPU.
    assert _exposure(f"--root={installed}", unit) <= MAX_EXPOSURE


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
def test_gpu_drop_in_is_what_systemd_analyze_sees(installed):
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager",
                          f"--root={installed}", "edge-worker@GPU.service"],
                         capture_output=True, text=True).stdout
    assert "/dev/dri/renderD128:rw" in out
    cpu = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager",
                          f"--root={installed}", "edge-worker@CPU.service"],
                         capture_output=True, text=True).stdout
    assert "renderD128" not in cpu


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_openvino_cpu_plugin_needs_writable_executable_memory(tmp_path):
    """Why workers run with MemoryDenyWriteExecute=no: compiling a MatMul on CPU mprotects
    anonymous memory PROT_WRITE|PROT_EXEC (oneDNN/xbyak JIT), which W^X would refuse."""
    import sys

    probe = ("import numpy as np, openvino as ov, openvino.opset13 as ops\n"
             "x = ops.parameter([1, 64], np.float32)\n"
             "w = ops.constant(np.ones((64, 64), np.float32))\n"
             "m = ov.Model([ops.relu(ops.matmul(x, w, False, False))], [x])\n"
             "ov.Core().compile_model(m, 'CPU')(np.ones((1, 64), np.float32))\n")
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=mprotect", "-o", str(trace),
                           sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rwx = [line for line in trace.read_text().splitlines()
           if "PROT_WRITE|PROT_EXEC" in line and "= 0" in line]
    assert rwx, "no RWX mapping seen: MemoryDenyWriteExecute=yes may now be possible"
