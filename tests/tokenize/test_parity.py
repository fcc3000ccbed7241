"""Parity with Hugging Face `tokenizers` (the Rust library the IRs were converted from).

The reference is the very tokenizer `prepare` converted (`SOURCES[name].build()`), run through
its Rust backend; CLIP's decode is the backend's as transformers patches it ("</w>" -> " ",
then `str.strip()`), which is what "HF CLIP decode" means. The Rust backend does not truncate
unless told, so the reference gets the truncation transformers would apply at call time.
The corpus is 2,000 seeded strings: scripts, emoji, combining marks, controls, NUL, private-use,
whitespace runs, literal special tokens, long texts (see corpus.py).
"""

from __future__ import annotations

import pytest

from tests.tokenize.conftest import NAMES
from tests.tokenize.corpus import make_ascii_texts, make_texts
from workers.api import DeviceSettings, FolderBundle
from workers.tokenize.pipeline import TokenizerPipeline
from workers.tokenize.prepare import SOURCES

pytestmark = pytest.mark.slow

TEXTS = make_texts(2000, seed=20240611)
ASCII_TEXTS = make_ascii_texts(2000, seed=20261124)  # batches that take the ASCII fast path
CHUNK = 100  # a realistic request size, and it keeps padding of the long texts contained

# MiniLM: Rust `tokenizers` classifies punctuation with older Unicode tables than the IR's
# regex engine: U+061D ARABIC END OF TEXT MARK (Po since Unicode 14) is split off as
# punctuation by the IR but not by HF, so one text of the corpus gets two extra [UNK].
# Nothing before the IR can undo a difference of classification inside it.
ENCODE_BOUND = {"all-minilm-l6-v2": 1, "whisper-tiny.en": 0, "clip-vit-b32": 0}


@pytest.fixture(scope="module", params=NAMES)
def pair(request, prepared, core):
    """(our pipeline, HF reference tokenizer) for one model."""
    name = request.param
    pipeline = TokenizerPipeline.load(FolderBundle(prepared[name]), core, DeviceSettings())
    hf = SOURCES[name].build()
    rust = hf.backend_tokenizer
    if rust.truncation is None and SOURCES[name].max_length:
        rust.enable_truncation(SOURCES[name].max_length)
    return pipeline, rust


def _chunks(items):
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf_tokenizers(pair, add_special_tokens):
    pipeline, rust = pair
    ours = [ids for chunk in _chunks(TEXTS) for ids in pipeline.encode(chunk, add_special_tokens)]
    ref = [e.ids for e in rust.encode_batch(TEXTS, add_special_tokens=add_special_tokens)]
    bad = [(t, r, o) for t, r, o in zip(TEXTS, ref, ours) if r != o]
    assert len(bad) <= ENCODE_BOUND[pipeline.name], bad[:3]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ascii_batches_match_hf_tokenizers(pair, add_special_tokens):
    """Batches of ASCII texts skip the IR's normalization (MiniLM, CLIP): the result is HF's."""
    pipeline, rust = pair
    ours = [ids for chunk in _chunks(ASCII_TEXTS)
            for ids in pipeline.encode(chunk, add_special_tokens)]
    ref = [e.ids for e in rust.encode_batch(ASCII_TEXTS, add_special_tokens=add_special_tokens)]
    bad = [(t, r, o) for t, r, o in zip(ASCII_TEXTS, ref, ours) if r != o]
    assert bad == [], bad[:3]
    assert pipeline.ascii_fast_path == (pipeline.name != "whisper-tiny.en")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf_decode(pair, skip_special_tokens):
    pipeline, rust = pair
    ids = [e.ids for e in rust.encode_batch(TEXTS, add_special_tokens=True)]
    ours = [t for chunk in _chunks(ids) for t in pipeline.decode(chunk, skip_special_tokens)]
    # one by one: transformers patches `decode` (CLIP), not `decode_batch`
    ref = [rust.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
    bad = [(r, o) for r, o in zip(ref, ours) if r != o]
    assert bad == []


def test_ascii_corpus_is_hard():
    joined = "".join(ASCII_TEXTS)
    assert joined.isascii() and len(set(ASCII_TEXTS)) > 1900
    for needle in ("\x00", "\x07", "\x7f", "\x1b", "\t", "\r\n", "\x0b", "\x0c", "   ", "[SEP]",
                   "<|endoftext|>", "HELLO"):
        assert needle in joined, repr(needle)


def test_corpus_is_varied():
    """The parity corpus really holds the hard cases it claims to."""
    joined = "".join(TEXTS)
    assert len(set(TEXTS)) > 1900
    for needle in ("\x00", "\ue000", "😀", "你好", "e\u0301", "<|endoftext|>", "[SEP]", "   "):
        assert needle in joined
    assert max(map(len, TEXTS)) > 1000
