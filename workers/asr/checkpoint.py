"""What a Whisper checkpoint says about itself: its layout, special tokens, languages, timestamps.

Build host only. Every id here is read from the checkpoint's own vocabulary and configs, never
assumed: English-only and multilingual vocabularies number their special tokens differently
(tiny.en's end-of-text is 50256, base's 50257), large-v3 adds a language, and the no-speech
token is `<|nocaptions|>` in older vocabularies, `<|nospeech|>` in newer ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CT2 = "ctranslate2"
HF = "transformers"
OPENVINO = "openvino"
LAYOUTS = {  # what each accepted layout must hold (README: "Use your own models -> asr")
    CT2: "model.bin + config.json + tokenizer.json (+ vocabulary.txt|vocabulary.json) "
         "(a CTranslate2 / faster-whisper Whisper folder, float16/float32 weights)",
    HF: "config.json (model_type whisper) + model.safetensors|pytorch_model.bin (sharded too) "
        "+ tokenizer.json or vocab.json+merges.txt (a Hugging Face Transformers Whisper folder)",
    OPENVINO: "openvino_encoder_model.xml/.bin + openvino_decoder_model.xml/.bin (stateful, "
              "with past) + config.json + tokenizer files (an optimum-intel OpenVINO export)",
}
# settings key -> accepted token texts, first found wins
SPECIAL = {
    "eot": ("<|endoftext|>",), "sot": ("<|startoftranscript|>",),
    "translate": ("<|translate|>",), "transcribe": ("<|transcribe|>",),
    "startoflm": ("<|startoflm|>",), "startofprev": ("<|startofprev|>",),
    "nospeech": ("<|nospeech|>", "<|nocaptions|>"), "notimestamps": ("<|notimestamps|>",),
}
# generation_config.json key -> the settings key it must agree with
_GENERATION_IDS = {"decoder_start_token_id": "sot", "no_timestamps_token_id": "notimestamps",
                   "prev_sot_token_id": "startofprev"}
_TIMESTAMP = re.compile(r"<\|(\d+\.\d+)\|>")
_LANGUAGE = re.compile(r"<\|([a-z]{2,3})\|>")  # en, haw, yue...
MULTILINGUAL_VOCAB = 51865  # Whisper's rule (openai, CTranslate2): fewer tokens = English-only


class CheckpointError(ValueError):
    """The folder is not a Whisper checkpoint this step can read; the message says why."""


def detect(source: Path) -> str:
    """Which accepted layout `source` is (CT2, HF, OPENVINO), by the files present."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a folder; expected one of:\n" + _expected())
    has = {p.name for p in source.iterdir()}
    if {"openvino_encoder_model.xml", "openvino_decoder_model.xml"} <= has:
        missing = [f for f in ("openvino_encoder_model.bin", "openvino_decoder_model.bin",
                               "config.json") if f not in has]
        return _require(source, OPENVINO, missing + _tokenizer_missing(has))
    if "model.bin" in has:
        missing = [f for f in ("config.json", "tokenizer.json") if f not in has]
        return _require(source, CT2, missing)
    weights = any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in has)
    if "config.json" in has and weights:
        return _require(source, HF, _tokenizer_missing(has))
    raise CheckpointError(f"{source} holds no Whisper checkpoint this step can read "
                          f"(found: {', '.join(sorted(has)[:12]) or 'nothing'}); expected one "
                          "of:\n" + _expected())


def _tokenizer_missing(has: set[str]) -> list[str]:
    if "tokenizer.json" in has or {"vocab.json", "merges.txt"} <= has:
        return []
    return ["tokenizer.json (or vocab.json + merges.txt)"]


def _require(source: Path, layout: str, missing: list[str]) -> str:
    if missing:
        raise CheckpointError(f"{source} looks like a {layout} Whisper folder but lacks "
                              f"{', '.join(missing)}; a {layout} folder holds {LAYOUTS[layout]}")
    return layout


def _expected() -> str:
    return "\n".join(f"  * {text}" for text in LAYOUTS.values())


def special_ids(vocab: Sequence[str], generation: Mapping[str, Any]) -> dict[str, int]:
    """Each special token's id, read from the vocabulary (id -> token text) and checked against
    the generation config's ids where it has them."""
    index = {tok: i for i, tok in enumerate(vocab)}
    ids: dict[str, int] = {}
    for key, texts in SPECIAL.items():
        found = next((index[t] for t in texts if t in index), None)
        if found is None:
            raise CheckpointError(f"the vocabulary lacks the special token {' or '.join(texts)}")
        ids[key] = found
    for field, key in _GENERATION_IDS.items():
        value = generation.get(field)
        if isinstance(value, int) and value != ids[key]:
            raise CheckpointError(f"generation_config {field}={value} but the vocabulary has "
                                  f"{SPECIAL[key][0]} at {ids[key]}")
    tasks = generation.get("task_to_id") or {}
    for task in ("translate", "transcribe"):
        if task in tasks and tasks[task] != ids[task]:
            raise CheckpointError(f"generation_config task_to_id[{task}]={tasks[task]} but the "
                                  f"vocabulary has <|{task}|> at {ids[task]}")
    return ids


def timestamps(vocab: Sequence[str], notimestamps: int) -> tuple[int, int, float]:
    """(first id, count, seconds per step) of the timestamp tokens `<|0.00|>`..`<|30.00|>`,
    which must follow `<|notimestamps|>` and end the vocabulary."""
    begin = notimestamps + 1
    times = []
    for i in range(begin, len(vocab)):
        match = _TIMESTAMP.fullmatch(vocab[i])
        if match is None:
            raise CheckpointError(f"token {i} ({vocab[i]!r}) after <|notimestamps|> is not a "
                                  "timestamp: the vocabulary must end with the timestamps")
        times.append(float(match.group(1)))
    if len(times) < 2 or times[0] != 0.0:
        raise CheckpointError(f"the vocabulary has {len(times)} timestamp tokens after "
                              "<|notimestamps|>; want <|0.00|>.. (1501 for 30 s)")
    precision = round(times[1] - times[0], 4)
    if any(abs(t - i * precision) > 1e-3 for i, t in enumerate(times)):
        raise CheckpointError("the timestamp tokens are not evenly spaced")
    return begin, len(times), precision


def timestamp_tokens(count: int, precision: float = 0.02) -> list[str]:
    """The texts of Whisper's timestamp tokens, for a vocabulary that lacks them."""
    return [f"<|{i * precision:.2f}|>" for i in range(count)]


def languages(vocab: Sequence[str], ids: Mapping[str, int],
              lang_to_id: Mapping[str, int] | None) -> dict[str, int]:
    """Language code -> token id: the checkpoint's own table when it has one (HF
    generation_config `lang_to_id`, CT2 config `lang_ids`), else the language tokens between
    `<|startoftranscript|>` and `<|translate|>`."""
    if lang_to_id:
        out = {}
        for token, i in lang_to_id.items():
            if not 0 <= i < len(vocab) or vocab[i] != token:
                raise CheckpointError(f"language {token} is id {i}, but the vocabulary has "
                                      f"{vocab[i] if 0 <= i < len(vocab) else 'nothing'} there")
            out[token.strip("<|>")] = i
        return out
    return {m.group(1): i for i in range(ids["sot"] + 1, ids["translate"])
            if (m := _LANGUAGE.fullmatch(vocab[i]))}


def is_multilingual(vocab_size: int, generation: Mapping[str, Any]) -> bool:
    """The generation config's word when it has one, else Whisper's vocabulary-size rule."""
    value = generation.get("is_multilingual")
    return bool(value) if value is not None else vocab_size >= MULTILINGUAL_VOCAB
