"""Prepared tokenizer folders (built once, cached in the user's prepare cache) and pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.api import DeviceSettings, FolderBundle
from workers.tokenize.prepare import SOURCES, prepare

NAMES = tuple(SOURCES)


@pytest.fixture(scope="session")
def prepared() -> dict[str, Path]:
    """Every tokenizer's prepared folder, by model name."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    folders = prepare(Path.home() / ".cache/edge-daemon/prepared")
    return {FolderBundle(f).name: f for f in folders}


@pytest.fixture(scope="session")
def core():
    """An OpenVINO core kept to two threads: the test machine is shared."""
    import openvino as ov

    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": 2})
    return core


@pytest.fixture(scope="session")
def handler(prepared, core):
    """The task handler with all three tokenizers, loaded as the worker loads them."""
    from workers.tokenize import load

    return load([FolderBundle(p) for p in prepared.values()], core, DeviceSettings("CPU"))
