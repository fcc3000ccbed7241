"""Benchmark the lcm pipeline against openvino.genai and diffusers+torch on the same weights.

    .venv/bin/python -m bench.lcm --arch sd15 --size 512 --steps 4 --reps 3 [--int8] [--rss]
    .venv/bin/python -m bench.lcm --arch tiny                      # quick smoke run

Run it as a module from the repo root so that `workers` imports without path tricks.

`sd15` is the SD1.5 architecture with random weights (UNet ~860M params): its first prepare
exports ~4 GB of IRs under ~/.cache/edge-daemon/prepared (minutes, ~12 GB RAM). All three run
the same prompt, steps, size and thread count; medians over `--reps` after one warm-up.
Our pipeline and genai use the same IRs and the same precision hint (default: the CPU
plugin's bf16; `--f32` for f32). Ratios > 1 mean ours is faster.
Ours is timed per stage (text encoder, UNet loop, VAE decode). `--int8` adds the INT8 bundle
(UNet + VAE decoder) in the same process, alternating with FP image by image so that a loaded
machine slows both alike; its ratios are medians of the per-round FP/INT8 ratios. `--rss` gives
the peak RSS of a fresh process that loads a bundle and makes one image (FP, and INT8 with
`--int8`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PREPARED = Path.home() / ".cache/edge-daemon/prepared"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
STAGES = ("text", "unet", "vae", "image")


def median_seconds(run: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls after one warm-up call."""
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_stages(pipe, size: int, steps: int) -> dict[str, float]:
    """One image (what `pipe(PROMPT, ...)` does), each stage timed in seconds."""
    start = time.perf_counter()
    ids, _ = pipe.tokenize(PROMPT)
    embeds = pipe._text_encoder(ids)[0]
    encoded = time.perf_counter()
    denoised = pipe.denoise(embeds, steps=steps, seed=1, guidance_scale=8.0, width=size,
                            height=size)
    denoised_at = time.perf_counter()
    pipe.decode(denoised)
    end = time.perf_counter()
    return {"text": encoded - start, "unet": denoised_at - encoded, "vae": end - denoised_at,
            "image": end - start}


def alternate(pipes: dict, size: int, steps: int, reps: int) -> dict[str, list[dict]]:
    """Per-stage times of `reps` rounds, one image per pipeline a round, after a warm-up round."""
    rounds: dict[str, list[dict]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():
        image_stages(pipe, size, steps)
    for _ in range(reps):
        for name, pipe in pipes.items():
            rounds[name].append(image_stages(pipe, size, steps))
    return rounds


def print_stages(rounds: dict[str, list[dict]]) -> None:
    """Median ms per stage and pipeline; with two pipelines, the median per-round ratio."""
    names = list(rounds)
    ratio = len(names) == 2
    print(f"  {'stage':8s}" + "".join(f"{name:>12s}" for name in names)
          + (f"   {names[0]}/{names[1]} (median of rounds)" if ratio else ""))
    for stage in STAGES:
        line = f"  {stage:8s}" + "".join(
            f"{statistics.median(r[stage] for r in rounds[name]) * 1000:9.1f} ms"
            for name in names)
        if ratio:
            per_round = [a[stage] / b[stage] for a, b in zip(rounds[names[0]], rounds[names[1]])]
            line += f"   {statistics.median(per_round):6.2f}x"
        print(line)


def peak_rss_child(folder: Path, size: int, steps: int, threads: int) -> None:
    """Load one bundle and make one image in this fresh process; print its peak RSS (JSON)."""
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    start = time.perf_counter()
    pipe = LCMPipeline.load(FolderBundle(folder), ov.Core(),
                            DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": threads}))
    pipe(PROMPT, steps=steps, seed=1, width=size, height=size)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - start}))


def peak_rss(folder: Path, size: int, steps: int, threads: int) -> dict:
    """`peak_rss_child` in a new interpreter."""
    done = subprocess.run([sys.executable, "-m", "bench.lcm", "--rss-child", str(folder),
                           "--size", str(size), "--steps", str(steps), "--threads", str(threads)],
                          capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def genai_dir(bundle: Path, reference: Path) -> Path:
    """A genai-layout folder of symlinks to the bundle's IRs plus the reference's configs."""
    out = PREPARED.parent / "bench-genai" / bundle.name  # not under prepared/: no bundle
    if (out / "model_index.json").exists():
        return out
    parts = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}
    for part, config in parts.items():
        (out / part).mkdir(parents=True, exist_ok=True)
        for ext in ("xml", "bin"):
            link = out / part / f"openvino_model.{ext}"
            link.unlink(missing_ok=True)
            link.symlink_to(bundle / f"{part}.{ext}")
        shutil.copyfile(reference / config / "config.json", out / part / "config.json")
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copyfile(reference / "scheduler/scheduler_config.json",
                    out / "scheduler/scheduler_config.json")
    _genai_tokenizer(out / "tokenizer")
    index = json.loads((reference / "model_index.json").read_text())
    # genai's JSON reader refuses the [null, null] entries of absent components
    index = {k: v for k, v in index.items() if not (isinstance(v, list) and None in v)}
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def _genai_tokenizer(folder: Path) -> None:
    """genai wants tokenizer + detokenizer IRs; ours truncates in Python, genai pads itself."""
    import openvino as ov
    import openvino_tokenizers

    from workers.lcm._build import clip_tokenizer

    folder.mkdir(exist_ok=True)
    tok, detok = openvino_tokenizers.convert_tokenizer(clip_tokenizer(), with_detokenizer=True)
    ov.save_model(tok, str(folder / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(folder / "openvino_detokenizer.xml"))


def main() -> None:
    """Run the three pipelines and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=("tiny", "sd15"))
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--f32", action="store_true", help="f32 inference instead of bf16")
    parser.add_argument("--int8", action="store_true",
                        help="also run the NNCF INT8 bundle (UNet + VAE decoder)")
    parser.add_argument("--rss", action="store_true", help="peak RSS of a fresh one-image process")
    parser.add_argument("--skip-genai", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.size, args.steps, args.threads)

    import openvino as ov
    import torch

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline
    from workers.lcm.prepare import prepare, reference_dir

    torch.set_num_threads(args.threads)
    (bundle,) = prepare(PREPARED, options={"arch": args.arch})
    reference = reference_dir(PREPARED, f"lcm-{args.arch}-seed0")
    size = args.size or json.loads((bundle / "bundle.json").read_text())["settings"]["default_width"]
    props = {"INFERENCE_NUM_THREADS": args.threads}
    if args.f32:
        props["INFERENCE_PRECISION_HINT"] = "f32"
    precision = "f32" if args.f32 else "bf16 (CPU default)"
    print(f"lcm bench: arch={args.arch} {size}x{size} steps={args.steps} threads={args.threads} "
          f"precision={precision} reps={args.reps} (median)")
    folders = {"ours": bundle}
    if args.int8:
        (folders["ours-int8"],) = prepare(PREPARED, options={"arch": args.arch, "unet": "int8"})
    if args.rss:
        for name, folder in folders.items():
            rss = peak_rss(folder, size, args.steps, args.threads)
            print(f"  peak RSS, fresh process, load + one image: {name:10s} "
                  f"{rss['peak_rss_mib']:7.0f} MiB ({rss['seconds']:.1f} s; {load_average()})",
                  flush=True)

    results: dict[str, float] = {}

    def report(name: str, seconds: float) -> None:
        results[name] = seconds
        print(f"  {name:24s} {seconds * 1000:9.1f} ms", flush=True)  # long runs: show as we go

    print(f"  ours, per stage ({load_average()} before):")
    pipes = {name: LCMPipeline.load(FolderBundle(folder), ov.Core(), DeviceSettings("CPU", props))
             for name, folder in folders.items()}
    rounds = alternate(pipes, size, args.steps, args.reps)
    del pipes
    print_stages(rounds)
    print(f"  ({load_average()} after)", flush=True)
    for name, rs in rounds.items():
        results[name] = statistics.median(r["image"] for r in rs)

    if not args.skip_genai:
        import openvino_genai

        genai = openvino_genai.Text2ImagePipeline(str(genai_dir(bundle, reference)), "CPU",
                                                  **props)
        report("genai", median_seconds(lambda: genai.generate(
            PROMPT, width=size, height=size, num_inference_steps=args.steps, guidance_scale=8.0,
            rng_seed=1), args.reps))
        del genai

    if not args.skip_torch:
        from diffusers import LatentConsistencyModelPipeline

        ref = LatentConsistencyModelPipeline.from_pretrained(reference, local_files_only=True)
        ref.set_progress_bar_config(disable=True)

        def run_torch() -> None:
            with torch.inference_mode():
                ref(PROMPT, num_inference_steps=args.steps, width=size, height=size,
                    guidance_scale=8.0, generator=torch.Generator().manual_seed(1),
                    output_type="np")

        report("diffusers+torch (f32)", median_seconds(run_torch, args.reps))

    print("ratios (time / ours; > 1: ours is faster):")
    for name, seconds in results.items():
        print(f"  {name:24s} {seconds / results['ours']:6.2f}x")


if __name__ == "__main__":
    main()
