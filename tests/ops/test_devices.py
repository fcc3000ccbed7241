"""A worker started for a device this host does not have exits with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgectl.localdaemon import ROOT, write_config

pytestmark = pytest.mark.slow


def test_worker_for_an_absent_npu_exits_non_zero_and_says_why(tmp_path, keyring_file):
    import openvino as ov

    if any(d.startswith("NPU") for d in ov.Core().available_devices):
        pytest.skip("this host has an NPU")
    config = write_config(tmp_path / "edge.toml", node="t", mqtt_port=1, redis_url="redis://x",
                          bundle_dir=tmp_path, keyring_file=keyring_file,
                          tasks={"tokenize": {"devices": ["NPU", "CPU"]}})
    proc = subprocess.run([sys.executable, "-m", "workers.worker", "--device", "NPU",
                           "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "OpenVINO device 'NPU' is not present on this host (available: CPU" in proc.stderr
