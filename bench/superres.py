"""Superres benchmarks: pipeline overhead, throughput, pyvips vs PIL. Prints medians and ratios.

    .venv/bin/python bench/superres.py [--reps 15]

Uses the prepared folder in ~/.cache/edge-daemon/prepared (run the tests or prepare first).
CPU inference precision is the plugin default (bf16 on AVX-512 bf16 machines); 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pyvips

from workers.api import DeviceSettings, FolderBundle, Media, Request, no_progress, read_ir
from workers.superres import imageio, load
from workers.superres.fast import FastPipeline

PREPARED = Path(os.environ.get("EDGE_PREPARED_DIR", Path.home() / ".cache/edge-daemon/prepared"))


def median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 53 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    reps = parser.parse_args().reps
    core = ov.Core()
    bundle = FolderBundle(PREPARED / "sr-fast-x4")
    lr = photo(270, 480)
    bic = imageio.upscale_array(lr)
    latency = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})

    # 1. bare infer of the same compiled static shape vs the whole pipeline
    model = read_ir(core, bundle, "sr_fast_x4.xml")
    model.reshape({0: [1, 270, 480, 3], 1: [1, 1080, 1920, 3]})
    compiled = core.compile_model(model, "CPU", dict(latency.properties))
    request = compiled.create_infer_request()
    bare = median_s(lambda: request.infer({0: lr[None], 1: bic[None]}), reps)
    pipeline = FastPipeline.load(bundle, core, latency)
    piped = median_s(lambda: pipeline([lr]), reps)
    upscale = median_s(lambda: imageio.upscale_array(lr), reps)
    print(f"480x270->1920x1080 bare infer        {bare * 1e3:7.1f} ms")
    print(f"  pipeline (array in, array out)     {piped * 1e3:7.1f} ms  "
          f"overhead {100 * (piped / bare - 1):+.0f}%  (pyvips bicubic alone {upscale * 1e3:.1f} ms)")

    handler = load([bundle], core, latency)
    data = imageio.as_vips(lr).pngsave_buffer()
    job = Request("superres", {"format": "png"}, media=(Media("image/png", data),))
    jpeg_job = Request("superres", {"format": "jpeg", "quality": 90},
                       media=(Media("image/png", data),))
    e2e = median_s(lambda: handler(job, no_progress), reps)
    e2e_jpeg = median_s(lambda: handler(jpeg_job, no_progress), reps)
    print(f"  handler PNG bytes -> PNG bytes     {e2e * 1e3:7.1f} ms  x{e2e / bare:.2f} of bare")
    print(f"  handler PNG bytes -> JPEG bytes    {e2e_jpeg * 1e3:7.1f} ms  x{e2e_jpeg / bare:.2f}")

    # 2. images/s: one at a time (LATENCY) vs a batch of 16 with the THROUGHPUT hint
    single = 1 / piped
    tput = DeviceSettings("CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    tpipe = FastPipeline.load(bundle, core, tput)
    batch = [photo(270, 480)] * 16
    per = median_s(lambda: tpipe(batch), max(3, reps // 3)) / len(batch)
    print(f"images/s 480x270: batch 1 LATENCY {single:6.1f}/s, "
          f"batch 16 THROUGHPUT {1 / per:6.1f}/s  (x{(1 / per) / single:.2f})")

    # 3. pyvips aligned cubic vs PIL bicubic for the same 4x enlargement
    try:
        from PIL import Image

        pil = Image.fromarray(lr)
        pil_s = median_s(lambda: np.asarray(pil.resize((1920, 1080), Image.BICUBIC)), reps)
        print(f"4x bicubic 480x270: pyvips {upscale * 1e3:.1f} ms, PIL {pil_s * 1e3:.1f} ms "
              f"(pyvips/PIL x{upscale / pil_s:.2f})")
    except ImportError:
        print("PIL not installed: skipped the pyvips vs PIL comparison")
    print(f"pyvips concurrency {pyvips.concurrency_get()}, openvino {ov.__version__}")


if __name__ == "__main__":
    main()
