"""Fixtures for key operations tests: private copies of the session's bundles and keyring.

Rotation rewrites key slots and the key file in place, so these tests never touch the
session-wide `tokenizer_bundles` / `keyring_file` themselves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import PREPARED

TOKENIZERS = ("all-minilm-l6-v2", "clip-vit-b32", "whisper-tiny.en")


@pytest.fixture
def private_keys(tmp_path: Path, tokenizer_bundles: Path, keyring_file: Path) -> tuple[Path, Path]:
    """(bundle root, key file): copies this test may rotate, retire and tamper with."""
    root = tmp_path / "bundles"
    shutil.copytree(tokenizer_bundles, root)
    ring = tmp_path / "keyring.json"
    shutil.copyfile(keyring_file, ring)
    os.chmod(ring, 0o600)
    return root, ring


def plaintext_signatures() -> dict[str, bytes]:
    """Byte strings that only model plaintext contains, taken from the prepared tokenizers.

    Per IR: a 64-byte window from the middle of its XML and three 64-byte windows of its
    weights (random-looking vocab and merge tables: they occur nowhere by chance).
    """
    sigs: dict[str, bytes] = {}
    for name in TOKENIZERS:
        folder = PREPARED / f"tokenizer-{name}"
        for path in sorted(folder.glob("*.xml")) + sorted(folder.glob("*.bin")):
            raw = path.read_bytes()
            spots = (len(raw) // 2,) if path.suffix == ".xml" else \
                (len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4)
            for at in spots:
                sigs[f"{folder.name}/{path.name}@{at}"] = raw[at:at + 64]
    return sigs


def find_plaintext(path: Path, sigs: dict[str, bytes]) -> list[str]:
    """What model plaintext file `path` holds: an IR header or any signature window."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    hits = [k for k, sig in sigs.items() if sig in raw]
    if b"<?xml" in raw and b"<net " in raw:
        hits.append("IR XML header")
    return hits
