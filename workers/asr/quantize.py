"""INT8 version of a prepared Whisper folder (build host only, NNCF).

The encoder gets post-training quantization (weights and activations INT8): NNCF's
transformer recipe with SmoothQuant alpha 0.5, calibrated on the mel windows our pipeline
feeds it while transcribing espeak-ng speech (other sentences than the tests use). The
stateful decoder gets INT8 weights only: NNCF's calibration graph does not run on it (see
`quantize_folder`). Measured on a CPU with AMX-bf16 (where the fp model runs bf16): 1.08-1.19x
the fp pipeline's speed, WER +0.4 points on the 82 s clip, equal on the short ones (weight-only
INT8 of both models: 1.0-1.08x); against the fp model in f32, as a CPU without bf16 runs it,
1.75-1.9x.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from workers.prepared import building

# calibration speech: other sentences than the test clips, several voices and speeds
CALIBRATION = (
    "The quarterly report shows that sales grew by twelve percent in the eastern region.",
    "Could you please remind me to call the dentist tomorrow at nine in the morning?",
    "Turn the heating down to nineteen degrees and close the garage door.",
    "In the beginning the project had only three people and a very small budget.",
    "We measured the vibration of the pump every hour during the night shift.",
    "My flight to Chicago was delayed because of the snow storm.",
    "The library opens at ten and closes early on Sundays.",
    "She said the new camera firmware fixed the problem with the night vision.",
    "Add milk, eggs, bread and two kilos of apples to the shopping list.",
    "The meeting is moved to Wednesday afternoon in the small conference room.",
    "Our customers asked for a simpler way to export their data.",
    "The river flooded the lower part of the town twice this year.",
)
VOICES = ("en-us", "en", "en-us+f3", "en+m3")


def quantize_folder(src: Path, out: Path, *, name: str) -> Path:
    """Write `out`: `src` (a prepared fp folder) with both IRs quantized to INT8."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    from workers.api import DeviceSettings, FolderBundle
    from workers.asr.pipeline import WhisperPipeline

    core = ov.Core()
    # f32 while collecting, so that calibration sees the model's own activations
    pipe = WhisperPipeline.load(FolderBundle(src), core,
                                DeviceSettings("CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    encoder_inputs: list[dict] = []
    pipe._encoder = _Recorder(pipe._encoder, encoder_inputs)
    for audio in _speech():
        pipe(audio)
    card = json.loads((src / "bundle.json").read_text())
    files = card["settings"]["files"]
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=0.5))
    with building(out) as tmp:
        encoder = nncf.quantize(core.read_model(src / files["encoder"]),
                                nncf.Dataset(encoder_inputs), subset_size=len(encoder_inputs),
                                model_type=nncf.ModelType.TRANSFORMER,
                                advanced_parameters=advanced)
        ov.save_model(encoder, tmp / files["encoder"])
        # the stateful decoder cannot be calibrated here: the CPU plugin refuses NNCF's
        # statistics graph ("ReadValueWithSubgraph ... StaticMemory", openvino 2026.4), so
        # its weights only are INT8 (half the bytes it reads per token)
        decoder = nncf.compress_weights(core.read_model(src / files["decoder"]),
                                        mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(decoder, tmp / files["decoder"])
        irs = {files[k][:-len(".xml")] + ext for k in ("encoder", "decoder")
               for ext in (".xml", ".bin")}
        for item in src.iterdir():
            if item.is_file() and item.name not in irs:
                shutil.copy(item, tmp / item.name)
        card["name"] = name
        card["settings"]["weight_format"] = "int8-ptq"
        card["settings"]["calibration"] = {"encoder_windows": len(encoder_inputs)}
        (tmp / "bundle.json").write_text(json.dumps(card, indent=1))
    return out


def _speech() -> list[np.ndarray]:
    from workers.asr.audio import decode

    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(CALIBRATION):
            path = Path(tmp) / f"{i}.wav"
            voice = VOICES[i % len(VOICES)]
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(150 + 15 * (i % 3)), "-w",
                            str(path), text], check=True)
            clips.append(decode(path.read_bytes()))
    return clips


class _Recorder:
    """An infer request that keeps a copy of its inputs at every run (for calibration)."""

    def __init__(self, request: Any, sink: list[dict]) -> None:
        self._request, self._sink = request, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    def start_async(self) -> None:
        self._sink.append({port.get_any_name(): self._request.get_tensor(port).data.copy()
                           for port in self._request.model_inputs})
        self._request.start_async()
