"""Bundles carrying extensions, and a throwaway task (`exttest`) that the worker's model store
loads the way it loads a real task: through `load_models`, `workers.<task>.load` and `read_ir`.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.tasks import TASKS, TaskSpec
from workers.api import Response, read_ir

TASK = "exttest"


def ir_xml(custom_op: bool) -> bytes:
    """x[1,4] -> (CustomAddOne of domain edge_test, if asked) -> + w -> y; w is 16 bytes of .bin."""
    dims = "<dim>1</dim><dim>4</dim>"
    port = lambda i: f'<port id="{i}" precision="FP32">{dims}</port>'  # noqa: E731
    custom = (f'<layer id="1" name="add_one" type="CustomAddOne" version="edge_test">'
              f'<input>{port(0)}</input><output>{port(1)}</output></layer>') if custom_op else ""
    into_add = ('<edge from-layer="0" from-port="0" to-layer="1" to-port="0"/>'
                '<edge from-layer="1" from-port="1" to-layer="3" to-port="0"/>') if custom_op \
        else '<edge from-layer="0" from-port="0" to-layer="3" to-port="0"/>'
    return f"""<?xml version="1.0"?>
<net name="exttest" version="11">
<layers>
<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1,4" element_type="f32"/>
<output>{port(0)}</output></layer>
{custom}
<layer id="2" name="w" type="Const" version="opset1">
<data element_type="f32" shape="1,4" offset="0" size="16"/><output>{port(0)}</output></layer>
<layer id="3" name="add" type="Add" version="opset1">
<input>{port(0)}{port(1)}</input><output>{port(2)}</output></layer>
<layer id="4" name="y" type="Result" version="opset1"><input>{port(0)}</input></layer>
</layers>
<edges>{into_add}
<edge from-layer="2" from-port="0" to-layer="3" to-port="1"/>
<edge from-layer="3" from-port="2" to-layer="4" to-port="0"/>
</edges>
</net>
""".encode()


WEIGHTS = np.array([[10, 20, 30, 40]], np.float32)


@pytest.fixture
def ring(keyring_file):
    import keys

    return keys.Keyring.load_file(keyring_file)


@pytest.fixture
def pack(tmp_path, ring):
    """`pack(name, files, extensions=None) -> bundle dir root`: an encrypted exttest bundle."""
    from keys.bundle import plain_source, write_bundle

    root = tmp_path / "bundles"

    def _pack(name: str, files: dict[str, bytes], extensions: dict | None = None) -> Path:
        manifest = {"name": name, "task": TASK, "version": "1",
                    "settings": {"extensions": extensions} if extensions else {}}
        write_bundle(manifest, {n: plain_source(d) for n, d in files.items()}, root, ring)
        return root

    return _pack


def model_files(custom_op: bool) -> dict[str, bytes]:
    return {"model.xml": ir_xml(custom_op), "model.bin": WEIGHTS.tobytes()}


@pytest.fixture
def exttest_task(monkeypatch):
    """Registers job task `exttest`; its `load` compiles each bundle's IR (or nothing, with
    `compile=False`, for a fake core) and its handler runs `params.model` on `params.x`."""
    state: dict[str, Any] = {"compile": True}

    def load(bundles, core, device):
        compiled = {b.name: core.compile_model(read_ir(core, b, "model.xml"), device.name)
                    for b in bundles} if state["compile"] else {}

        def handler(request, progress):
            x = np.asarray(request.params["x"], np.float32)
            return Response({"y": compiled[request.params["model"]]({0: x})[0].tolist()})
        return handler

    module = types.ModuleType(f"workers.{TASK}")
    module.load = load
    monkeypatch.setitem(sys.modules, f"workers.{TASK}", module)
    monkeypatch.setitem(TASKS, TASK, TaskSpec(TASK, inputs=("text",)))
    return state


def manifest_of(root: Path, name: str) -> dict:
    return json.loads((root / f"{TASK}--{name}" / "bundle.json").read_text())
