"""`edgectl prepare asr --from PATH`: the user's Whisper checkpoint -> a prepared folder.

    folder = prepare_from(Path("~/models/whisper-base-ct2"), cache_dir, name=None,
                          version="1", force=False, options={})

The layout is detected by the files present (`checkpoint.LAYOUTS`): a CTranslate2 folder
(faster-whisper's) is rebuilt as a Hugging Face checkpoint and exported; a Hugging Face folder
is exported (optimum-intel, stateful decoder with past); an optimum-intel OpenVINO export is
checked and copied. All three then get the same model card (`bundle.json`), read from the
checkpoint alone, and are loaded by the real `WhisperPipeline` and run on a short clip before
the folder is published: a folder that would not serve is never returned.

Options (`--option K=V`): `weight_format=fp16|fp32|int8` for the export (default fp16; an
OpenVINO source keeps its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from workers.asr import checkpoint
from workers.asr.checkpoint import CheckpointError
from workers.prepared import building

MAX_AUDIO_SECONDS = 1800  # 30 min: a job past this is refused before any inference
IR_FILES = ("openvino_encoder_model.xml", "openvino_decoder_model.xml")
_WEIGHT_FORMATS = ("fp16", "fp32", "int8")
# what an OpenVINO source contributes besides its IRs (our vocab.json is written afterwards)
_OV_EXTRAS = ("config.json", "generation_config.json", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "merges.txt", "normalizer.json", "openvino_tokenizer.xml",
              "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin")
CHECK_SENTENCE = "Hello, this is a short test of the speech model."
log = structlog.get_logger("workers.asr.prepare")


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False,
                 options: Mapping[str, str] = {}) -> Path:  # noqa: B006 (read-only)
    """Prepare `source` (CT2, HF or OpenVINO Whisper folder) as `cache_dir/<name>/`.

    Reuses an up-to-date folder of the same source, version and options unless `force`.
    Raises `CheckpointError` naming what was expected when `source` is not usable.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = Path(source).expanduser()
    layout = checkpoint.detect(source)
    name = name or default_name(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise CheckpointError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    weight_format = options.get("weight_format", "fp16")
    if weight_format not in _WEIGHT_FORMATS:
        raise CheckpointError(f"weight_format {weight_format!r}: one of {_WEIGHT_FORMATS}")
    folder = Path(cache_dir) / name
    stamp = _fingerprint(source, layout, version, weight_format)
    if not force and _up_to_date(folder, stamp):
        return folder
    log.info("asr_prepare", source=str(source), layout=layout, name=name)
    with building(folder) as tmp:
        if layout == checkpoint.CT2:
            from workers.asr import ct2

            with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
                ct2.build_hf(source, Path(work))
                export(Path(work), tmp, weight_format)
        elif layout == checkpoint.HF:
            export(source, tmp, weight_format)
        else:
            weight_format = _copy_openvino(source, tmp)
        write_card(tmp, name=name, version=version, weight_format=weight_format,
                   source={"layout": layout, "fingerprint": stamp})
        check(tmp)
    return folder


def default_name(source: Path) -> str:
    """The model name a folder suggests: its own name, or the repository name of a Hugging
    Face cache snapshot (`models--org--name/snapshots/<hash>`)."""
    path = Path(source).resolve()
    base = path.name
    if re.fullmatch(r"[0-9a-f]{40}", base) and path.parent.name == "snapshots":
        base = path.parent.parent.name.split("--")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")
    return name or "whisper"


def export(hf_dir: Path, out: Path, weight_format: str) -> None:
    """optimum-intel export of an HF Whisper folder: encoder + stateful decoder with past."""
    # A subprocess keeps optimum's imports and the traced model out of the caller's memory.
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
           "--model", str(hf_dir), "--task", "automatic-speech-recognition-with-past",
           "--weight-format", weight_format, str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not all((out / f).is_file() for f in IR_FILES):
        raise RuntimeError(f"optimum export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    _ensure_preprocessor(hf_dir, out)


def convert_hf(hf_dir: Path, folder: Path, *, name: str, weight_format: str = "fp16") -> Path:
    """Export an HF Whisper folder and write its prepared folder (no clip check: for tests of
    checkpoints too small to say anything)."""
    with building(Path(folder)) as tmp:
        export(hf_dir, tmp, weight_format)
        write_card(tmp, name=name, version="1", weight_format=weight_format,
                   source={"layout": checkpoint.HF})
    return Path(folder)


def _ensure_preprocessor(src: Path, out: Path) -> None:
    # transformers 5 saves processor_config.json; openvino.genai reads preprocessor_config.json
    if (out / "preprocessor_config.json").exists():
        return
    if (src / "preprocessor_config.json").exists():
        shutil.copy(src / "preprocessor_config.json", out / "preprocessor_config.json")
        return
    from transformers import WhisperFeatureExtractor

    mels = json.loads((out / "config.json").read_text())["num_mel_bins"]
    WhisperFeatureExtractor(feature_size=mels).save_pretrained(out)


def _copy_openvino(source: Path, out: Path) -> str:
    """Check an optimum-intel export (stateful decoder with past) and copy what serves it."""
    import openvino as ov

    core = ov.Core()
    decoder = core.read_model(source / IR_FILES[1])
    inputs = {n for port in decoder.inputs for n in port.get_names()}
    outputs = {n for port in decoder.outputs for n in port.get_names()}
    want = {"input_ids", "encoder_hidden_states", "beam_idx"}
    if not want <= inputs or "logits" not in outputs or not decoder.get_sinks():
        raise CheckpointError(
            f"{source / IR_FILES[1]} is not a stateful decoder with past (inputs "
            f"{sorted(inputs)[:6]}): export with optimum-cli export openvino --task "
            "automatic-speech-recognition-with-past (stateful, the default)")
    for xml in IR_FILES:
        for part in (xml, xml.replace(".xml", ".bin")):
            shutil.copy(source / part, out / part)
    for extra in _OV_EXTRAS:
        if (source / extra).is_file():
            shutil.copy(source / extra, out / extra)
    if not (out / "tokenizer.json").is_file():  # slow-tokenizer files only: save a fast one
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        (out / "vocab.json").unlink(missing_ok=True)  # ours (the decode table) comes later
    _ensure_preprocessor(source, out)
    # the weights' type as saved (read_model would report the decompressed f32 constants)
    xml = (source / IR_FILES[0]).read_text("utf-8")
    types = set(re.findall(r'type="Const"[^>]*>\s*<data element_type="(\w+)"', xml))
    return "int8" if types & {"i8", "u8", "i4", "u4"} else "fp16" if "f16" in types else "fp32"


def write_card(folder: Path, *, name: str, version: str, weight_format: str,
               source: Mapping[str, Any]) -> None:
    """`bundle.json` and `vocab.json` of a prepared folder, read from its own configs and
    tokenizer (the same for every layout)."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type", "whisper") != "whisper":
        raise CheckpointError(f"config.json model_type is {config['model_type']!r}, not whisper")
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    features = json.loads((folder / "preprocessor_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = int(config["vocab_size"])
    vocab = list(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size)))))
    ids = checkpoint.special_ids(vocab, gen)
    if len(vocab) < vocab_size and vocab[-1] == checkpoint.SPECIAL["notimestamps"][0]:
        vocab += checkpoint.timestamp_tokens(vocab_size - len(vocab))  # an old HF tokenizer
    if len(vocab) != vocab_size:
        raise CheckpointError(f"the tokenizer has {len(vocab)} tokens, the model {vocab_size}")
    ts_begin, _, precision = checkpoint.timestamps(vocab, ids["notimestamps"])
    multilingual = checkpoint.is_multilingual(vocab_size, gen)
    langs = checkpoint.languages(vocab, ids, gen.get("lang_to_id")) if multilingual else {}
    suppress = gen.get("suppress_tokens") or config.get("suppress_tokens") or []
    begin = gen.get("begin_suppress_tokens") or config.get("begin_suppress_tokens") or []
    # tokens that are never text: what faster-whisper adds to every suppress list
    never = [ids[k] for k in ("sot", "translate", "transcribe", "startoflm", "startofprev",
                              "nospeech")]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    files = {"encoder": IR_FILES[0], "decoder": IR_FILES[1], "vocab": "vocab.json"}
    if (folder / "openvino_tokenizer.xml").is_file():
        files["tokenizer"] = "openvino_tokenizer.xml"
    settings = {
        "multilingual": multilingual, "languages": sorted(langs) or ["en"], "lang_to_id": langs,
        "sample_rate": features["sampling_rate"], "n_fft": features["n_fft"],
        "hop_length": features["hop_length"], "n_mels": features["feature_size"],
        "window_seconds": features["chunk_length"], "max_audio_seconds": MAX_AUDIO_SECONDS,
        "max_target_positions": config["max_target_positions"],
        "tokens": {k: v for k, v in ids.items() if k != "startoflm"} | {
            "timestamp_begin": ts_begin},
        "suppress_tokens": sorted(set(suppress) | set(never)),
        "begin_suppress_tokens": list(begin),
        "max_initial_timestamp_index": gen.get("max_initial_timestamp_index", 50),
        "time_precision": precision, "weight_format": weight_format, "files": files,
    }
    card = {"name": name, "task": "asr", "version": version, "settings": settings,
            "source": dict(source)}
    (folder / "bundle.json").write_text(json.dumps(card, indent=1))


def check(folder: Path) -> None:
    """Load `folder` with the real pipeline and transcribe a short clip once; CheckpointError
    when it does not load or run."""
    import openvino as ov

    from workers.api import FolderBundle
    from workers.asr.pipeline import WhisperPipeline

    audio = _check_clip()
    try:
        pipeline = WhisperPipeline.load(FolderBundle(folder), ov.Core())
        result = pipeline(audio)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"the prepared model does not run in WhisperPipeline: "
                              f"{type(exc).__name__}: {exc}") from exc
    log.info("asr_prepare_checked", text=result.text, language=result.language,
             expected=CHECK_SENTENCE)


def _check_clip() -> Any:
    """A spoken sentence (espeak-ng) when the host has it, else a 2 s tone sweep."""
    import numpy as np

    from workers.asr.audio import decode

    if shutil.which("espeak-ng"):
        with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", wav.name, CHECK_SENTENCE],
                           check=True)
            return decode(Path(wav.name).read_bytes())
    t = np.arange(32000, dtype=np.float32) / 16000
    return (0.1 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def _fingerprint(source: Path, layout: str, version: str, weight_format: str) -> str:
    """Changes when the source's files (names, sizes, times) or the options change."""
    digest = hashlib.sha256(f"{layout}\0{version}\0{weight_format}".encode())
    for path in sorted(p for p in Path(source).resolve().iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _up_to_date(folder: Path, stamp: str) -> bool:
    if not (folder / "bundle.json").is_file() or not all(
            (folder / f).is_file() and (folder / f.replace(".xml", ".bin")).is_file()
            for f in IR_FILES):
        return False
    card = json.loads((folder / "bundle.json").read_text())
    # a folder from before fingerprints (the demo's) is reused as before
    return card.get("source", {}).get("fingerprint", stamp) == stamp
