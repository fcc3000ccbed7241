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
import json
import os
import statistics
import sys
import threading
import time
import uuid
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
    parser.add_argument("--e2e", action="store_true",
                        help="also end to end: a private daemon, one MQTT device per job")
    parser.add_argument("--rounds", type=int, default=3, help="--e2e: daemons per setting")
    parser.add_argument("--seconds", type=float, default=10.0, help="--e2e: closed-loop window")
    args = parser.parse_args()
    sizes = [int(b) for b in args.max_batch.split(",")]
    if args.e2e:
        end_to_end(crops(args.jobs), sizes, args.reps, args.rounds, args.seconds)
        return
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


class Devices:
    """One MQTT 5 connection per device; each sends its PNG raw (MQTT properties carry the
    id) and records when each answer came and whether it was ok."""

    def __init__(self, port: int, pngs: list[bytes]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.pngs = pngs
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.got: dict[str, tuple[float, bool]] = {}
        self.closed_loop = False
        self.clients = []
        for i in range(len(pngs)):
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sr-{i}",
                            protocol=paho.MQTTv5)
            c.user_data_set(i)
            c.on_message = self._on_message
            c.connect("127.0.0.1", port)
            c.subscribe(f"edge/results/sr-{i}/#", qos=1)
            c.loop_start()
            self.clients.append(c)
        time.sleep(1.0)  # connected and subscribed

    def send(self, i: int) -> str:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from edge import constants as C

        rid = uuid.uuid4().hex[:16]
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "image/png"
        props.UserProperty = [("id", rid)]
        with self.lock:
            self.sent[rid] = time.perf_counter()
        self.clients[i].publish(C.JOB_TOPIC.format(task="superres", device_id=f"sr-{i}"),
                                self.pngs[i], qos=1, properties=props)
        return rid

    def _on_message(self, client, userdata, msg) -> None:
        at = time.perf_counter()
        user = dict(getattr(msg.properties, "UserProperty", None) or [])
        if "id" in user:  # a raw answer: the 4x PNG
            rid, ok = user["id"], user.get("status") == "ok"
        else:  # an error answer (JSON)
            body = json.loads(msg.payload)
            rid, ok = body.get("id", ""), body.get("status") == "ok"
        with self.lock:
            self.got[rid] = (at, ok)
        if self.closed_loop:
            self.send(userdata)

    def burst(self) -> float:
        """Every device sends one job at once: seconds until all are answered."""
        t0 = time.perf_counter()
        rids = [self.send(i) for i in range(len(self.clients))]
        while True:
            with self.lock:
                if all(r in self.got for r in rids):
                    assert all(self.got[r][1] for r in rids), "an error answer"
                    return max(self.got[r][0] for r in rids) - t0
            time.sleep(0.005)

    def closed(self, seconds: float) -> float:
        """Every device sends its next job when answered: images/s over `seconds`."""
        self.closed_loop = True
        for i in range(len(self.clients)):
            self.send(i)
        time.sleep(2.0)  # warm-up: batches form
        with self.lock:
            before = len(self.got)
        t0 = time.perf_counter()
        time.sleep(seconds)
        with self.lock:
            done = len(self.got) - before
        elapsed = time.perf_counter() - t0
        self.closed_loop = False
        time.sleep(3.0)  # the last jobs in flight drain
        return done / elapsed

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def end_to_end(images: list[np.ndarray], sizes: list[int], reps: int, rounds: int,
               seconds: float) -> None:
    """A private daemon per setting (Redis, Mosquitto, agent, one CPU worker with the
    default LATENCY hint) and one MQTT device per image: a burst of one job from each device
    (median over `reps`) and a closed loop, for each max_batch, alternating over `rounds`."""
    import tempfile

    import keys
    from edgectl.localdaemon import Daemon

    pngs = [pyvips.Image.new_from_array(img).pngsave_buffer() for img in images]
    burst: dict[int, list[float]] = {b: [] for b in sizes}
    loop: dict[int, list[float]] = {b: [] for b in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ring = keys.Keyring.generate()
        ring.save(root / "keyring.json")
        keys.pack_bundle(PREPARED / "sr-fast-x4", root / "bundles", ring)
        for r in range(rounds):
            for b in sizes:
                task = {"devices": ["CPU"], "queue_limit": 1000, "device_limit": 100,
                        "max_batch": b}
                d = Daemon(root / f"{r}-{b}", root / "bundles", root / "keyring.json",
                           tasks={"superres": task})
                try:
                    d.start_worker(queue="edge.superres.CPU")
                    d.start_agent()
                    devices = Devices(d.broker.port, pngs)
                    try:
                        devices.burst()  # warm-up
                        times = [devices.burst() for _ in range(reps)]
                        burst[b].append(statistics.median(times))
                        loop[b].append(devices.closed(seconds))
                    finally:
                        devices.close()
                finally:
                    d.stop()
                print(f"  round {r + 1} max_batch {b}: burst {len(pngs) / burst[b][-1]:.1f} "
                      f"images/s, closed loop {loop[b][-1]:.1f} images/s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    n = len(pngs)
    base_b, base_l = statistics.median(burst[sizes[0]]), statistics.median(loop[sizes[0]])
    print(f"end to end, {n} devices, one {W}x{H} PNG each (medians over {rounds} rounds):")
    for b in sizes:
        tb, tl = statistics.median(burst[b]), statistics.median(loop[b])
        print(f"  max_batch {b:2}: burst of {n} jobs {n / tb:5.1f} images/s x{base_b / tb:.2f}, "
              f"closed loop {tl:5.1f} images/s x{tl / base_l:.2f}")


if __name__ == "__main__":
    main()
