"""A bundle's CPU extension library: a real custom op, loaded from memory, never from disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.extensions.conftest import TASK, WEIGHTS, model_files
from workers.api import DeviceSettings, Request, no_progress
from workers.model_store import load_models

LIB = "libedge_test_ops.so"


@pytest.fixture(scope="module")
def library() -> bytes:
    from tests.extensions._build import build_extension

    return build_extension().read_bytes()


def _load(root: Path, ring):
    import openvino as ov

    return load_models([TASK], root, ring, ov.Core(), DeviceSettings("CPU"))


def _files_holding(data: bytes, *roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root, onerror=lambda _: None):
            for name in names:
                path = Path(dirpath) / name
                try:
                    if path.is_file() and path.stat().st_size == len(data) \
                            and path.read_bytes() == data:
                        found.append(path)
                except OSError:
                    continue
    return found


@pytest.mark.slow
def test_custom_op_from_an_encrypted_bundle_changes_the_numbers(pack, ring, exttest_task,
                                                                library, tmp_path):
    root = pack("addone", {**model_files(custom_op=True), LIB: library}, {"CPU": [LIB]})

    models = _load(root, ring)

    assert models.unavailable == {} and models.broken == {}
    x = [[0.0, 1.0, 2.0, 3.0]]
    response = models.handlers[TASK](Request(TASK, {"model": "addone", "x": x}), no_progress)
    np.testing.assert_allclose(response.result["y"], np.asarray(x) + 1 + WEIGHTS)
    # the library reached OpenVINO only as an anonymous memory file
    assert not _files_holding(library, root, Path(tempfile.gettempdir()), tmp_path)
    memfds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
              if _is_memfd_of(fd, LIB)]
    assert memfds, "the extension library is not held in a memfd"


def _is_memfd_of(fd: str, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name}")
    except OSError:
        return False


@pytest.mark.slow
def test_ir_naming_the_custom_op_is_unavailable_without_its_library(pack, ring, exttest_task):
    root = pack("nolib", model_files(custom_op=True))

    models = _load(root, ring)

    assert "CustomAddOne" in models.unavailable[TASK]


def test_garbage_library_makes_only_its_bundle_unavailable(pack, ring, exttest_task):
    pack("plain", model_files(custom_op=False))
    root = pack("badlib", {**model_files(custom_op=True), LIB: b"\x7fELF not really" * 64},
                {"CPU": [LIB]})

    models = _load(root, ring)

    assert models.models[TASK] == ("plain",)
    reason = models.broken[TASK]["badlib"]
    assert f"extension library {LIB!r} failed to load" in reason
    assert "ELF" in reason  # dlopen's own words say what is wrong with it
    assert "badlib" in models.broken_reason(TASK, "badlib")
    out = models.handlers[TASK](Request(TASK, {"model": "plain", "x": [[1, 1, 1, 1]]}),
                                no_progress)
    np.testing.assert_allclose(out.result["y"], 1 + WEIGHTS)


def test_malformed_extensions_setting_names_the_field(pack, ring, exttest_task):
    root = pack("badspec", model_files(custom_op=False), {"CPU": "libx.so"})

    models = _load(root, ring)

    assert "settings.extensions.CPU" in models.broken[TASK]["badspec"]
    assert TASK in models.unavailable


def test_library_missing_from_the_bundle_breaks_only_that_bundle(pack, ring, exttest_task):
    root = pack("nofile", model_files(custom_op=False), {"CPU": [LIB]})

    models = _load(root, ring)

    assert "missing" in models.broken[TASK]["nofile"]
