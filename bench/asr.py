"""Whisper tiny.en: our ov.Core pipeline vs openvino.genai (same IR) vs transformers+torch.

    .venv/bin/python bench/asr.py [--reps 7] [--threads 2]

Each engine runs in its own subprocess (so peak RSS is its own); speech is made by espeak-ng.
Prints medians, real-time factor (RTF = compute / audio seconds) and ratios vs genai.
Precision: the CPU default (bf16 on this machine) for both OpenVINO engines, f32 for torch.
"""

from __future__ import annotations

import sys

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREPARED = Path.home() / ".cache/edge-daemon/prepared"
CLIPS = {
    "short": "Please turn off the lights in the kitchen and lock the front door.",
    "medium": " ".join([
        "Good morning everyone, and welcome to the weekly project meeting.",
        "Today we will talk about the new sensors in the north building.",
        "The temperature readings were stable for most of the week.",
        "On Thursday the network went down for about two hours.",
        "The team replaced the old router and the problem went away.",
        "Next week we plan to install ten more devices on the second floor."]),
}


def _speech(text: str) -> "object":
    from workers.asr.audio import decode

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", f.name, text], check=True)
        return decode(Path(f.name).read_bytes())


def _engine(name: str, threads: int):
    folder = PREPARED / "whisper-tiny.en"
    if name == "ours":
        import openvino as ov

        from workers.api import DeviceSettings, FolderBundle
        from workers.asr.pipeline import WhisperPipeline

        pipe = WhisperPipeline.load(FolderBundle(folder), ov.Core(),
                                    DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": threads}))
        return lambda audio: pipe(audio).text
    if name == "genai":
        import openvino_genai

        pipe = openvino_genai.WhisperPipeline(str(folder), "CPU", INFERENCE_NUM_THREADS=threads)
        return lambda audio: pipe.generate(audio.tolist(), return_timestamps=True).texts[0]
    if name == "torch":
        import torch
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        from workers.asr.prepare import _ct2_dir, build_hf_from_ct2

        torch.set_num_threads(threads)
        hf = Path(tempfile.mkdtemp()) / "hf"
        build_hf_from_ct2(_ct2_dir(), hf)
        model = WhisperForConditionalGeneration.from_pretrained(hf).eval()
        fe = WhisperFeatureExtractor(feature_size=80)

        def run(audio):
            x = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
            with torch.no_grad():
                return model.generate(x, decoder_input_ids=torch.tensor([[50257]]),
                                      return_timestamps=True, max_new_tokens=440)
        return run
    raise SystemExit(f"unknown engine {name}")


def child(name: str, reps: int, threads: int) -> None:
    """Run one engine on every clip; print one JSON line."""
    audio = {k: _speech(t) for k, t in CLIPS.items()}
    run = _engine(name, threads)
    out = {"engine": name}
    for clip, x in audio.items():
        run(x)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        out[clip] = {"median_s": statistics.median(times), "audio_s": len(x) / 16000}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.reps, args.threads)
    from workers.asr.prepare import prepare

    prepare(PREPARED)
    results = {}
    for name in ("genai", "ours", "torch"):
        done = subprocess.run([sys.executable, __file__, "--child", name, "--reps",
                               str(args.reps), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["genai"]
    print(f"{'engine':8} {'clip':7} {'audio s':>8} {'median s':>9} {'RTF':>7} {'vs genai':>9} "
          f"{'peak RSS MiB':>13}")
    for name, r in results.items():
        for clip in CLIPS:
            c = r[clip]
            print(f"{name:8} {clip:7} {c['audio_s']:8.1f} {c['median_s']:9.3f} "
                  f"{c['median_s'] / c['audio_s']:7.4f} "
                  f"{c['median_s'] / base[clip]['median_s']:8.3f}x {r['peak_rss_mib']:13.0f}")


if __name__ == "__main__":
    main()
