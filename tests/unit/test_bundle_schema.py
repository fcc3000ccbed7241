"""A hand-made bundle.json is refused at pack / verify time with the key's path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keys import BundleError, Keyring, pack_bundle, verify_bundle
from workers import schema


def _asr_manifest() -> dict:
    return {"name": "mine", "task": "asr", "version": "1", "settings": {
        "multilingual": False, "lang_to_id": {}, "sample_rate": 16000, "n_fft": 400,
        "hop_length": 160, "n_mels": 80, "window_seconds": 30, "max_audio_seconds": 600,
        "max_target_positions": 448,
        "tokens": {"eot": 1, "sot": 2, "notimestamps": 3, "timestamp_begin": 4},
        "suppress_tokens": [], "begin_suppress_tokens": [], "max_initial_timestamp_index": 50,
        "files": {"encoder": "enc.xml", "decoder": "dec.xml", "vocab": "vocab.json"}}}


def _folder(tmp_path: Path, manifest: dict, files=("enc.xml", "enc.bin", "dec.xml", "dec.bin",
                                                    "vocab.json")) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bundle.json").write_text(json.dumps(manifest))
    for name in files:
        (src / name).write_bytes(b"x")
    return src


def test_a_complete_manifest_has_no_problems():
    manifest = {**_asr_manifest(), "files": ["dec.bin", "dec.xml", "enc.bin", "enc.xml",
                                             "vocab.json"]}
    assert schema.problems(manifest) == []


def test_missing_key_wrong_type_and_absent_file_are_named_by_path(tmp_path):
    manifest = _asr_manifest()
    del manifest["settings"]["files"]["encoder"]
    manifest["settings"]["n_mels"] = "80"
    src = _folder(tmp_path, manifest, files=("dec.xml", "vocab.json"))
    with pytest.raises(BundleError) as refused:
        pack_bundle(src, tmp_path / "bundles", Keyring.generate(), check=schema.check)
    message = str(refused.value)
    assert "settings.files.encoder: missing" in message
    assert "settings.n_mels: must be int, not str" in message
    assert "settings.files.decoder: 'dec.bin' is not a file of the bundle" in message
    assert not (tmp_path / "bundles" / "asr--mine").exists()


def test_verify_checks_a_bundle_packed_without_the_schema(tmp_path):
    manifest = _asr_manifest()
    del manifest["settings"]["tokens"]["eot"]
    ring = Keyring.generate()
    path = pack_bundle(_folder(tmp_path, manifest), tmp_path / "bundles", ring)
    verify_bundle(path, ring)  # the encryption is sound...
    with pytest.raises(BundleError, match="settings.tokens.eot: missing"):
        verify_bundle(path, ring, check=schema.check)  # ...the settings are not


def test_superres_mode_picks_the_table_and_unknown_modes_are_refused():
    quality = {"name": "q", "task": "superres", "version": "1", "settings": {"mode": "quality"}}
    assert "settings.unet: missing" in schema.problems(quality)
    quality["settings"]["mode"] = "turbo"
    assert schema.problems(quality) == ["settings.mode: 'turbo' is not one of fast, quality"]
    assert schema.problems({"name": "f", "task": "superres", "version": "1",
                            "settings": {}}) == []


def test_every_task_has_a_table_and_every_key_a_meaning():
    from edge.tasks import BUNDLE_TASKS

    assert set(schema.SCHEMAS) == set(BUNDLE_TASKS)
    for _, _, tables in schema.SCHEMAS.values():
        for keys in tables.values():
            assert all(k.meaning and k.kind in schema._TYPES for k in keys.values())


def test_docs_bundle_md_is_the_schema():
    doc = Path(__file__).resolve().parents[2] / "docs" / "bundle.md"
    assert doc.read_text() == schema.markdown(), "run: python -m workers.schema > docs/bundle.md"
