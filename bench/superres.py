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
    parser.add_argument("--int8", action="store_true", help="also quantize with NNCF (~1 min)")
    args = parser.parse_args()
    reps = args.reps
    core = ov.Core()
    bundle = FolderBundle(PREPARED / "sr-fast-x4")
    lr = photo(270, 480)
    latency = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})

    # 1. bare infer of the same compiled static shape (bicubic base in the graph) vs the pipeline
    model = read_ir(core, bundle, "sr_fast_x4.xml")
    model.reshape({0: [1, 270, 480, 3]})
    compiled = core.compile_model(model, "CPU", dict(latency.properties))
    request = compiled.create_infer_request()
    bare = median_s(lambda: request.infer({0: lr[None]}), reps)
    pipeline = FastPipeline.load(bundle, core, latency)
    piped = median_s(lambda: pipeline([lr]), reps)
    upscale = median_s(lambda: imageio.upscale_array(lr), reps)
    print(f"480x270->1920x1080 bare infer        {bare * 1e3:7.1f} ms")
    print(f"  pipeline (array in, array out)     {piped * 1e3:7.1f} ms  "
          f"overhead {100 * (piped / bare - 1):+.0f}%  "
          f"(a pyvips bicubic upscale would add {upscale * 1e3:.1f} ms)")

    handler = load([bundle], core, latency)
    data = imageio.as_vips(lr).pngsave_buffer()
    job = Request("superres", {"format": "png"}, media=(Media("image/png", data),))
    jpeg_job = Request("superres", {"format": "jpeg", "quality": 90},
                       media=(Media("image/png", data),))
    stored_job = Request("superres", {"format": "png", "compression": 0},
                         media=(Media("image/png", data),))
    e2e = median_s(lambda: handler(job, no_progress), reps)
    e2e_stored = median_s(lambda: handler(stored_job, no_progress), reps)
    e2e_jpeg = median_s(lambda: handler(jpeg_job, no_progress), reps)
    print(f"  handler PNG bytes -> PNG bytes     {e2e * 1e3:7.1f} ms  x{e2e / bare:.2f} of bare "
          "(zlib level 1, the default)")
    print(f"  handler PNG bytes -> PNG level 0   {e2e_stored * 1e3:7.1f} ms  "
          f"x{e2e_stored / bare:.2f}")
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
    if args.int8:
        bench_int8(core, bundle, lr, bare, latency, reps)
    print(f"pyvips concurrency {pyvips.concurrency_get()}, openvino {ov.__version__}")


def bench_int8(core, bundle, lr, fp_time, device, reps) -> None:
    """NNCF post-training INT8 of the same 1080p graph: speed and held-out PSNR vs FP."""
    import nncf

    from workers.superres import train

    model = read_ir(core, bundle, "sr_fast_x4.xml")
    model.reshape({0: [1, 270, 480, 3]})
    crops = [train.make_example(train.sample_dir() / name) for name in train.TRAIN[:6]]
    samples = []
    for ex in crops:  # 270x480 windows of training images (never the held-out ones)
        h, w = min(270, ex.lr.shape[0]), min(480, ex.lr.shape[1])
        lr_c = np.zeros((270, 480, 3), np.uint8)
        lr_c[:h, :w] = ex.lr[:h, :w]
        samples.append({0: lr_c[None]})
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    compiled = core.compile_model(quantized, "CPU", dict(device.properties))
    request = compiled.create_infer_request()
    int8 = median_s(lambda: request.infer({0: lr[None]}), reps)
    print(f"INT8 (NNCF) bare infer {int8 * 1e3:.1f} ms vs FP {fp_time * 1e3:.1f} ms "
          f"(x{fp_time / int8:.2f} faster)")
    fp_pipe = FastPipeline.load(bundle, core, device)
    gains = []
    for name in train.HELD_OUT:
        ex = train.make_example(train.sample_dir() / name)
        q_model = quantized.clone()
        q_model.reshape({0: [1, *ex.lr.shape]})
        q_out = core.compile_model(q_model, "CPU", dict(device.properties))({0: ex.lr[None]})[0][0]
        [fp_out] = fp_pipe([ex.lr])
        gains.append((train.psnr_y(q_out, ex.hr) - train.psnr_y(fp_out, ex.hr)))
    print(f"INT8 held-out PSNR(Y) minus FP: {np.round(gains, 3).tolist()} dB")


if __name__ == "__main__":
    main()
