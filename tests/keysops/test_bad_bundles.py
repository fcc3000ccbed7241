"""A broken bundle is reported on its own: the other bundles of its task keep serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.errors import ModelUnavailable
from edgectl.localdaemon import ROOT, write_config
from workers.api import DeviceSettings, Request, no_progress


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def _load(root: Path, ring_path: Path):
    import openvino as ov
    import openvino_tokenizers  # noqa: F401

    import keys
    from workers.model_store import load_models

    ring = keys.Keyring.load_file(ring_path)
    return load_models(["tokenize", "detokenize"], root, ring, ov.Core(), DeviceSettings("CPU"))


def _ask(models, model: str):
    return models.handle(Request("tokenize", params={"model": model}, text="hello"), no_progress)


def test_tampered_bundles_are_unavailable_by_name_and_the_others_serve(private_keys):
    root, ring_path = private_keys
    # A flipped bit in the weights is found only when chunks are decrypted (during the task's
    # load); an edited bundle.json is found when the bundle is opened. Both paths are covered.
    _flip(next((root / "tokenize--clip-vit-b32").glob("*/tokenizer_special.bin.enc")), -100)
    manifest = next((root / "tokenize--whisper-tiny.en").glob("*/bundle.json"))
    manifest.write_text(manifest.read_text().replace('"version": "', '"version": "9'))

    models = _load(root, ring_path)

    assert set(models.handlers) == {"tokenize", "detokenize"}
    assert models.models["tokenize"] == ("all-minilm-l6-v2",)
    assert set(models.broken["tokenize"]) == {"clip-vit-b32", "whisper-tiny.en"}
    assert "fails authentication" in models.broken["tokenize"]["clip-vit-b32"]
    assert "edited after packing" in models.broken["tokenize"]["whisper-tiny.en"]
    assert _ask(models, "all-minilm-l6-v2").result["ids"][0] == 101
    for name in ("clip-vit-b32", "whisper-tiny.en"):
        with pytest.raises(ModelUnavailable, match=name):
            _ask(models, name)
    with pytest.raises(ModelUnavailable, match="fails authentication"):
        models.handle(Request("detokenize", params={"model": "clip-vit-b32"}, ids=(1, 2)),
                      no_progress)


def test_worker_whose_only_task_is_all_broken_exits_with_a_clear_message(private_keys,
                                                                         tmp_path):
    root, ring_path = private_keys
    for bundle in root.iterdir():
        _flip(next(bundle.rglob("tokenizer_plain.bin.enc")), -1)
    config = write_config(tmp_path / "edge.toml", node="gw", mqtt_port=1, bundle_dir=root,
                          redis_url="redis://127.0.0.1:1/0", keyring_file=ring_path,
                          tasks={"tokenize": {"devices": ["CPU"]}})
    proc = subprocess.run([sys.executable, "-m", "workers.worker", "--config", str(config),
                           "--device", "CPU"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no task could be loaded on CPU" in proc.stderr
    assert "every tokenize bundle is broken" in proc.stdout + proc.stderr
