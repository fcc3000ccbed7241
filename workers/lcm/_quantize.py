"""Build-host only: INT8 UNet with NNCF, calibrated on the pipeline's own UNet inputs.

MIXED preset (symmetric weights, asymmetric activations), transformer model type (keeps
attention softmax/matmul patterns in higher precision), bias correction off (it shifts a
diffusion UNet's outputs across timesteps). The calibration set is every UNet call of the fp32
pipeline over a few prompts, seeds, step counts and the default size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in the snow, photo",
            "portrait of an astronaut, oil painting", "a bowl of fruit on a table",
            "city street at night in the rain", "")


class _Recorder:
    """Stands in for a compiled UNet: records each call's inputs, then runs the real one."""

    def __init__(self, compiled: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self._compiled, self._sink = compiled, sink

    def create_infer_request(self) -> _Recorder:
        self._request = self._compiled.create_infer_request()
        return self

    def infer(self, inputs: dict[str, np.ndarray]) -> Any:
        self._sink.append({k: np.array(v) for k, v in inputs.items()})
        return self._request.infer(inputs)


def calibration_inputs(bundle_dir: Path, samples: int = 48) -> list[dict[str, np.ndarray]]:
    """UNet inputs seen while the fp32 pipeline generates from a few prompts and seeds."""
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm.pipeline import LCMPipeline

    pipe = LCMPipeline.load(FolderBundle(bundle_dir), ov.Core(), DeviceSettings("CPU"))
    compiled_unet = pipe._compiled_unet
    sink: list[dict[str, np.ndarray]] = []
    pipe._compiled_unet = lambda *a: _Recorder(compiled_unet(*a), sink)  # type: ignore[method-assign]
    seed = 0
    while len(sink) < samples:
        for prompt in _PROMPTS:
            pipe(prompt, steps=(2, 4, 8)[seed % 3], seed=seed)
            seed += 1
    return sink[:samples]


def quantize_unet(bundle_dir: Path, samples: int = 48) -> None:
    """Replace `bundle_dir/unet.xml/.bin` with its INT8 version (the rest must be in place)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    data = calibration_inputs(bundle_dir, samples)
    model = ov.Core().read_model(str(bundle_dir / "unet.xml"))
    quantized = nncf.quantize(
        model, nncf.Dataset(data), preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data),
        advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True))
    tmp = bundle_dir / "unet.int8.xml"
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    del model
    tmp.replace(bundle_dir / "unet.xml")
    tmp.with_suffix(".bin").replace(bundle_dir / "unet.bin")
