"""What the worker's unit gives workers.extensions: a private tmpfs RuntimeDirectory (the only
place GPU kernels may be written) that the hardening leaves writable and systemd removes at
stop."""

from __future__ import annotations

from tests.ops.test_units import SYSTEMD, _settings


def test_gpu_worker_gets_a_private_runtime_directory_that_nothing_hides():
    worker = _settings(SYSTEMD / "edge-worker@.service")
    gpu = _settings(SYSTEMD / "edge-worker@GPU.service.d/gpu.conf")

    both = {k: worker.get(k, []) + gpu.get(k, []) for k in set(worker) | set(gpu)}
    # once, in the template: one per instance (GPU, GPU.1), mode 0700
    assert both["RuntimeDirectory"] == ["edge-worker-%i"]
    assert both["RuntimeDirectoryMode"] == ["0700"]
    assert "RuntimeDirectoryPreserve" not in both  # removed whenever the worker stops
    assert both["MemorySwapMax"] == ["0"]  # tmpfs pages never reach a swap device
    for key in ("ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindReadOnlyPaths"):
        for value in both.get(key, []):
            assert not any(p.lstrip("-+") in ("/", "/run", "/run/") for p in value.split()), (
                f"{key}={value} hides or freezes /run, where the GPU kernels are written")
