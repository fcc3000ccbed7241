"""`edgectl prepare asr --from PATH`: which folders are accepted, what is read from them, and
what a refused folder is told."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgectl import cli
from workers.asr.checkpoint import CheckpointError, detect
from workers.asr.importing import prepare_from


def _refusal(source: Path, tmp_path: Path, capsys) -> str:
    with pytest.raises(CheckpointError) as info:
        prepare_from(source, tmp_path / "cache")
    assert cli.main(["prepare", "asr", "--from", str(source), "--no-pack",
                     "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert str(info.value) in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    return str(info.value)


def test_a_folder_of_something_else_is_refused_naming_every_accepted_layout(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "cat.jpg").write_bytes(b"\xff\xd8")
    message = _refusal(src, tmp_path, capsys)
    assert "cat.jpg" in message
    for expected in ("model.bin", "tokenizer.json", "model.safetensors",
                     "openvino_decoder_model.xml", "stateful"):
        assert expected in message


@pytest.mark.parametrize("layout,files,missing", [
    ("ctranslate2", ["model.bin", "config.json"], "tokenizer.json"),
    ("ctranslate2", ["model.bin", "tokenizer.json"], "config.json"),
    ("transformers", ["config.json", "model.safetensors"], "tokenizer.json"),
    ("openvino", ["openvino_encoder_model.xml", "openvino_decoder_model.xml",
                  "openvino_decoder_model.bin", "config.json", "tokenizer.json"],
     "openvino_encoder_model.bin"),
])
def test_a_folder_missing_files_is_refused_naming_them(tmp_path, capsys, layout, files,
                                                       missing):
    src = tmp_path / "model"
    src.mkdir()
    for name in files:
        (src / name).write_bytes(b"{}")
    message = _refusal(src, tmp_path, capsys)
    assert f"looks like a {layout} Whisper folder" in message and missing in message


def test_a_file_is_refused(tmp_path, capsys):
    src = tmp_path / "model.bin"
    src.write_bytes(b"\0" * 16)
    assert "is not a folder" in _refusal(src, tmp_path, capsys)


def test_a_ct2_model_of_another_kind_is_refused(tmp_path):
    src = tmp_path / "ct2"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model.bin").write_bytes(b"garbage, not CTranslate2")
    assert detect(src) == "ctranslate2"
    with pytest.raises(CheckpointError, match="not a CTranslate2 model"):
        prepare_from(src, tmp_path / "cache")


@pytest.mark.slow
def test_an_openvino_export_is_prepared_as_is(prepared, tmp_path):
    """The demo's tiny.en folder minus our card: the card read back from the IR folder alone
    is the one the CT2 path wrote."""
    src = tmp_path / "tiny-ov"
    shutil.copytree(prepared, src, ignore=shutil.ignore_patterns("bundle.json", "vocab.json"))
    folder = prepare_from(src, tmp_path / "cache", version="7")
    card = json.loads((folder / "bundle.json").read_text())
    want = json.loads((prepared / "bundle.json").read_text())
    assert card["name"] == "tiny-ov" and card["version"] == "7"
    assert card["source"]["layout"] == "openvino"
    assert card["settings"]["tokens"] == want["settings"]["tokens"]
    assert card["settings"]["multilingual"] is False
    assert card["settings"]["weight_format"] == "fp16"
    assert json.loads((folder / "vocab.json").read_text()) == json.loads(
        (prepared / "vocab.json").read_text())
    # a second call with the same source and options reuses the folder
    stamp = (folder / "bundle.json").stat().st_mtime_ns
    assert prepare_from(src, tmp_path / "cache", version="7") == folder
    assert (folder / "bundle.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_decoder_without_state_is_refused(prepared, tmp_path):
    import openvino as ov

    src = tmp_path / "split-export"
    shutil.copytree(prepared, src)
    encoder = ov.Core().read_model(src / "openvino_encoder_model.xml")
    ov.save_model(encoder, src / "openvino_decoder_model.xml")  # no past, no state
    with pytest.raises(CheckpointError, match="not a stateful decoder with past"):
        prepare_from(src, tmp_path / "cache")


@pytest.mark.slow
def test_a_model_that_does_not_load_is_refused_and_nothing_is_published(prepared, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(prepared, src, ignore=shutil.ignore_patterns("bundle.json", "vocab.json"))
    weights = src / "openvino_encoder_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated weights
    with pytest.raises(CheckpointError, match="does not run in WhisperPipeline"):
        prepare_from(src, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_a_hugging_face_folder_is_prepared(prepared, tmp_path):
    from workers.asr import packaged
    from workers.asr.ct2 import build_hf

    hf = tmp_path / "my-whisper"
    build_hf(packaged.tiny_en(), hf)
    assert detect(hf) == "transformers"
    folder = prepare_from(hf, tmp_path / "cache", options={"weight_format": "fp16"})
    card = json.loads((folder / "bundle.json").read_text())
    want = json.loads((prepared / "bundle.json").read_text())
    assert card["name"] == "my-whisper" and card["source"]["layout"] == "transformers"
    assert card["settings"]["tokens"] == want["settings"]["tokens"]


def test_default_names_come_from_the_folder(tmp_path):
    from workers.asr.importing import default_name

    assert default_name(tmp_path / "faster-whisper base") == "faster-whisper-base"
    snap = tmp_path / "models--openai--whisper-small" / "snapshots" / ("ab" * 20)
    assert default_name(snap) == "whisper-small"
