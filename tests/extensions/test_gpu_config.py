"""A bundle's GPU kernels: the CONFIG_FILE plumbing, checked against a Core that records calls
(no GPU here). The config and kernels reach the plugin as real paths in a private directory on
a RAM file system (the plugin realpath()s the config and reads kernels beside it), never on a
disk."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edge.config import Config
from tests.extensions.conftest import TASK, model_files
from workers.api import DeviceSettings
from workers.extensions import (
    ExtensionError,
    fs_type,
    gpu_config_text,
    kernel_file,
    remove_kernel_dir,
    require_ram_fs,
)
from workers.model_store import load_models

ROOT = Path(__file__).resolve().parents[2]

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


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch):
    """Each test starts without a kernel directory, with RUNTIME_DIRECTORY set to a fresh 0700
    directory on /dev/shm (tmpfs) standing in for systemd's RuntimeDirectory=, and leaves
    nothing behind."""
    path = tempfile.mkdtemp(prefix="edge-test-run-", dir="/dev/shm")
    monkeypatch.setenv("RUNTIME_DIRECTORY", path)
    remove_kernel_dir()
    yield path
    remove_kernel_dir()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shm_dir():
    """A throwaway directory on /dev/shm (tmpfs), standing in for systemd's RuntimeDirectory."""
    path = tempfile.mkdtemp(prefix="edge-test-run-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _load(root, ring, core, device):
    return load_models([TASK], root, ring, core, DeviceSettings(device))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stat_fs_type(path) -> str:
    """The file system type as coreutils' stat sees it: an oracle independent of fs_type."""
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _kernel_as_the_plugin_opens_it(config_path: str, filename: str) -> str:
    # custom_layer.cpp: realpath(CONFIG_FILE), then "<its directory>/" + <Source filename>
    return os.path.dirname(os.path.realpath(config_path)) + "/" + filename


def _config_file(core: RecordingCore) -> str:
    [(device, props)] = core.properties
    assert device.startswith("GPU") and set(props) == {"CONFIG_FILE"}
    return props["CONFIG_FILE"]


def test_gpu_worker_sets_config_file_to_a_real_path_in_a_private_ram_dir(gpu_bundle, ring,
                                                                          exttest_task,
                                                                          runtime_dir):
    exttest_task["compile"] = False
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "GPU")

    assert models.broken == {} and TASK in models.handlers
    config_path = _config_file(core)
    # a real path: what the plugin's realpath() gives back is the path itself
    assert os.path.isabs(config_path) and os.path.realpath(config_path) == config_path
    directory = os.path.dirname(config_path)
    assert os.path.dirname(directory) == os.path.realpath(runtime_dir)  # $RUNTIME_DIRECTORY
    assert _stat_fs_type(directory) == "tmpfs"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.stat(directory).st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(config_path).st_mode) == 0o600
    config = ET.fromstring(_read(config_path))
    [source] = config.iter("Source")
    filename = source.get("filename")
    assert "/" not in filename  # beside the config, whatever the bundle's folder was
    kernel_path = _kernel_as_the_plugin_opens_it(config_path, filename)
    assert os.path.isfile(kernel_path) and _read(kernel_path) == KERNEL
    assert stat.S_IMODE(os.stat(kernel_path).st_mode) == 0o600
    assert sorted(os.listdir(directory)) == sorted([os.path.basename(config_path), filename])
    # everything else in the config is as packed
    assert config.find("Kernel").get("entry") == "add_one"
    assert config.find("WorkSizes").get("global") == "X,Y,B*F"


def _gpu_kernel_dirs() -> set[str]:
    """Every kernel directory this code could have made in the usual RAM places."""
    found = set()
    for base in ("/dev/shm", "/run", tempfile.gettempdir()):
        try:
            found |= {os.path.join(base, n) for n in os.listdir(base)
                      if n.startswith("gpu-kernels-")}
        except OSError:
            pass
    return found


def test_gpu_kernels_are_refused_without_a_runtime_directory(gpu_bundle, ring, exttest_task,
                                                             monkeypatch):
    # Outside the unit there is no private runtime directory: the bundle with GPU kernels is
    # refused with a clear reason, nothing is written anywhere, and other bundles still load.
    exttest_task["compile"] = False
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    root = gpu_bundle()
    gpu_bundle("plain", ext=None)
    before = _gpu_kernel_dirs()
    core = RecordingCore()

    models = _load(root, ring, core, "GPU")

    reason = models.broken[TASK]["gpuop"]
    assert "RUNTIME_DIRECTORY is not set" in reason and "RuntimeDirectory=" in reason
    assert TASK in models.handlers  # the bundle without kernels serves
    assert core.properties == [] and _gpu_kernel_dirs() == before
    with pytest.raises(ExtensionError, match="RUNTIME_DIRECTORY is not set"):
        kernel_file("k.cl", KERNEL)


def test_cpu_worker_needs_no_runtime_directory(gpu_bundle, ring, exttest_task, monkeypatch):
    exttest_task["compile"] = False
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "CPU")

    assert models.broken == {} and core.properties == []


def test_runtime_directory_others_may_enter_is_refused(gpu_bundle, ring, exttest_task,
                                                       runtime_dir):
    exttest_task["compile"] = False
    os.chmod(runtime_dir, 0o755)
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "GPU")

    assert "not private" in models.broken[TASK]["gpuop"]
    assert core.properties == [] and os.listdir(runtime_dir) == []


def test_runtime_directory_on_a_disk_is_refused_and_nothing_is_written(gpu_bundle, ring,
                                                                       exttest_task, monkeypatch,
                                                                       tmp_path):
    if _stat_fs_type(tmp_path) in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is on a RAM file system here: no disk to refuse")
    exttest_task["compile"] = False
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    core = RecordingCore()

    models = _load(gpu_bundle(), ring, core, "GPU")

    reason = models.broken[TASK]["gpuop"]
    assert "not a RAM file system" in reason and str(run) in reason
    assert core.properties == [] and list(run.iterdir()) == []


def test_only_a_ram_file_system_is_accepted(tmp_path):
    require_ram_fs("/dev/shm")  # tmpfs: accepted
    if _stat_fs_type(tmp_path) in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is on a RAM file system here: no disk to refuse")
    with pytest.raises(ExtensionError, match="not a RAM file system"):
        require_ram_fs(tmp_path)


def test_fs_type_takes_the_innermost_top_mount_and_reads_escaped_spaces():
    mountinfo = "\n".join([
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
        "60 27 0:50 / /run rw,nosuid shared:12 master:3 - tmpfs tmpfs rw,mode=755",
        "61 60 0:51 / /run/my\\040disk rw,relatime shared:13 - ext4 /dev/vdb rw",
        "62 27 0:52 / /srv/data rw - xfs /dev/vdc rw",
        "63 62 0:53 / /srv/data rw - ramfs none rw",  # stacked on top of the xfs
        "garbage line without the separator",
    ])

    assert fs_type("/run/edge-worker-GPU/x", mountinfo) == "tmpfs"
    assert fs_type("/run/my disk/x", mountinfo) == "ext4"
    assert fs_type("/run/my", mountinfo) == "tmpfs"  # a prefix of a mount point is not inside it
    assert fs_type("/srv/data/k", mountinfo) == "ramfs"
    assert fs_type("/srv/database", mountinfo) == "ext4"
    assert fs_type("/", mountinfo) == "ext4"


def test_modes_hold_whatever_the_umask(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()
    old = os.umask(0o277)  # would leave a directory its owner cannot write and 0400 files
    try:
        models = _load(gpu_bundle(), ring, core, "GPU")
    finally:
        os.umask(old)

    assert models.broken == {}
    config_path = _config_file(core)
    assert stat.S_IMODE(os.stat(os.path.dirname(config_path)).st_mode) == 0o700
    for name in os.listdir(os.path.dirname(config_path)):
        path = os.path.join(os.path.dirname(config_path), name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name


def test_reload_with_the_same_kernels_reuses_their_files(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    root = gpu_bundle()
    first, second = RecordingCore(), RecordingCore()

    _load(root, ring, first, "GPU")
    _load(root, ring, second, "GPU")  # a reload: new Core, same bundles

    assert _config_file(first) == _config_file(second)
    assert len(os.listdir(os.path.dirname(_config_file(second)))) == 2


def test_reload_with_changed_kernels_removes_the_old_files(gpu_bundle, ring, exttest_task,
                                                           monkeypatch):
    """The worker's reload swaps in models compiled with new kernels, then removes the files
    only the old models used (they were read when those compiled)."""
    from workers import perform, worker

    exttest_task["compile"] = False
    root = gpu_bundle()
    first = RecordingCore()
    old_models = _load(root, ring, first, "GPU")
    shutil.rmtree(root)
    gpu_bundle(extra={"kernels/add_one.cl": KERNEL.replace(b"1.0f", b"2.0f")})
    second = RecordingCore()
    new_models = _load(root, ring, second, "GPU")
    kernel_dir = os.path.dirname(_config_file(second))
    assert len(os.listdir(kernel_dir)) == 4 and old_models.kernel_files.isdisjoint(
        new_models.kernel_files)

    monkeypatch.setattr(worker, "load_ring", lambda config: ring)
    monkeypatch.setattr(worker, "build_models", lambda config, device, ring: new_models)
    runtime = perform.Runtime("w", "GPU", old_models)
    assert worker.Reloader(Config(), "GPU", runtime).reload()

    assert runtime.models is new_models
    assert sorted(os.path.join(kernel_dir, f) for f in os.listdir(kernel_dir)) == sorted(
        new_models.kernel_files)
    assert os.path.exists(_config_file(second)) and not os.path.exists(_config_file(first))


def test_clean_up_removes_the_kernel_files_and_their_directory(gpu_bundle, ring, exttest_task):
    exttest_task["compile"] = False
    core = RecordingCore()
    _load(gpu_bundle(), ring, core, "GPU")
    config_path = _config_file(core)
    [source] = ET.fromstring(_read(config_path)).iter("Source")
    kernel_path = _kernel_as_the_plugin_opens_it(config_path, source.get("filename"))

    remove_kernel_dir()

    assert not os.path.exists(config_path) and not os.path.exists(kernel_path)
    assert not os.path.exists(os.path.dirname(config_path))


def test_worker_process_exit_removes_the_kernel_directory(shm_dir):
    probe = ("from workers.extensions import kernel_file\n"
             "print('PATH=' + kernel_file('kernels/add_one.cl', b'__kernel void k() {}'))\n")
    env = {**os.environ, "RUNTIME_DIRECTORY": shm_dir}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)

    assert out.returncode == 0, out.stderr[-2000:]
    [path] = [ln[5:] for ln in out.stdout.splitlines() if ln.startswith("PATH=")]
    assert path.startswith(os.path.realpath(shm_dir) + "/") and path.endswith("-add_one.cl")
    assert not os.path.exists(path) and os.listdir(shm_dir) == []


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
