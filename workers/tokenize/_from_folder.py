"""Prepare a tokenize bundle from the user's own Hugging Face tokenizer folder.

Build host only. Accepts a folder with `tokenizer.json` (the `tokenizers` library's format) and
optionally `tokenizer_config.json` / `special_tokens_map.json`, or the `tokenizer.json` file
itself. The conversion is the built-in one (`prepare._convert`); what differs per tokenizer,
the text pre-processing that makes the IR agree with HF and the ASCII fast path, is read from
the tokenizer's own normalizer config (`plan_normalizer`), never from its name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.prepared import building
from workers.tokenize import prepare as _prep

_CONFIG_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
# transformers writes this for "no limit" (int(1e30)); anything this large is not a limit
_NO_LIMIT = 1_000_000

# CLIP's normalizer, as transformers writes it: what the ASCII tokenizer must be given instead
_CLIP_WHITESPACE = {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}


def plan_normalizer(normalizer: Mapping[str, Any] | None) -> tuple[tuple[str, ...],
                                                                   tuple[str, ...]]:
    """(preprocess, ascii_preprocess) for a tokenizer.json `normalizer`.

    preprocess: the Python steps (see `pipeline.PREPROCESS`) run before the IR, where the IR
    and HF are known to disagree: BERT's private-use characters, NFC, lower-casing (the IR
    case-folds). ascii_preprocess: what the normalization ops do to ASCII text, only for the
    normalizers whose effect on ASCII was verified against HF (BERT uncased, CLIP); empty =
    no ASCII fast path, every batch takes the full IR (correct, slower).
    """
    if not normalizer:
        return (), ()
    if normalizer.get("type") == "BertNormalizer":
        pre = (("bert_clean",) if normalizer.get("clean_text") else ()) + (
            ("lower",) if normalizer.get("lowercase") else ())
        verified = normalizer.get("clean_text") and normalizer.get("lowercase")
        return pre, ("ascii_bert_clean", "ascii_lower") if verified else ()
    steps = (list(normalizer.get("normalizers") or ()) if normalizer.get("type") == "Sequence"
             else [normalizer])
    kinds = [s.get("type") for s in steps]
    pre = (("nfc",) if "NFC" in kinds else ()) + (("lower",) if "Lowercase" in kinds else ())
    clip = (kinds == ["NFC", "Replace", "Lowercase"] and steps[1] == _CLIP_WHITESPACE)
    return pre, ("ascii_collapse_whitespace", "ascii_lower") if clip else ()


def tokenizer_file(source: Path) -> Path:
    """The tokenizer.json of a folder (or the file itself); `ValueError` if there is none."""
    source = Path(source)
    path = source if source.is_file() else source / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{source}: no tokenizer.json (a Hugging Face `tokenizers` file)")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text(encoding="utf-8"))
    return doc if isinstance(doc, dict) else {}


def _special_token_kwargs(folder: Path) -> dict[str, str]:
    """bos/eos/unk/... strings from special_tokens_map.json, then tokenizer_config.json."""
    out: dict[str, str] = {}
    for doc in (_read_json(folder / "tokenizer_config.json"),
                _read_json(folder / "special_tokens_map.json")):  # the map wins
        for key in _SPECIAL_KEYS:
            value = doc.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                out[key] = value
    return out


def max_length_of(path: Path, options: Mapping[str, str]) -> int | None:
    """Truncation length: `options["max_length"]`, else the tokenizer.json's own truncation."""
    if options.get("max_length"):
        return int(options["max_length"])
    truncation = _read_json(path).get("truncation") or {}
    limit = truncation.get("max_length") if isinstance(truncation, dict) else None
    return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def make_builder(path: Path, max_length: int | None) -> Any:
    """A function building the transformers fast tokenizer `convert_tokenizer` wants."""

    def build() -> Any:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # the pipeline returns unpadded rows
        tok.no_truncation()  # truncation is the IR's (or the pipeline's), set at conversion
        return PreTrainedTokenizerFast(tokenizer_object=tok,
                                       model_max_length=max_length or _NO_LIMIT,
                                       **_special_token_kwargs(path.parent))

    return build


def suffix_left_to_transformers(doc: Mapping[str, Any]) -> str | None:
    """The end-of-word suffix a tokenizer.json's own decoder leaves in the text, if any.

    CLIP's files pair a suffix BPE ("</w>") with a ByteLevel decoder that does not know the
    suffix: Rust `tokenizers` decodes "hello</w>world</w>", and transformers' CLIPTokenizer
    patches the backend's decode (suffix -> " ", then `str.strip()`). That patched decode is
    what every user of such a file sees, so it is the one the IR must match.
    """
    model = doc.get("model") or {}
    suffix = model.get("end_of_word_suffix")
    decoder = doc.get("decoder") or {}
    if model.get("type") == "BPE" and suffix and decoder.get("type") != "BPEDecoder":
        return str(suffix)
    return None


def reference(path: Path, max_length: int | None) -> Any:
    """The Hugging Face `tokenizers` tokenizer a folder prepared from `path` matches (its
    decode patched as transformers patches it, see `suffix_left_to_transformers`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    if max_length is not None:
        tok.enable_truncation(max_length)
    suffix = suffix_left_to_transformers(_read_json(path))
    if suffix is not None:
        plain = tok.decode

        def decode(*args: Any, **kwargs: Any) -> str:
            return str(plain(*args, **kwargs)).replace(suffix, " ").strip()

        tok.decode = decode  # transformers' own patch, on the same object
    return tok


def source_of(path: Path, name: str, options: Mapping[str, str]) -> _prep.Source:
    """The conversion recipe of one tokenizer.json, read from its own config."""
    doc = _read_json(path)
    preprocess, ascii_preprocess = plan_normalizer(doc.get("normalizer"))
    max_length = max_length_of(path, options)
    # a suffix-BPE (CLIP) IR emits junk ids after special tokens: the pipeline drops them
    # first, so it must truncate after that, not the IR
    suffix = (doc.get("model") or {}).get("end_of_word_suffix")
    postprocess = ("strip",) if suffix_left_to_transformers(doc) else ()
    return _prep.Source(name, make_builder(path, max_length), max_length, preprocess,
                        postprocess, truncate_in_pipeline=bool(suffix) and max_length is not None,
                        ascii_preprocess=ascii_preprocess)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    for file in _CONFIG_FILES:
        if (path.parent / file).is_file():
            sha.update(file.encode() + b"\0" + (path.parent / file).read_bytes())
    return sha.hexdigest()


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:  # noqa: B006
    """Convert a tokenizer.json folder into `cache_dir/tokenizer-<name>/`, checked by a run.

    name defaults to the folder's name. Options: `max_length` (truncate to this many ids;
    default: the tokenizer.json's own truncation, else none).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = tokenizer_file(source)
    name = name or (path.parent.name if Path(source).is_file() else Path(source).resolve().name)
    src = source_of(path, name, options)
    final = Path(cache_dir) / _prep.folder_name(name)
    digest = _digest(path)
    stamp = {"version": version, "recipe": _prep.VERSION, "source_sha256": digest,
             "max_length": src.max_length}
    if not force and _current(final, stamp):
        return final
    with building(final) as tmp:
        _prep._convert(src, tmp)
        manifest = json.loads((tmp / "bundle.json").read_text())
        manifest["version"] = version
        manifest["settings"]["recipe"] = _prep.VERSION
        manifest["settings"]["source_sha256"] = digest
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        check(tmp, path, src.max_length)
    return final


def _current(folder: Path, stamp: Mapping[str, Any]) -> bool:
    manifest = _read_json(folder / "bundle.json")
    settings = manifest.get("settings") or {}
    return (manifest.get("version") == stamp["version"]
            and settings.get("recipe") == stamp["recipe"]
            and settings.get("source_sha256") == stamp["source_sha256"]
            and settings.get("max_length") == stamp["max_length"]
            and all((folder / f).is_file() for f in settings.get("files", ())))


_CHECK_TEXTS = ("Hello, world!", "The quick brown fox jumps over the lazy dog.", "")


def check(folder: Path, path: Path, max_length: int | None) -> None:
    """Load the folder with the real pipeline, encode and decode a few texts, compare with HF.

    A tokenizer the converter got wrong is refused here, at prepare time, not on a device.
    """
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.tokenize.pipeline import TokenizerPipeline

    core = ov.Core()
    pipe = TokenizerPipeline.load(FolderBundle(folder), core, DeviceSettings("CPU"))
    ref = reference(path, max_length)
    for add in (True, False):
        ours = pipe.encode(list(_CHECK_TEXTS), add_special_tokens=add)
        theirs = [e.ids for e in ref.encode_batch(list(_CHECK_TEXTS), add_special_tokens=add)]
        if ours != theirs:
            raise ValueError(f"{path}: the converted tokenizer disagrees with Hugging Face "
                             f"tokenizers (add_special_tokens={add}): {ours} != {theirs}")
    ids = [e.ids for e in ref.encode_batch(list(_CHECK_TEXTS))]
    for skip in (True, False):
        if pipe.decode(ids, skip) != [ref.decode(row, skip_special_tokens=skip) for row in ids]:
            raise ValueError(f"{path}: the converted detokenizer disagrees with Hugging Face "
                             f"tokenizers (skip_special_tokens={skip})")
