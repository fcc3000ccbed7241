"""Several workers of one device: `--device CPU:2`, `[devices.CPU] threads`, their metrics ports,
and `edgectl install-units --instance` (issue 18)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import ConfigError, WorkerInstance, parse
from edgectl import units

TASKS = {"tokenize": {"devices": ["GPU", "CPU"]}}
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.parametrize("spec, device, number, label", [
    ("CPU", "CPU", 1, "CPU"),
    ("CPU:1", "CPU", 1, "CPU"),
    ("CPU:2", "CPU", 2, "CPU:2"),
    ("GPU.1:3", "GPU.1", 3, "GPU.1:3"),
    ("NPU:64", "NPU", 64, "NPU:64"),
])
def test_device_with_a_worker_number_names_the_device_and_the_worker(spec, device, number,
                                                                     label):
    inst = WorkerInstance.parse(spec)
    assert (inst.device, inst.number, inst.label) == (device, number, label)


@pytest.mark.parametrize("spec", ["CPU:0", "CPU:", "CPU:x", "CPU:02", "CPU:65", "TPU:2",
                                  "CPU:2:3", "cpu:2", ":2"])
def test_a_bad_worker_spec_is_refused(spec):
    with pytest.raises(ValueError, match="CPU:2|1..64"):
        WorkerInstance.parse(spec)


def test_edge_worker_refuses_a_bad_device_before_reading_anything(capsys):
    from workers.worker import main

    with pytest.raises(SystemExit) as exit_:
        main(["--device", "CPU:0", "--config", "/nonexistent.toml"])
    assert exit_.value.code == 2
    assert "'CPU:0': the worker number after ':' must be 1..64" in capsys.readouterr().err


def test_threads_become_inference_num_threads():
    cfg = parse({"tasks": TASKS, "devices": {"CPU": {"threads": 1}}})
    assert cfg.device("CPU").properties() == {"PERFORMANCE_HINT": "LATENCY",
                                              "INFERENCE_NUM_THREADS": 1}


def test_without_threads_the_compile_properties_are_unchanged():
    assert parse({"tasks": TASKS}).device("CPU").properties() == {"PERFORMANCE_HINT": "LATENCY"}
    cfg = parse({"tasks": TASKS, "devices": {"CPU": {"num_streams": 2}}})
    assert "INFERENCE_NUM_THREADS" not in cfg.device("CPU").properties()


@pytest.mark.parametrize("devices, message", [
    ({"CPU": {"threads": 0}}, "devices.CPU.threads: 0 is out of range"),
    ({"CPU": {"threads": "2"}}, "devices.CPU.threads: must be an integer"),
    ({"GPU": {"threads": 2}}, "devices.GPU.threads: only a CPU takes threads"),
])
def test_a_bad_threads_setting_is_refused_with_its_path(devices, message):
    with pytest.raises(ConfigError, match=message):
        parse({"tasks": TASKS, "devices": devices})


def test_further_workers_take_the_ports_after_every_first_worker():
    cfg = parse({"metrics_port": 9100, "tasks": TASKS})  # devices CPU, GPU: n = 2
    workers = [WorkerInstance.parse(s) for s in ("CPU", "GPU", "CPU:2", "GPU:2", "CPU:3")]
    ports = {w.label: cfg.worker_metrics_port(w.device, w.number) for w in workers}
    assert ports == {"CPU": 9101, "GPU": 9102, "CPU:2": 9103, "GPU:2": 9104, "CPU:3": 9105}
    assert cfg.worker_metrics_port("CPU") == cfg.worker_metrics_port("CPU", 1) == 9101


def test_a_device_port_of_its_own_counts_up_per_worker_and_zero_stays_off():
    cfg = parse({"metrics_port": 9100, "tasks": TASKS,
                 "devices": {"CPU": {"metrics_port": 9200}, "GPU": {"metrics_port": 0}}})
    assert [cfg.worker_metrics_port("CPU", k) for k in (1, 2, 3)] == [9200, 9201, 9202]
    assert cfg.worker_metrics_port("GPU", 2) == 0
    assert parse({"tasks": TASKS}).worker_metrics_port("CPU", 5) == 0


def test_a_worker_port_past_65535_is_refused():
    cfg = parse({"metrics_port": 65530, "tasks": TASKS})
    with pytest.raises(ConfigError, match="CPU:4: its metrics port 65537 is past 65535"):
        cfg.worker_metrics_port("CPU", 4)


def test_install_units_links_the_gpu_drop_ins_for_a_second_gpu_worker(tmp_path):
    written = units.install(tmp_path, bindir=Path("/x/bin"), instances=["GPU:2", "CPU:2"])
    etc = tmp_path / "etc/systemd/system"
    link = etc / "edge-worker@GPU:2.service.d/gpu.conf"
    assert link in written and link.is_symlink()
    assert link.readlink() == Path("../edge-worker@GPU.service.d/gpu.conf")
    assert link.read_text() == (etc / "edge-worker@GPU.service.d/gpu.conf").read_text()
    # the CPU has no drop-in; instance 1 is the device's own folder
    assert not (etc / "edge-worker@CPU:2.service.d").exists()
    assert units.link_drop_ins(etc, WorkerInstance("GPU")) == []


def test_install_units_refuses_a_bad_instance(tmp_path, capsys):
    from edgectl.cli import main

    assert main(["install-units", "--root", str(tmp_path), "--instance", "GPU:0"]) == 2
    assert "'GPU:0'" in capsys.readouterr().err


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
def test_systemd_sees_the_gpu_drop_in_on_the_second_gpu_worker_only_through_the_link(tmp_path):
    def security(root: Path, unit: str) -> str:
        return subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager",
                               f"--root={root}", unit], capture_output=True, text=True).stdout

    plain, linked = tmp_path / "plain", tmp_path / "linked"
    units.install(plain, bindir=Path("/x/bin"))
    units.install(linked, bindir=Path("/x/bin"), instances=["GPU:2"])
    assert "renderD128" not in security(plain, "edge-worker@GPU:2.service")
    assert "/dev/dri/renderD128:rw" in security(linked, "edge-worker@GPU:2.service")
    assert "renderD128" not in security(linked, "edge-worker@CPU:2.service")


def test_top_scrapes_every_worker_the_status_shows_on_its_own_port():
    from edgectl.top import worker_ports

    cfg = parse({"metrics_port": 9100, "tasks": TASKS})
    status = {"workers": {"h-CPU-1": {"instance": "CPU"}, "h-CPU:2-2": {"instance": "CPU:2"},
                          "old": {"device": "GPU"}, "odd": {"instance": "CPU:0"}}}
    assert worker_ports(cfg, status) == {"CPU": 9101, "GPU": 9102, "CPU:2": 9103}
    assert worker_ports(cfg) == {"CPU": 9101, "GPU": 9102}
