"""Prepare (or find cached) every model the demo and the tests use, under
~/.cache/edge-daemon/prepared: run by scripts/setup.sh, so the slow first builds (the superres
CNN trains for a few minutes) happen once, outside any test's time limit.

Plaintext models on the build host only; the daemon never sees this folder (it reads
encrypted bundles)."""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREPARED = Path("~/.cache/edge-daemon/prepared").expanduser()
TASKS = ("tokenize", "asr", "superres", "lcm")


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for task in TASKS:
        started = time.monotonic()
        folders = importlib.import_module(f"workers.{task}.prepare").prepare(PREPARED)
        print(f"setup: {task} models ready ({len(folders)}, {time.monotonic() - started:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
