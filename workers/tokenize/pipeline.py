"""Tokenize texts and detokenize ids with openvino-tokenizers IRs read from a bundle.

    pipeline = TokenizerPipeline.load(bundle, core, device)
    ids = pipeline.encode(["hello world"], add_special_tokens=True)
    texts = pipeline.decode(ids, skip_special_tokens=True)

Every call runs one inference for the whole batch.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openvino as ov
import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops before read_model)

from workers.api import BundleLike, DeviceSettings, read_ir

# Ids that decode to nothing: the detokenizer skips ids outside its vocabulary, so rows of a
# ragged batch are padded with this. Client ids are range-checked before they get here.
_PAD_ID = -1


# Private use (Unicode category Co: these three ranges in every Unicode version) and U+FFFD
_BERT_DROPPED = re.compile("[\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd\ufffd]+")


def _bert_clean(text: str) -> str:
    # HF's BERT normalizer drops private-use characters and U+FFFD; the IR maps them to [UNK]
    # (search first: half the time of a sub that finds nothing, the common case)
    if text.isascii() or not _BERT_DROPPED.search(text):
        return text
    return _BERT_DROPPED.sub("", text)


def _nfc(text: str) -> str:
    # The IR's NFC and Python's agree with HF on more inputs than the IR's own normalizer does
    # is_normalized first: ten times cheaper than normalize on text that is NFC already
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def _lower(text: str) -> str:
    # HF lower-cases char by char; str.lower() alone would turn a word-final Σ into ς
    return text.replace("Σ", "σ").lower()


# What BERT's normalization ops do to ASCII: drop control characters (all but tab, newline and
# carriage return), then make each whitespace character a space
_ASCII_BERT_TABLE = str.maketrans({**{chr(c): None for c in (*range(0x20), 0x7F)},
                                   "\t": " ", "\n": " ", "\r": " "})


def _ascii_bert_clean(text: str) -> str:
    # isprintable: an ASCII text without any of 0x00-0x1f and 0x7f, the common case
    return text if text.isprintable() else text.translate(_ASCII_BERT_TABLE)


# What CLIP's normalization ops do to ASCII: each run of whitespace becomes one space
_ASCII_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r ]+")


def _ascii_collapse_whitespace(text: str) -> str:
    if text.isprintable() and "  " not in text:  # only single spaces: nothing to collapse
        return text
    return _ASCII_WHITESPACE_RUN.sub(" ", text)


PREPROCESS: dict[str, Callable[[str], str]] = {
    "bert_clean": _bert_clean,
    "nfc": _nfc,
    "lower": _lower,
    # for the ASCII tokenizers only (see TokenizerSettings.ascii_tokenizer)
    "ascii_bert_clean": _ascii_bert_clean,
    "ascii_collapse_whitespace": _ascii_collapse_whitespace,
    "ascii_lower": str.lower,
}


POSTPROCESS: dict[str, Callable[[str], str]] = {
    # HF's CLIP decode ends in Python's str.strip(), whose whitespace includes \x1c-\x1f
    "strip": str.strip,
}


@dataclass(frozen=True, slots=True)
class TokenizerSettings:
    """What `bundle.json` says about one converted tokenizer."""

    tokenizer: Mapping[bool, str]  # add_special_tokens -> IR file
    detokenizer: Mapping[bool, str]  # skip_special_tokens -> IR file
    vocab_size: int
    preprocess: tuple[str, ...]
    postprocess: tuple[str, ...] = ()
    # The tokenizer without its normalization ops, for batches of ASCII texts, which get the
    # `ascii_preprocess` steps instead (nothing: every batch takes the full tokenizer)
    ascii_tokenizer: Mapping[bool, str] = field(default_factory=dict)
    ascii_preprocess: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # matched on raw text: pre-processing skips them
    truncate_to: int | None = None  # truncate in Python (after fixing ids), not in the IR
    suffix_after: frozenset[int] = frozenset()  # special ids the IR follows with junk ids...
    suffix_ids: tuple[int, ...] = ()  # ...these ones

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> TokenizerSettings:
        """Parse the `settings` of a tokenize bundle."""
        s = manifest["settings"]
        unknown = [p for p in (*s.get("preprocess", ()), *s.get("ascii_preprocess", ()))
                   if p not in PREPROCESS]
        unknown += [p for p in s.get("postprocess", ()) if p not in POSTPROCESS]
        if unknown:
            raise ValueError(f"bundle {manifest.get('name')!r}: unknown step {unknown[0]!r}")
        fix = s.get("special_suffix_fix") or {}
        return cls(
            tokenizer={k == "true": v for k, v in s["tokenizer"].items()},
            detokenizer={k == "true": v for k, v in s["detokenizer"].items()},
            vocab_size=int(s["vocab_size"]),
            preprocess=tuple(s.get("preprocess", ())),
            postprocess=tuple(s.get("postprocess", ())),
            ascii_tokenizer={k == "true": v for k, v in s.get("ascii_tokenizer", {}).items()},
            ascii_preprocess=tuple(s.get("ascii_preprocess", ())),
            special_tokens=tuple(s.get("special_tokens", ())),
            truncate_to=s.get("max_length") if s.get("truncate_in_pipeline") else None,
            suffix_after=frozenset(fix.get("after", ())),
            suffix_ids=tuple(fix.get("drop", ())),
        )


class TokenizerPipeline:
    """One tokenizer: encode texts to id lists and decode id lists to texts."""

    def __init__(self, name: str, settings: TokenizerSettings,
                 encoders: Mapping[bool, Any], decoders: Mapping[bool, Any],
                 ascii_encoders: Mapping[bool, Any] | None = None) -> None:
        self.name = name
        self.settings = settings
        self._encoders = encoders  # add_special_tokens -> InferRequest
        self._decoders = decoders  # skip_special_tokens -> InferRequest
        self._ascii_encoders = ascii_encoders or {}  # the same, for ASCII-only batches
        self._preprocess = [PREPROCESS[p] for p in settings.preprocess]
        self._ascii_preprocess = [PREPROCESS[p] for p in settings.ascii_preprocess]
        self._postprocess = [POSTPROCESS[p] for p in settings.postprocess]
        specials = sorted(settings.special_tokens, key=len, reverse=True)
        # capturing group: re.split keeps the special tokens at the odd indices
        pattern = "(" + "|".join(map(re.escape, specials)) + ")"
        self._specials = re.compile(pattern) if specials else None

    @classmethod
    def load(cls, bundle: BundleLike, core: ov.Core, device: DeviceSettings) -> TokenizerPipeline:
        """Read and compile the bundle's four IRs (tokenizer ops run on the CPU plugin only)."""
        settings = TokenizerSettings.from_manifest(bundle.manifest)
        # the string ops of openvino-tokenizers exist only as CPU extension ops
        config = dict(device.properties) if device.name == "CPU" else {}

        def compile_(xml: str) -> Any:
            compiled = core.compile_model(read_ir(core, bundle, xml), "CPU", config)
            return compiled.create_infer_request()

        return cls(
            bundle.name, settings,
            {add: compile_(xml) for add, xml in settings.tokenizer.items()},
            {skip: compile_(xml) for skip, xml in settings.detokenizer.items()},
            {add: compile_(xml) for add, xml in settings.ascii_tokenizer.items()},
        )

    @property
    def ascii_fast_path(self) -> bool:
        """Whether batches of ASCII texts skip the IR's normalization (see `encode`)."""
        return bool(self._ascii_encoders)

    @property
    def vocab_size(self) -> int:
        """Ids must be in `range(vocab_size)`."""
        return self.settings.vocab_size

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, padding removed.

        A batch of ASCII texts goes to the tokenizer without normalization ops when the bundle
        has one, normalized here instead (the same result, sooner).
        """
        if not texts:
            return []
        if self._ascii_encoders and all(t.isascii() for t in texts):
            steps, request = self._ascii_preprocess, self._ascii_encoders[add_special_tokens]
        else:
            steps, request = self._preprocess, self._encoders[add_special_tokens]
        prepared = [self._prepare(t, steps) for t in texts]
        # share_*: the packed arrays are ours, and the outputs are copied out before the next call
        out = request.infer(_pack(prepared), share_inputs=True, share_outputs=True)
        rows = _rows(out)
        if self.settings.suffix_ids and self._specials is not None:
            rows = [self._drop_suffix(row) if self._specials.search(text) else row
                    for row, text in zip(rows, texts, strict=True)]
        if self.settings.truncate_to is not None:
            rows = [_truncate(row, self.settings.truncate_to, add_special_tokens) for row in rows]
        return rows

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """Text of each id list; ids must be in `range(vocab_size)` (see `check_ids`)."""
        if not ids:
            return []
        width = max(1, max(len(row) for row in ids))
        batch = np.full((len(ids), width), _PAD_ID, dtype=np.int64)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = row
        out = self._decoders[skip_special_tokens].infer([batch])
        texts = _unpack(out["begins"], out["ends"], out["chars"])
        for step in self._postprocess:
            texts = [step(t) for t in texts]
        return texts

    def check_ids(self, ids: Sequence[Sequence[int]]) -> int | None:
        """The first id outside the vocabulary, or None when all are valid."""
        for row in ids:
            for i in row:
                if not 0 <= i < self.vocab_size:
                    return i
        return None

    def _prepare(self, text: str, steps: Sequence[Callable[[str], str]]) -> str:
        if self._specials is None or not self._specials.search(text):
            return _apply(steps, text)
        parts = self._specials.split(text)
        parts[::2] = [_apply(steps, p) for p in parts[::2]]
        return "".join(parts)

    def _drop_suffix(self, row: list[int]) -> list[int]:
        # the IR emits the literal "</w>" after each special token found in the text
        after, junk = self.settings.suffix_after, list(self.settings.suffix_ids)
        n = len(junk)
        out, i = [], 0
        while i < len(row):
            out.append(row[i])
            if row[i] in after and row[i + 1 : i + 1 + n] == junk:
                i += n
            i += 1
        return out


def _rows(out: Any) -> list[list[int]]:
    """The id list of each text from a tokenizer's outputs: ragged (row_begins, row_ends, flat
    ids: prepared since recipe version 5) or right-padded with an attention mask (older)."""
    names = {name for port in out.keys() for name in port.get_names()}
    if "ids" in names:
        flat = out["ids"].tolist()
        return [flat[b:e] for b, e in zip(out["row_begins"].tolist(), out["row_ends"].tolist(),
                                          strict=True)]
    # each padded row keeps its first mask.sum() ids (one tolist for the batch)
    lengths = out["attention_mask"].sum(axis=1).tolist()
    return [row[:n] for row, n in zip(out["input_ids"].tolist(), lengths, strict=True)]


def _apply(steps: Sequence[Callable[[str], str]], text: str) -> str:
    for step in steps:
        text = step(text)
    return text


def _truncate(row: list[int], max_length: int, add_special_tokens: bool) -> list[int]:
    """HF's truncation: keep the first tokens, and the closing special token when one was added."""
    if len(row) <= max_length:
        return row
    return row[: max_length - 1] + row[-1:] if add_special_tokens else row[:max_length]


def _pack(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts as the IR's unpacked string input: begins, ends and the UTF-8 bytes of all."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
    ends = np.cumsum(lengths, dtype=np.int32)
    chars = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    if chars.size == 0:  # a zero-sized input tensor is refused; the ends still say "empty"
        chars = np.zeros(1, dtype=np.uint8)
    return {"begins": ends - lengths, "ends": ends, "chars": chars}


def _unpack(begins: np.ndarray, ends: np.ndarray, chars: np.ndarray) -> list[str]:
    """The detokenizer's unpacked string output as Python strings (the IR emits valid UTF-8)."""
    data = chars.tobytes()
    return [data[b:e].decode("utf-8", "replace")
            for b, e in zip(begins.tolist(), ends.tolist(), strict=True)]
