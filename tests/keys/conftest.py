"""Fixtures for the keys/ tests: a ring, prepared plaintext folders, packed bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from keys import Keyring, pack_bundle

CHUNK = 64  # tiny chunks make multi-chunk files cheap


def make_prepared(root: Path, files: dict[str, bytes], *, name: str = "tiny",
                  task: str = "asr", version: str = "1", settings: dict | None = None) -> Path:
    """A plaintext prepared folder as a task's prepare step writes it."""
    src = root / f"src-{task}-{name}"
    src.mkdir(parents=True)
    manifest = {"name": name, "task": task, "version": version, "settings": settings or {}}
    (src / "bundle.json").write_text(json.dumps(manifest))
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


@pytest.fixture
def ring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def files() -> dict[str, bytes]:
    return {
        "model.xml": b"<?xml version='1.0'?><net name='tiny'/>",
        "model.bin": os.urandom(CHUNK * 5 + 17),
        "exact.bin": os.urandom(CHUNK * 3),
        "empty.txt": b"",
        "sub/dir/vocab.json": b'{"a": 1}',
    }


@pytest.fixture
def packed(tmp_path: Path, ring: Keyring, files: dict[str, bytes]) -> Path:
    src = make_prepared(tmp_path, files, settings={"beam": 1})
    return pack_bundle(src, tmp_path / "bundles", ring, chunk_size=CHUNK)


@pytest.fixture
def prepared(tmp_path: Path) -> Callable[..., Path]:
    return lambda files, **kw: make_prepared(tmp_path, files, **kw)
