"""Decrypted weights do not linger: RSS after loading an encrypted IR, against its weights size.

A fresh process (so nothing else's heap is counted) opens a bundle holding one 64 MiB f32
Constant, loads it with `workers.api.read_ir` and compiles it, the way every task does. What
the process may keep is the plugin's compiled copy of the weights (1x). What it must not keep is
the decrypted buffer (`Bundle.read`'s bytearray): had it leaked, growth would be one more 1x.

`read_ir` decrypts straight into an `ov.Tensor` that OpenVINO allocates, so there is no buffer
of ours at all. Measured on OpenVINO 2026.4 CPU, growth is still ~2x for this MatMul: the
compiled model keeps the original Constants (that tensor) beside the plugin's repacked weights
(deleting the `ov.Model` frees nothing; deleting the compiled model frees both). That second
copy is OpenVINO's, not a leak of ours; sharing a buffer of ours instead of letting OpenVINO own
it was measured to give wrong answers once Python freed the buffer (a Gather read freed memory).
So the bound asserted is < 2.5x: one more decrypted copy kept anywhere would make it >= 3x.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgectl.localdaemon import ROOT
from keys import Keyring, pack_bundle

pytestmark = pytest.mark.slow

N = 4096  # N x N f32 = 64 MiB: large against the interpreter's own noise, quick to compile
WEIGHTS = N * N * 4

_CHILD = """
import gc, json, sys
from pathlib import Path
import numpy as np, openvino as ov
from openvino import opset13 as ops
import keys
from workers.api import read_ir

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

core = ov.Core()
# Warm the CPU plugin on a tiny model first, so that its code and pools are not counted.
p = ops.parameter([1, 8], np.float32)
core.compile_model(ov.Model([ops.matmul(p, ops.constant(np.ones((8, 8), np.float32)),
                                        False, False)], [p]), "CPU")
bundle = keys.Bundle.open(Path(sys.argv[1]), keys.Keyring.load_file(Path(sys.argv[2])))
gc.collect()
base = status("VmRSS")
compiled = core.compile_model(read_ir(core, bundle, "big.xml"), "CPU")
gc.collect()
loaded = status("VmRSS")
out = compiled.create_infer_request().infer({0: np.ones((1, %d), np.float32)})[0]
print(json.dumps({"growth": loaded - base, "peak": status("VmHWM") - base,
                  "finite": bool(np.isfinite(out).all())}))
""" % N


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    import openvino as ov
    from openvino import opset13 as ops

    tmp = tmp_path_factory.mktemp("rss")
    src = tmp / "src"
    src.mkdir()
    weights = np.random.default_rng(0).standard_normal((N, N), dtype=np.float32)
    x = ops.parameter([1, N], np.float32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(weights), False, False)], [x], "big")
    ov.save_model(model, src / "big.xml", compress_to_fp16=False)
    del model, weights
    assert (src / "big.bin").stat().st_size == WEIGHTS
    (src / "bundle.json").write_text(json.dumps({"name": "big", "task": "test", "version": "1"}))
    ring = Keyring.generate()
    ring.save(tmp / "ring.json")
    bundle = pack_bundle(src, tmp / "bundles", ring)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), str(tmp / "ring.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["finite"]
    return doc


def test_decrypted_weights_buffer_is_dropped_after_compile(measured):
    ratio = measured["growth"] / WEIGHTS
    # >= 1x: the compiled model must hold its weights (else the measurement measured nothing).
    assert 0.9 < ratio < 2.5, measured
