"""Tokenizer throughput: our OpenVINO pipeline vs HF `tokenizers` (Rust) on the same strings.

    .venv/bin/python bench/tokenize.py [--reps 30]

Prints medians per call (batch 1 and batch 64) and the ratio HF time / our time (>1: we are
faster), on two corpora: English-like ASCII sentences (which take the ASCII tokenizers of MiniLM
and CLIP) and the varied Unicode strings of the parity tests (which take the full ones). Both
sides get 2 threads. Our time includes the Python pre/post-processing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openvino as ov  # noqa: E402

from tests.tokenize.corpus import make_sentences, make_texts  # noqa: E402
from workers.api import DeviceSettings, FolderBundle  # noqa: E402
from workers.tokenize.pipeline import TokenizerPipeline  # noqa: E402
from workers.tokenize.prepare import SOURCES, prepare  # noqa: E402


def paired_medians(ours, theirs, reps: int) -> tuple[float, float]:
    """Median wall times of `ours()` and `theirs()`, alternated so both see the same load."""
    for fn in (ours, theirs, ours, theirs):  # warm-up
        fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, sink in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": 2})
    folders = prepare(Path.home() / ".cache/edge-daemon/prepared")
    corpora = {"ascii": make_sentences(64), "unicode": make_texts(64, seed=7)[5:] * 2}
    print(f"{'model':18} {'corpus':8} {'batch':>5} {'ours ms':>9} {'hf ms':>9} {'hf/ours':>8}")
    for folder in folders:
        pipeline = TokenizerPipeline.load(FolderBundle(folder), core, DeviceSettings())
        rust = SOURCES[pipeline.name].build().backend_tokenizer
        for corpus, texts in corpora.items():
            for batch in (1, 64):
                chunk = texts[:batch]
                if batch == 1:
                    theirs = lambda: rust.encode(chunk[0])  # noqa: E731
                else:
                    theirs = lambda: rust.encode_batch(chunk)  # noqa: E731
                ours, hf = paired_medians(lambda: pipeline.encode(chunk), theirs, args.reps)
                print(f"{pipeline.name:18} {corpus:8} {batch:5} {ours * 1e3:9.3f} "
                      f"{hf * 1e3:9.3f} {hf / ours:8.2f}")


if __name__ == "__main__":
    main()
