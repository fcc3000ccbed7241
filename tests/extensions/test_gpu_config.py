"""A bundle's GPU kernels: the CONFIG_FILE plumbing, checked against a Core that records calls
(no GPU here). The config and kernels reach the plugin as memfd paths, never as files."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from tests.extensions.conftest import TASK, model_files
from workers.api import DeviceSettings
from workers.extensions import ExtensionError, gpu_config_text
from workers.model_store import load_models

KERNEL = b"__kernel void add_one(const __global float* x, __global float* y) {\n" \
         b"    const uint i = get_global_id(0); y[i] = x[i] + 1.0f; }\n"
CONFIG = b"""<CustomLayer name="CustomAddOne" type="SimpleGPU" version="1">
  <Kernel entry="add_one"><Source filename="kernels/add_one.cl"/></Kernel>
  <Buffers><Tensor arg-index="0" type="input" port-index="0" format="BFYX"/>
           <Tensor arg-index="1" type="output" port-index="0" format="BFYX"/></Buffers>
  <WorkSizes global="X,Y,B*F"/>
</CustomLayer>
"""
GPU_EXT = {"GPU": {"config": "kernels/add_one.xml", "files": ["kernels/add_one.cl"]}}


class RecordingCore:
    """Stands in for `ov.Core`: records what extensions would be added and set."""

    def __init__(self) -> None:
        self.extensions: list[str] = []
        self.properties: list[tuple[str, dict]] = []

    def add_extension(self, path: str) -> None:
        self.extensions.append(path)

    def set_property(self, device: str, props: dict) -> None:
        self.properties.append((device, dict(props)))


@pytest.fixture
def gpu_bundle(pack):
    files = {**model_files(custom_op=False), "kernels/add_one.xml": CONFIG,
             "kernels/add_one.cl": KERNEL}
    return lambda name="gpuop", ext=GPU_EXT, extra=None: pack(name, {**files, **(extra or {})},
                                                               ext)


def _load(root, ring, core, device):
    return load_models([TASK], root, ring, core, DeviceSettings(device))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_gpu_worker_sets_config_file_pointing_at_memfd_kernels(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "GPU")

    assert models.broken == {} and TASK in models.handlers
    [(device, props)] = core.properties
    assert device == "GPU" and set(props) == {"CONFIG_FILE"}
    config_path = props["CONFIG_FILE"]
    assert config_path.startswith("/proc/self/fd/")
    assert os.readlink(config_path).startswith("/memfd:add_one.xml")
    config = ET.fromstring(_read(config_path))
    [source] = config.iter("Source")
    kernel_path = source.get("filename")
    assert kernel_path.startswith("/proc/self/fd/")
    assert os.readlink(kernel_path).startswith("/memfd:add_one.cl")
    assert _read(kernel_path) == KERNEL
    # everything else in the config is as packed
    assert config.find("Kernel").get("entry") == "add_one"
    assert config.find("WorkSizes").get("global") == "X,Y,B*F"


def test_cpu_worker_ignores_gpu_kernels(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "CPU")

    assert models.broken == {} and core.properties == [] and core.extensions == []


def test_library_shipped_by_two_bundles_is_added_once(pack, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()
    lib = {"libops.so": b"same library bytes"}
    pack("one", {**model_files(False), **lib}, {"CPU": ["libops.so"]})
    root = pack("two", {**model_files(False), **lib}, {"CPU": ["libops.so"]})

    models = _load(root, ring, core, "GPU.1")

    assert models.models[TASK] == ("one", "two")
    assert len(core.extensions) == 1 and core.extensions[0].startswith("/proc/self/fd/")
    assert _read(core.extensions[0]) == b"same library bytes"


def test_config_naming_a_kernel_outside_the_bundle_is_refused(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()
    bad = CONFIG.replace(b"kernels/add_one.cl", b"/etc/passwd")

    models = _load(gpu_bundle(extra={"kernels/add_one.xml": bad}), ring, core, "GPU")

    assert "'/etc/passwd'" in models.broken[TASK]["gpuop"]
    assert core.properties == []


def test_second_gpu_config_on_one_worker_breaks_that_bundle(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()
    gpu_bundle("first")
    other = CONFIG.replace(b'entry="add_one"', b'entry="add_one_v2"')
    root = gpu_bundle("second", extra={"kernels/add_one.xml": other})

    models = _load(root, ring, core, "GPU")

    assert models.models[TASK] == ("first",)
    assert "already set another one" in models.broken[TASK]["second"]
    assert len(core.properties) == 1


def test_config_that_is_not_xml_is_refused():
    with pytest.raises(ExtensionError, match="not XML"):
        gpu_config_text(b"<CustomLayer", {}, "k.xml")


def test_config_the_gpu_plugin_refuses_breaks_only_that_bundle(gpu_bundle, pack, ring,
                                                                exttest_task):
    exttest_task["compile"] = False

    class RefusingCore(RecordingCore):
        def set_property(self, device: str, props: dict) -> None:
            raise RuntimeError("Exception from src/plugins/intel_gpu/custom_layer.cpp:250:\n"
                               "Error loading custom layer configuration file: "
                               f"{props['CONFIG_FILE']}, Can't get canonicalized absolute "
                               "pathname.\n")

    pack("plain", model_files(False))
    models = _load(gpu_bundle(), ring, RefusingCore(), "GPU")

    assert models.models[TASK] == ("plain",)
    assert "Can't get canonicalized" in models.broken[TASK]["gpuop"]
