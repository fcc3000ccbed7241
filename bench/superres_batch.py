"""Batched superres: 16 jobs of one 480x270 photo each, one at a time vs one batch. Prints
images/s, medians over --reps, and the ratio, under both CPU performance hints.

    .venv/bin/python bench/superres_batch.py [--reps 5] [--jobs 16] [--max-batch 1,4,8,16]

* max_batch 1: `handler(request)` per job, as a worker with max_batch = 1 runs them;
* max_batch B: `handler.batch(...)` on B jobs at a time, as a worker runs the B jobs it finds
  waiting (the 16 jobs in 16 / B batches);
* bare, for reference (LATENCY: one stream): the compiled 270x480 model alone, 16 infers one
  after another against one infer of a [16, 270, 480, 3] reshape (a batch dimension).

Both sides of each comparison run in this invocation, alternating, so the ratios compare like
with like on this machine's load. The images are 270x480 crops of scikit-image's colour
sample photos, sent as PNG and answered as PNG (zlib level 1, the default). Devices compile with
the worker's properties (`PERFORMANCE_HINT` only; precision: the plugin's default, bf16 here).
Uses the prepared folder in ~/.cache/edge-daemon/prepared (run the tests or prepare first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import pyvips  # noqa: E402

from workers.api import DeviceSettings, FolderBundle, Media, Request, no_progress, read_ir  # noqa: E402
from workers.superres import load, train  # noqa: E402

PREPARED = Path(os.environ.get("EDGE_PREPARED_DIR", Path.home() / ".cache/edge-daemon/prepared"))
H, W = 270, 480


def crops(n: int) -> list[np.ndarray]:
    """`n` 270x480 RGB crops of scikit-image's colour photos, spread over each photo."""
    photos = []
    for path in sorted(train.sample_dir().iterdir()):
        if path.suffix not in (".png", ".jpg"):
            continue
        image = pyvips.Image.new_from_file(str(path))
        if image.bands >= 3 and image.height >= H and image.width >= W:
            photos.append(image.numpy()[..., :3])
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        k = i // len(photos)  # another window of the same photo
        y = (p.shape[0] - H) * ((k * 7) % 5) // 4
        x = (p.shape[1] - W) * ((k * 3) % 5) // 4
        out.append(np.ascontiguousarray(p[y:y + H, x:x + W]))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def medians(runs: dict[str, object], reps: int) -> dict[str, float]:
    """Median seconds of each run, alternating, after a warm-up of each."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bare(core: ov.Core, bundle: FolderBundle, hint: str, images: list[np.ndarray],
         reps: int) -> tuple[float, float]:
    """The model alone: one [1, H, W, 3] infer per image vs one [n, H, W, 3] infer."""
    props = {"PERFORMANCE_HINT": hint}
    model = read_ir(core, bundle, "sr_fast_x4.xml")
    single = model.clone()
    single.reshape({0: [1, H, W, 3]})
    batched = model.clone()
    batched.reshape({0: [len(images), H, W, 3]})
    r1 = core.compile_model(single, "CPU", props).create_infer_request()
    rn = core.compile_model(batched, "CPU", props).create_infer_request()
    stack = np.stack(images)
    got = medians({"one": lambda: [r1.infer({0: img[None]}) for img in images],
                   "stack": lambda: rn.infer({0: stack})}, reps)
    return got["one"], got["stack"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=16, help="jobs (one image each)")
    parser.add_argument("--max-batch", default="1,4,8,16",
                        help="batch sizes to compare (1: one job at a time)")
    args = parser.parse_args()
    sizes = [int(b) for b in args.max_batch.split(",")]
    core = ov.Core()
    bundle = FolderBundle(PREPARED / "sr-fast-x4")
    images = crops(args.jobs)
    requests = [Request("superres", {}, media=(Media("image/png",
                                                     pyvips.Image.new_from_array(img)
                                                     .pngsave_buffer()),))
                for img in images]
    n = len(requests)
    print(f"{n} jobs of one {W}x{H} PNG each -> {4 * W}x{4 * H} PNG; medians of {args.reps}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for hint in ("LATENCY", "THROUGHPUT"):
        handler = load([bundle], core, DeviceSettings("CPU", {"PERFORMANCE_HINT": hint}))
        pool = next(iter(handler._pipelines.values()))[1]._pool((H, W))  # noqa: SLF001

        def run(b: int, h=handler):
            if b == 1:
                return [h(r, no_progress) for r in requests]
            return [h.batch(requests[i:i + b]) for i in range(0, n, b)]

        got = medians({b: (lambda b=b: run(b)) for b in sizes}, args.reps)
        base = got.get(1, got[sizes[0]])
        print(f"{hint} ({len(pool)} infer request(s) per shape): " + ", ".join(
            f"max_batch {b}: {n / t:5.1f} images/s x{base / t:.2f}" for b, t in got.items()))
        if hint == "LATENCY":  # one stream: one request of n images is a fair comparison
            b1, bn = bare(core, bundle, hint, images, args.reps)
            print(f"  bare model: {n} infers {n / b1:5.1f} images/s, one [{n}, {H}, {W}, 3] "
                  f"infer {n / bn:5.1f} images/s, x{b1 / bn:.2f}")
        del handler
    print(f"load average after {os.getloadavg()[0]:.2f}; openvino {ov.__version__}")


if __name__ == "__main__":
    main()
