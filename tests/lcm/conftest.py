"""Fixtures for the lcm task: the prepared tiny bundle, its diffusers reference, our pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PREPARED = Path.home() / ".cache/edge-daemon/prepared"
# f32 so that parity with torch is exact to rounding (the CPU plugin defaults to bf16 here)
F32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}


@pytest.fixture(scope="session")
def lcm_folder() -> Path:
    """The plaintext `lcm-tiny` bundle folder (prepared once, then reused across runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    from workers.lcm.prepare import prepare

    (folder,) = prepare(PREPARED)
    return folder


@pytest.fixture(scope="session")
def reference(lcm_folder: Path):
    """diffusers' LatentConsistencyModelPipeline on the weights the IRs were exported from."""
    from diffusers import LatentConsistencyModelPipeline

    from workers.lcm.prepare import reference_dir

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        reference_dir(PREPARED), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def core():
    import openvino as ov

    return ov.Core()


@pytest.fixture(scope="session")
def pipeline(lcm_folder: Path, core):
    """Our LCMPipeline, f32, read through the bundle interface."""
    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    return LCMPipeline.load(FolderBundle(lcm_folder), core, DeviceSettings("CPU", F32))


@pytest.fixture(scope="session")
def handler(lcm_folder: Path, core):
    """The task handler as a worker builds it (default bf16 hint: what a device runs)."""
    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import load

    return load([FolderBundle(lcm_folder)], core, DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2}))
