"""What each task's bundle.json holds: one declarative table per task, checked at pack and
verify time (`edgectl bundle pack|verify`, `edgectl prepare`) so that a hand-made bundle is
refused with the key's path (`settings.files.encoder: missing`) instead of failing when a
worker loads it. docs/bundle.md is the prose of these tables: keep the two together.

Keys a table does not list are allowed (a task may add settings before its table does); a
listed key that is required and absent, or of the wrong type, is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Key:
    """One bundle.json key: its type, whether it must be there, what it means."""

    kind: str  # str int number bool list dict | file (a file of the bundle) | ir (an .xml
    #            and its .bin) | files / irs (a dict whose values are files / IRs)
    meaning: str
    required: bool = True


def _opt(kind: str, meaning: str) -> Key:
    return Key(kind, meaning, required=False)


COMMON: dict[str, Key] = {
    "name": Key("str", "the model's name: requests say model=name (letters, digits, . _ -)"),
    "task": Key("str", "the bundle task: asr, superres, lcm or tokenize"),
    "version": Key("str", "the version: <bundle_dir>/<task>--<name>/<version>/"),
    "settings": Key("dict", "the task's pipeline settings (below)"),
    "created": _opt("str", "when the bundle was prepared (informative)"),
    "settings.extensions": _opt("dict", "custom-op libraries / GPU kernels per device "
                                        "(workers/extensions.py)"),
}

ASR: dict[str, Key] = {
    "settings.multilingual": Key("bool", "whether the prompt carries a language and a task"),
    "settings.languages": _opt("list", "the language codes the model knows"),
    "settings.lang_to_id": Key("dict", "language code -> its token id"),
    "settings.sample_rate": Key("int", "audio rate the features are computed at (Hz)"),
    "settings.n_fft": Key("int", "FFT size of the log-mel features"),
    "settings.hop_length": Key("int", "hop between feature frames (samples)"),
    "settings.n_mels": Key("int", "mel bins (80, or 128 for large-v3)"),
    "settings.window_seconds": Key("number", "seconds of audio per encoder window (30)"),
    "settings.max_audio_seconds": Key("number", "longest clip accepted"),
    "settings.max_target_positions": Key("int", "decoder context length (448)"),
    "settings.tokens": Key("dict", "special token ids: eot, sot, translate, transcribe, "
                                   "startofprev, nospeech, notimestamps, timestamp_begin"),
    "settings.tokens.eot": Key("int", "end of text"),
    "settings.tokens.sot": Key("int", "start of transcript"),
    "settings.tokens.notimestamps": Key("int", "no-timestamps token"),
    "settings.tokens.timestamp_begin": Key("int", "id of <|0.00|>"),
    "settings.suppress_tokens": Key("list", "ids never generated"),
    "settings.begin_suppress_tokens": Key("list", "ids not generated first"),
    "settings.max_initial_timestamp_index": Key("int", "latest first timestamp (in steps)"),
    "settings.time_precision": _opt("number", "seconds per timestamp step (0.02)"),
    "settings.weight_format": _opt("str", "fp32, fp16, int8... (informative)"),
    "settings.files": Key("dict", "the model's files"),
    "settings.files.encoder": Key("ir", "encoder IR"),
    "settings.files.decoder": Key("ir", "stateful decoder IR (KV cache as state)"),
    "settings.files.vocab": Key("file", "JSON list: token id -> token text"),
    "settings.files.tokenizer": _opt("ir", "openvino-tokenizers IR for initial_prompt"),
}

SUPERRES_FAST: dict[str, Key] = {
    "settings.mode": _opt("str", "fast (this table) or quality"),
    "settings.xml": _opt("ir", "the SR network (default sr_fast_x4.xml)"),
    "settings.scale": _opt("int", "upscale factor (informative)"),
    "settings.tile": _opt("int", "tile side for large images"),
    "settings.warm_up_height": _opt("int", "warm-up input height at load"),
    "settings.warm_up_width": _opt("int", "warm-up input width at load"),
}

SUPERRES_QUALITY: dict[str, Key] = {
    "settings.mode": Key("str", "quality"),
    "settings.unet": Key("ir", "LDM-SR UNet"),
    "settings.decoder": Key("ir", "VQ-VAE decoder"),
    "settings.codebook": Key("file", "VQ codebook (.npy, looked up in f32)"),
    "settings.scheduler": Key("file", "diffusers scheduler_config.json"),
    "settings.multiple": _opt("int", "input sides are padded to a multiple of this (32)"),
    "settings.max_input_pixels": _opt("int", "largest input accepted (pixels)"),
}

LCM: dict[str, Key] = {
    "settings.scheduler": Key("dict", "diffusers LCMScheduler config"),
    "settings.latent_channels": Key("int", "UNet input channels"),
    "settings.vae_scale_factor": Key("int", "pixels per latent (8)"),
    "settings.scaling_factor": Key("number", "VAE latent scaling factor"),
    "settings.size_multiple": _opt("int", "width/height must be multiples of this"),
    "settings.default_width": Key("int", "image width without a width param"),
    "settings.default_height": Key("int", "image height without a height param"),
    "settings.max_side": _opt("int", "largest width/height (1024)"),
    "settings.time_cond_proj_dim": Key("int", "guidance embedding size of the UNet"),
    "settings.max_tokens": Key("int", "CLIP context length (77)"),
    "settings.bos_token_id": _opt("int", "CLIP start token"),
    "settings.eos_token_id": Key("int", "CLIP end token"),
    "settings.pad_token_id": Key("int", "CLIP padding token"),
    "settings.files": Key("dict", "the model's files"),
    "settings.files.tokenizer": Key("ir", "CLIP tokenizer IR (openvino-tokenizers)"),
    "settings.files.text_encoder": Key("ir", "CLIP text encoder IR"),
    "settings.files.unet": Key("ir", "UNet IR"),
    "settings.files.vae_decoder": Key("ir", "VAE decoder IR"),
    "settings.loras": _opt("files", "LoRA name -> its safetensors file (lora= param)"),
    "settings.unet_precision": _opt("str", "fp32 or int8 (informative)"),
    "settings.int8": _opt("list", "components quantized to INT8 (informative)"),
}

TOKENIZE: dict[str, Key] = {
    "settings.tokenizer": Key("files", '"true"/"false" (add_special_tokens) -> tokenizer IR'),
    "settings.detokenizer": Key("files", '"true"/"false" (skip_special_tokens) -> '
                                         "detokenizer IR"),
    "settings.vocab_size": Key("int", "ids at or past this are refused"),
    "settings.ascii_tokenizer": _opt("files", "the same IRs without Unicode normalisation, "
                                              "for all-ASCII batches"),
    "settings.preprocess": _opt("list", "Python steps before the IR (nfc, lower, bert_clean)"),
    "settings.ascii_preprocess": _opt("list", "the same for the ASCII IRs"),
    "settings.postprocess": _opt("list", "Python steps after decoding (strip)"),
    "settings.special_tokens": _opt("list", "special token strings stripped from input text"),
    "settings.max_length": _opt("int", "longest id list (truncation)"),
    "settings.truncate_in_pipeline": _opt("bool", "truncate in Python, not in the IR"),
    "settings.special_suffix_fix": _opt("dict", "ids the IR appends after special ids, dropped"),
    "settings.files": _opt("list", "every file of the tokenizer (informative)"),
}

# bundle task -> (setting that picks a table, its value when absent, value -> table)
SCHEMAS: dict[str, tuple[str, str, dict[str, dict[str, Key]]]] = {
    "asr": ("", "", {"": ASR}),
    "superres": ("mode", "fast", {"fast": SUPERRES_FAST, "quality": SUPERRES_QUALITY}),
    "lcm": ("", "", {"": LCM}),
    "tokenize": ("", "", {"": TOKENIZE}),
}

# How a request without `model` picks among a task's models when the config names no
# default: (request param, bundle setting, the setting's value when absent). superres models
# are of one mode each, and the request's mode must match.
SELECTORS: dict[str, tuple[str, str, str]] = {"superres": ("mode", "mode", "fast")}

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "number": (int, float), "bool": (bool,), "list": (list,),
    "dict": (dict,), "file": (str,), "ir": (str,), "files": (dict,), "irs": (dict,)}


def table(manifest: Mapping[str, Any]) -> dict[str, Key]:
    """Every key the manifest's task (and mode) defines, common keys first."""
    task = str(manifest.get("task", ""))
    if task not in SCHEMAS:
        return dict(COMMON)
    setting, absent, tables = SCHEMAS[task]
    value = str((manifest.get("settings") or {}).get(setting, absent)) if setting else ""
    if value not in tables:
        raise ValueError(f"settings.{setting}: {value!r} is not one of {', '.join(tables)}")
    return {**COMMON, **tables[value]}


def problems(manifest: Mapping[str, Any]) -> list[str]:
    """What is wrong with a manifest, one `key.path: why` per problem ([] when nothing)."""
    task = manifest.get("task")
    if task not in SCHEMAS:
        return [f"task: {task!r} is not one of {', '.join(SCHEMAS)}"]
    try:
        keys = table(manifest)
    except ValueError as exc:
        return [str(exc)]
    files = set(manifest.get("files") or ())
    out = []
    for path, key in keys.items():
        found, value = _lookup(manifest, path)
        if not found or (value is None and not key.required):
            if key.required:
                out.append(f"{path}: missing")
            continue
        if not isinstance(value, _TYPES[key.kind]) or (
                key.kind in ("int", "number") and isinstance(value, bool)):
            out.append(f"{path}: must be {key.kind}, not {type(value).__name__}")
            continue
        names: list[Any] = list(value.values()) if isinstance(value, dict) else [value]
        if key.kind in ("file", "ir", "files", "irs") and files:
            for name in names:
                out += [f"{path}: {n!r} is not a file of the bundle"
                        for n in _needs(name, key.kind) if n not in files]
    return out


def _needs(name: Any, kind: str) -> list[str]:
    if not isinstance(name, str):
        return [repr(name)]
    if kind in ("ir", "irs", "files") and name.endswith(".xml"):
        return [name, name[: -len(".xml")] + ".bin"]
    return [name]


def _lookup(manifest: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = manifest
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(manifest: dict[str, Any]) -> None:
    """BundleError naming every bad key (registered with keys.bundle.add_manifest_check)."""
    from keys.errors import BundleError

    found = problems(manifest)
    if found:
        raise BundleError(f"bundle.json of {manifest.get('task')}--{manifest.get('name')}: "
                          + "; ".join(found))


def default_candidates(task: str, names: Sequence[str], manifests: Mapping[str, Mapping[str, Any]],
                       params: Mapping[str, Any]) -> list[str]:
    """The models (first installed first) that may answer a request of job `task` naming none."""
    from edge.tasks import TASKS, bundle_task

    selector = SELECTORS.get(bundle_task(task))
    if selector is None:
        return list(names)
    param, setting, absent = selector
    spec = TASKS[task].params.get(param)
    want = params.get(param, spec.default if spec is not None else absent)
    return [n for n in names
            if str((manifests[n].get("settings") or {}).get(setting, absent)) == want]


_INTRO = """# bundle.json: every key, per task

Generated from `workers/schema.py` (`python -m workers.schema > docs/bundle.md`); a test keeps
the two equal. `edgectl bundle pack`, `edgectl bundle verify` and `edgectl prepare` check a
manifest against these tables and refuse it with the key's path, e.g.
`settings.files.encoder: missing` or `settings.n_mels: must be int, not str`. Keys not listed
are allowed; an optional key may also be `null`.

Types: `str`, `int`, `number` (int or float), `bool`, `list`, `dict`; `file` is the name of a
file of the bundle; `ir` an OpenVINO IR `.xml` of the bundle whose `.bin` is beside it;
`files` a dict whose values are files (IRs when they end in `.xml`).

Packing adds `format` ("edge-bundle/1") and `files` (every file, sorted); every file's header
binds the digest of the whole manifest, so an edit after packing is refused when opened.
Folders: `<bundle_dir>/<task>--<name>/<version>/` (README, "Model versions").
"""


def markdown() -> str:
    """docs/bundle.md: the tables above as prose."""
    out = [_INTRO]
    sections = [("All tasks", COMMON)]
    for task, (setting, _, tables) in SCHEMAS.items():
        for value, keys in tables.items():
            title = f"`{task}`" + (f" (`settings.{setting}` = `{value}`)" if setting else "")
            sections.append((title, keys))
    for title, keys in sections:
        out += [f"## {title}", "", "| key | type | required | meaning |", "|---|---|---|---|"]
        out += [f"| `{path}` | {k.kind} | {'yes' if k.required else 'no'} | {k.meaning} |"
                for path, k in keys.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
