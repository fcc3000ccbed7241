"""Workers per device on this machine's cores: one worker with every core against several
workers that split them (`edge-worker --device CPU`, `--device CPU:2`, ... with
`[devices.CPU] threads`), for two workloads over MQTT through the whole daemon:

  * tokenize: 50 simulated devices in a closed loop (each sends its next job of 1-3 short texts
    as soon as its answer arrives), the default max_batch; then the worker(s) alone draining a
    backlog of 2000 jobs stored straight into Redis (bench/throughput.py's measures);
  * asr: 8 devices in a closed loop, one Whisper tiny.en job (a ~3.5 s espeak-ng clip, base64
    in a JSON envelope) in flight each; the answers that arrive in the window count.

Every layout runs in every round, in turn, each on a fresh private daemon (Redis, Mosquitto,
agent, workers), so that the machine's load falls on all of them alike; the table gives
medians over rounds, the ratio to the first layout, the cores the daemon's processes used in
the window and its jobs per core-second (on a machine others load too, a layout with more
threads wins a larger share of the cores: that part of its jobs/s is not the layout's doing),
and the load average seen during each workload. It reports what it measured, never a target.

    .venv/bin/python bench/workers_layout.py [--rounds 3] [--seconds 10] [--asr-seconds 30]
                                             [--layouts 1x0,2x1] [--tasks tokenize,asr]

A layout `WxT` is W workers with T threads each (T = 0: `threads` unset, every core each).
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
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import DEVICES, FSYNC, PREPARED, Fleet, closed, cpu_seconds, drain  # noqa: E402

from edge import constants as C  # noqa: E402
from edgectl.localdaemon import Daemon  # noqa: E402

ASR_DEVICES = 8
CLIP = "Please turn off the lights in the kitchen and lock the front door."


class AsrFleet(Fleet):
    """`n` devices sending one Whisper job each per turn (the same clip)."""

    def __init__(self, port: int, n: int, wav: bytes) -> None:
        self.wav = base64.b64encode(wav).decode()
        super().__init__(port, n)

    def send(self, i: int) -> str:
        rid = uuid.uuid4().hex[:16]
        with self.lock:
            self.sent[rid] = time.perf_counter()
        self.clients[i].publish(C.JOB_TOPIC.format(task="asr", device_id=f"sim-{i}"),
                                json.dumps({"id": rid, "data": self.wav}).encode(), qos=1)
        return rid


def start(workdir: Path, bundles: Path, ring_file: Path, task: str, layout: tuple[int, int],
          ) -> Daemon:
    """A private daemon serving `task` on CPU with `layout` = (workers, threads)."""
    workers, threads = layout
    limits: dict = {"devices": ["CPU"], "queue_limit": 100000, "device_limit": 10000}
    if task == "asr":
        limits |= {"max_bytes": 20 << 20, "timeout": 300}
    extra = {"devices.CPU": {"threads": threads}} if threads else None
    daemon = Daemon(workdir, bundles, ring_file, tasks={task: limits}, extra=extra,
                    appendfsync=FSYNC)
    try:
        queue = f"edge.{task}.CPU"
        daemon.start_worker("CPU", queue=queue)
        for n in range(2, workers + 1):  # the further workers of the device
            daemon.workers.append(daemon._spawn("workers.worker", "--device", f"CPU:{n}",
                                                log=f"worker-CPU-{n}.log"))
        while daemon.conn.zcard(C.ALIVE_KEY.format(queue=queue)) < workers:
            if any(w.poll() is not None for w in daemon.workers):
                raise RuntimeError(f"a worker exited:\n{daemon.log('worker-CPU-2.log')}")
            time.sleep(0.2)
        daemon.start_agent()
    except BaseException:
        daemon.stop()
        raise
    return daemon


def daemon_pids(daemon: Daemon) -> dict[str, int]:
    """The daemon's processes (not this one, which plays the devices)."""
    assert daemon.agent is not None
    out = {"agent": daemon.agent.pid, "redis": daemon.redis.proc.pid,
           "mosquitto": daemon.broker.proc.pid}
    return out | {f"worker{i}": w.pid for i, w in enumerate(daemon.workers)}


def efficiency(out: dict) -> dict:
    """Cores the daemon used in the window, and jobs per core-second: on a machine that others
    load too, a layout with more threads takes a larger share of the cores; jobs per core-second
    is what the layout itself does with what it got."""
    cores = sum(v for k, v in out.items() if k.startswith("cpu_"))
    out["cores"] = cores
    out["per_core_s"] = out["jobs_s"] / cores if cores else float("nan")
    return out


def run_tokenize(daemon: Daemon, seconds: float) -> dict:
    fleet = Fleet(daemon.broker.port)
    try:
        closed(fleet, 2.0)  # warm-up: batches form, models run once
        load0 = os.getloadavg()[0]
        out = efficiency(closed(fleet, seconds, daemon_pids(daemon)))
        out["drain"] = drain(daemon)["jobs_s"]
        out["load"] = max(load0, os.getloadavg()[0])
        return out
    finally:
        fleet.close()


def answered_in(fleet: Fleet, seconds: float, procs: dict[str, int]) -> dict:
    """Closed loop; the answers that arrive within `seconds` (after one turn of warm-up),
    whenever their job was sent: a job here takes longer than bench/throughput.py's window
    logic (sent and answered inside it) can wait for."""
    fleet.closed_loop = True
    for i in range(len(fleet.clients)):
        fleet.send(i)
    with fleet.lock:
        first = list(fleet.sent)
    fleet.wait_all(first, 300)  # warm-up: one turn of every device
    before = {k: cpu_seconds(p) for k, p in procs.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    t1 = time.perf_counter()
    used = {f"cpu_{k}": (cpu_seconds(p) - before[k]) / (t1 - t0) for k, p in procs.items()}
    fleet.closed_loop = False
    with fleet.lock:
        window = [r for r, (at, _) in fleet.got.items() if t0 <= at <= t1]
    stats = efficiency(fleet.stats(window, elapsed=t1 - t0) | used)
    with fleet.lock:
        pending = [r for r in fleet.sent if r not in fleet.got]
    fleet.wait_all(pending, 300)  # the jobs in flight finish before the daemon stops
    return stats


def run_asr(daemon: Daemon, seconds: float, wav: bytes) -> dict:
    fleet = AsrFleet(daemon.broker.port, ASR_DEVICES, wav)
    try:
        load0 = os.getloadavg()[0]
        out = answered_in(fleet, seconds, daemon_pids(daemon))
        out["load"] = max(load0, os.getloadavg()[0])
        return out
    finally:
        fleet.close()


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, t = item.lower().split("x")
        out.append((int(w), int(t)))
    return out


def label(layout: tuple[int, int]) -> str:
    w, t = layout
    return f"{w} worker{'s' if w > 1 else ''} x {t or 'all'} thread{'s' if t != 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="tokenize closed-loop window")
    parser.add_argument("--asr-seconds", type=float, default=30.0, help="asr closed-loop window")
    parser.add_argument("--layouts", default="1x0,2x1",
                        help="comma list of WORKERSxTHREADS (0 = threads unset); first = base")
    parser.add_argument("--tasks", default="tokenize,asr")
    args = parser.parse_args()
    layouts = parse_layouts(args.layouts)
    tasks = args.tasks.split(",")
    import keys

    wav = subprocess.run(["espeak-ng", "--stdout", CLIP], check=True,
                         capture_output=True).stdout
    results: dict[tuple[str, tuple[int, int]], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ring = keys.Keyring.generate()
        ring_file = root / "keyring.json"
        ring.save(ring_file)
        bundles = {}
        for task in tasks:
            bundles[task] = root / f"bundles-{task}"
            prepare = __import__(f"workers.{task}.prepare", fromlist=["prepare"]).prepare
            for folder in prepare(PREPARED):
                keys.pack_bundle(folder, bundles[task], ring)
        for r in range(args.rounds):
            for task in tasks:
                shift = r % len(layouts)  # each layout goes first in turn
                for layout in layouts[shift:] + layouts[:shift]:
                    workdir = root / f"{r}-{task}-{layout[0]}x{layout[1]}"
                    workdir.mkdir()
                    daemon = start(workdir, bundles[task], ring_file, task, layout)
                    try:
                        got = (run_tokenize(daemon, args.seconds) if task == "tokenize"
                               else run_asr(daemon, args.asr_seconds, wav))
                    finally:
                        daemon.stop()
                    results.setdefault((task, layout), []).append(got)
                    extra = f", worker(s) alone {got['drain']:.0f} jobs/s" if "drain" in got else ""
                    print(f"round {r + 1} {task:8} {label(layout):24} {got['jobs_s']:7.1f} "
                          f"jobs/s p50 {got['p50']:7.1f} p99 {got['p99']:7.1f} ms "
                          f"errors {got['errors']}{extra}; daemon used {got['cores']:.2f} "
                          f"cores: {got['per_core_s']:.1f} jobs per core-second "
                          f"(load {got['load']:.1f})", flush=True)
    print(f"\nmedians over {args.rounds} round(s); {os.cpu_count()} cores; tokenize: {DEVICES} "
          f"devices, default max_batch; asr: {ASR_DEVICES} devices, Whisper tiny.en, "
          f"{(len(wav) - 44) / 44100:.1f} s clip (espeak-ng, 22.05 kHz); redis appendfsync {FSYNC}")
    print(f"{'task':9}{'layout':26}{'jobs/s':>8}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'alone/s':>9}{'ratio':>7}{'cores':>6}{'/core-s':>8}{'ratio':>7}{'load':>6}")
    for task in tasks:
        base = None
        for layout in layouts:
            rows = results[(task, layout)]
            med = {k: statistics.median(x[k] for x in rows)
                   for k in ("jobs_s", "p50", "p99", "load", "cores", "per_core_s",
                             *(["drain"] if task == "tokenize"
                                                                 else []))}
            base = base or med
            alone = (f"{med['drain']:9.0f}{med['drain'] / base['drain']:7.2f}"
                     if "drain" in med else f"{'-':>9}{'-':>7}")
            print(f"{task:9}{label(layout):26}{med['jobs_s']:8.1f}"
                  f"{med['jobs_s'] / base['jobs_s']:7.2f}{med['p50']:8.1f}{med['p99']:8.1f}"
                  f"{alone}{med['cores']:6.2f}{med['per_core_s']:8.1f}"
                  f"{med['per_core_s'] / base['per_core_s']:7.2f}{med['load']:6.1f}")


if __name__ == "__main__":
    main()
