"""asr batching: 16 clips of 4-8 s transcribed one at a time against as one batch.

    .venv/bin/python bench/asr_batch.py [--reps 5] [--threads 2] [--model tiny.en|base]
                                        [--daemon] [--daemon-reps 3]

Pipeline part (in process, the worker's `WhisperPipeline` on the CPU default precision, bf16
here): 16 espeak-ng clips of 4-8 s, (a) one `transcribe` call per clip, (b) batches of 4 and
8, (c) one batch of 16; the settings alternate within each repetition and the table gives
medians over `--reps` and the median of the per-repetition ratio to (a). Every batched run
is checked to give the very transcripts of (a). The encoder alone (16 calls of one window)
is timed too: a 4-8 s clip still costs a full 30 s window there, and that part gains nothing
from a batch on a CPU that one clip already keeps busy. Then the two models alone: 16 rows one
row a call against one call of 16 (encoder; decoder first step and 20 steps).

`--daemon` adds the end-to-end case: a private daemon (Redis, Mosquitto, agent, one CPU
worker) with `tasks.asr.max_batch` 1 and then the default, and 16 devices, each its own MQTT
connection, sending their clip at the same moment (JSON envelope, QoS 1); total time from the
first publish to the last answer, medians over `--daemon-reps` bursts per setting. It reports
what it measured, never a target; the load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREPARED = Path.home() / ".cache/edge-daemon/prepared"
SENTENCES = [
    "Please turn off the lights in the kitchen and lock the front door.",
    "The temperature in the server room is twenty one degrees.",
    "Open the garage door and switch on the heating in the living room.",
    "The delivery truck will arrive at the north gate at half past nine.",
    "Battery level of sensor seven is low, please replace it this week.",
    "Motion was detected in the hallway on the second floor.",
    "Start the washing machine when the electricity price is low tonight.",
    "The water pressure in the garden pipe dropped below the normal level.",
    "Remind me to call the plumber tomorrow morning before ten o'clock.",
    "All windows on the ground floor are closed and the alarm is armed.",
    "The air quality in the meeting room is poor, open a window please.",
    "Set the thermostat in the bedroom to nineteen degrees for the night.",
    "The camera at the back entrance lost its connection five minutes ago.",
    "Play some quiet music in the kitchen and dim the lights to half.",
    "The freezer door has been open for more than two minutes.",
    "Tomorrow the weather will be cloudy with some rain in the afternoon.",
]


def speech(text: str, speed: int) -> bytes:
    """A 22.05 kHz mono WAV of `text` from espeak-ng."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", f.name, text],
                       check=True)
        return Path(f.name).read_bytes()


def clips() -> list[bytes]:
    """16 clips of 4-8 s (the speaking rate is lowered until each is at least 4 s long)."""
    from workers.asr.audio import open_clip

    out = []
    for i, text in enumerate(SENTENCES):
        speed = 175 - 5 * (i % 4)
        wav = speech(text, speed)
        while open_clip(wav).seconds < 4.0:
            speed -= 15
            wav = speech(text, speed)
        out.append(wav)
    seconds = [open_clip(w).seconds for w in out]
    assert all(4.0 <= s <= 8.0 for s in seconds), seconds
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _folder(model: str) -> Path:
    if model == "tiny.en":
        from workers.asr.prepare import prepare

        return prepare(PREPARED)[0]
    from workers.asr import packaged
    from workers.asr.importing import prepare_from

    return prepare_from(packaged.base(), PREPARED, name="whisper-base")


def pipeline_part(wavs: list[bytes], folder: Path, reps: int, threads: int) -> None:
    import numpy as np
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.asr.audio import decode
    from workers.asr.pipeline import ClipRequest, WhisperPipeline

    device = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": threads})
    pipe = WhisperPipeline.load(FolderBundle(folder), ov.Core(), device)
    audios = [decode(w) for w in wavs]
    orders = [ClipRequest(a, language="en") for a in audios]
    settings = {"one at a time": 1, "batches of 4": 4, "batches of 8": 8, "one batch of 16": 16}

    def run(size: int) -> list:
        out = []
        for at in range(0, len(orders), size):
            out += pipe.transcribe(orders[at:at + size])
        return out

    reference = run(1)  # also the warm-up
    for size in settings.values():
        assert run(size) == reference, f"batches of {size} changed a transcript"
    features = np.zeros((1, pipe.settings["n_mels"], 3000), np.float32)

    def encoder_alone() -> None:
        for _ in orders:
            pipe._encode([features[0]])

    times: dict[str, list[float]] = {k: [] for k in [*settings, "encoder alone"]}
    loads = [load()]
    for _ in range(reps):
        for label, size in settings.items():
            t0 = time.perf_counter()
            got = run(size)
            times[label].append(time.perf_counter() - t0)
            assert got == reference
        t0 = time.perf_counter()
        encoder_alone()
        times["encoder alone"].append(time.perf_counter() - t0)
        loads.append(load())
    base = times["one at a time"]
    print(f"\npipeline, {len(orders)} clips of 4-8 s, {folder.name}, bf16 (CPU default), "
          f"{threads} threads, medians over {reps} reps; load average before/after each rep: "
          f"{' | '.join(loads)}")
    print(f"{'setting':20} {'total s':>8} {'per clip ms':>11} {'speed-up':>8}")
    for label, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        print(f"{label:20} {statistics.median(ts):8.3f} {statistics.median(ts) * 1000 / 16:11.1f} "
              f"{ratio:7.2f}x")
    print("(every batched run gave the transcripts of the one-at-a-time run; 'encoder alone' "
          "is the part of one-at-a-time spent in 16 encoder calls)")


def models_part(folder: Path, reps: int, threads: int) -> None:
    """The two models alone, 16 rows one at a time against as one call: the encoder over 16
    windows, the decoder's first step (it builds the cross-attention state) and 20 steps."""
    import numpy as np
    import openvino as ov

    from workers.asr.pipeline import _logits_of_last_position, _run

    core = ov.Core()
    props = {"INFERENCE_NUM_THREADS": threads}
    encoder = core.compile_model(str(folder / "openvino_encoder_model.xml"), "CPU", props)
    model = core.read_model(str(folder / "openvino_decoder_model.xml"))
    _logits_of_last_position(model)
    decoder = core.compile_model(model, "CPU", props)
    n_mels = encoder.input(0).get_partial_shape()[1].get_length()
    windows = np.random.default_rng(0).standard_normal((16, n_mels, 3000)).astype(np.float32)
    runs: dict[int, tuple] = {}
    for rows in (1, 16):
        enc, dec = encoder.create_infer_request(), decoder.create_infer_request()
        enc.set_input_tensor(ov.Tensor(windows[:rows].copy()))
        enc.infer()
        dec.set_tensor("encoder_hidden_states", ov.Tensor(enc.get_output_tensor(0).data.copy()))
        dec.set_tensor("beam_idx", ov.Tensor(np.arange(rows, dtype=np.int32)))
        dec.set_tensor("input_ids", ov.Tensor(np.full((rows, 1), 440, np.int64)))
        runs[rows] = (enc, dec)
    times: dict[str, dict[int, list[float]]] = {"encoder, 16 windows": {1: [], 16: []},
                                                "decoder first step, 16 rows": {1: [], 16: []},
                                                "decoder 20 steps, 16 rows": {1: [], 16: []}}
    def first_step(dec) -> None:
        dec.reset_state()
        _run(dec)

    def steps(dec) -> None:
        for _ in range(20):
            _run(dec)

    for _ in range(reps):
        for rows, (enc, dec) in runs.items():
            for label, work, req in (("encoder, 16 windows", _run, enc),
                                     ("decoder first step, 16 rows", first_step, dec),
                                     ("decoder 20 steps, 16 rows", steps, dec)):
                t0 = time.perf_counter()
                for _ in range(16 // rows):
                    work(req)
                times[label][rows].append(time.perf_counter() - t0)
    print(f"\nthe models alone (random inputs), medians over {reps} reps, load {load()}")
    for label, by in times.items():
        one, batch = statistics.median(by[1]), statistics.median(by[16])
        print(f"{label:28} one row a call {one * 1000:7.0f} ms   16 rows in one call "
              f"{batch * 1000:7.0f} ms   {one / batch:.2f}x")


def daemon_part(wavs: list[bytes], folder: Path, reps: int) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    import keys
    from edge import constants as C
    from edgectl.localdaemon import Daemon

    results: dict[str, list[float]] = {}
    loads: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ring = keys.Keyring.generate()
        ring.save(root / "keyring.json")
        keys.pack_bundle(folder, root / "bundles", ring)
        for label, max_batch in (("max_batch=1", 1), (f"max_batch={C.DEFAULT_MAX_BATCH} (default)",
                                                      None)):
            task: dict = {"devices": ["CPU"], "queue_limit": 1000, "device_limit": 100,
                          "timeout": 600}
            if max_batch is not None:
                task["max_batch"] = max_batch
            daemon = Daemon(root / label.split()[0], root / "bundles", root / "keyring.json",
                            tasks={"asr": task})
            try:
                daemon.start_worker(queue="edge.asr.CPU")
                daemon.start_agent()
            except BaseException:
                daemon.stop()
                raise
            got: dict[str, float] = {}
            lock = threading.Lock()

            def on_message(client, userdata, msg, got=got, lock=lock) -> None:
                body = json.loads(msg.payload)
                if body.get("status") != "ok":
                    print("  error answer:", body.get("error"), flush=True)
                with lock:
                    got[body["id"]] = time.perf_counter()

            devices = []
            for i in range(len(wavs)):
                c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"mic-{i}",
                                protocol=paho.MQTTv5)
                c.on_message = on_message
                c.connect("127.0.0.1", daemon.broker.port)
                c.subscribe(f"edge/results/mic-{i}/#", qos=1)
                c.loop_start()
                devices.append(c)
            time.sleep(1.0)
            try:
                for rep in range(reps + 1):  # the first burst warms up
                    with lock:
                        got.clear()
                    ids = [f"r{rep}-{i}" for i in range(len(wavs))]
                    payloads = [json.dumps({"id": rid, "data": base64.b64encode(w).decode()})
                                for rid, w in zip(ids, wavs, strict=True)]
                    t0 = time.perf_counter()
                    for i, (c, p) in enumerate(zip(devices, payloads, strict=True)):
                        c.publish(C.JOB_TOPIC.format(task="asr", device_id=f"mic-{i}"), p, qos=1)
                    while True:
                        with lock:
                            if len(got) == len(ids):
                                break
                        if time.perf_counter() - t0 > 600:
                            raise TimeoutError(f"{label}: {len(got)}/{len(ids)} answered")
                        time.sleep(0.01)
                    if rep:
                        results.setdefault(label, []).append(max(got.values()) - t0)
                        loads.setdefault(label, []).append(load())
            finally:
                for c in devices:
                    c.disconnect()
                    c.loop_stop()
                daemon.stop()
    print(f"\nend to end, {len(wavs)} devices each sending a 4-8 s clip at once, one CPU worker "
          f"(bf16), medians over {reps} bursts")
    one = statistics.median(next(iter(results.values())))
    for label, ts in results.items():
        print(f"{label:24} total {statistics.median(ts):6.2f} s  speed-up {one / statistics.median(ts):.2f}x"
              f"  (load average after each burst: {' | '.join(loads[label])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=["tiny.en", "base"], default="tiny.en")
    parser.add_argument("--daemon", action="store_true", help="also end to end through a daemon")
    parser.add_argument("--daemon-reps", type=int, default=3)
    args = parser.parse_args()
    wavs = clips()
    folder = _folder(args.model)
    pipeline_part(wavs, folder, args.reps, args.threads)
    models_part(folder, args.reps, args.threads)
    if args.daemon:
        daemon_part(wavs, folder, args.daemon_reps)


if __name__ == "__main__":
    main()
