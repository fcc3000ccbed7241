"""A user's model through `prepare superres --from` vs the built-in fast pipeline, same IR.

    .venv/bin/python bench/superres_generic.py [--reps 15]

The built-in `sr-fast-x4` IR (u8 NHWC in and out, dynamic) is prepared again as if a user
brought it, then both pipelines upscale the same images: 480x270 -> 1920x1080 (one tile for the
built-in 512 tile, 2x2 tiles at the generic default of 256) and 960x540 (both tile). Prints
medians over `--reps` (interleaved runs) and the generic/built-in ratio, and checks the pixels are identical.
Uses the prepared folder in ~/.cache/edge-daemon/prepared (or $EDGE_PREPARED_DIR). CPU plugin
default precision (bf16 on AVX-512 bf16 machines), 2 threads, LATENCY hint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

from workers.api import DeviceSettings, FolderBundle
from workers.superres.fast import FastPipeline
from workers.superres.generic import GenericPipeline
from workers.superres.prepare import prepare_from

PREPARED = Path(os.environ.get("EDGE_PREPARED_DIR", Path.home() / ".cache/edge-daemon/prepared"))


def medians_s(fns, reps: int) -> list[float]:
    """Median seconds of each function, runs interleaved (a shared machine's load drifts)."""
    for fn in fns:
        fn()  # warm-up: compiles the tile shapes
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 53 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    core = ov.Core()
    device = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
    src = PREPARED / "sr-fast-x4"
    builtin = FastPipeline.load(FolderBundle(src), core, device)
    with tempfile.TemporaryDirectory() as tmp:
        for options in ({}, {"tile": "512"}):
            folder = prepare_from(src / "sr_fast_x4.xml", Path(tmp), name="user-fast",
                                  force=True, options=options)
            generic = GenericPipeline.load(FolderBundle(folder), core, device)
            for h, w in ((270, 480), (540, 960)):
                image = photo(h, w)
                same = np.array_equal(builtin([image])[0], generic([image])[0])
                base, ours = medians_s([lambda image=image: builtin([image]),
                                        lambda image=image, g=generic: g([image])], args.reps)
                print(f"{w}x{h} tile={generic.tile_shape[0]}: built-in {base * 1e3:.1f} ms, "
                      f"generic {ours * 1e3:.1f} ms, ratio {ours / base:.2f}, "
                      f"identical pixels: {same}")


if __name__ == "__main__":
    main()
