"""Throughput under many devices: dynamic batching (max_batch) against one job per inference.

For each setting of `tasks.tokenize.max_batch` (1, then the default), a private daemon
(Redis with appendfsync everysec as configs/redis.conf ships it, Mosquitto, agent, one CPU
worker) serves 50 simulated devices, each its own MQTT connection, sending tokenize jobs of 1-3
short texts (JSON envelopes, QoS 1):

  * idle: one job at a time from one device, a pause after each answer (single-job latency);
  * closed loop: every device sends its next job as soon as its answer arrives;
  * open loop: jobs at a fixed total rate spread over the devices, rate after rate, until the
    p99 passes 100 ms.

Latency is publish -> answer at the device. Both settings run in the same invocation (alternating
for `--rounds`, medians over rounds), so the ratios printed compare like with like on this
machine's load. It reports what it measured, never a target.

    .venv/bin/python bench/throughput.py [--rounds 1] [--seconds 8] [--step-seconds 4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge import constants as C  # noqa: E402
from edgectl.localdaemon import Daemon  # noqa: E402

PREPARED = Path("~/.cache/edge-daemon/prepared").expanduser()
FSYNC = "everysec"  # as configs/redis.conf ships it
DEVICES = 50
TEXTS = ["turn the lights on", "temperature is 21.5 degrees", "door opened", "hello world",
         "motion detected in the hallway", "battery low", "the quick brown fox", "ok",
         "pump pressure nominal", "Zürich café sensor 7"]
RATES = (25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Fleet:
    """`n` devices, one MQTT connection each; records when each job was sent and answered."""

    def __init__(self, port: int, n: int = DEVICES) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.got: dict[str, tuple[float, str]] = {}
        self.timings: dict[str, dict[str, float]] = {}  # the answer's own (agent -> worker)
        self.rng = random.Random(7)
        self.closed_loop = False
        self.clients = []
        for i in range(n):
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{i}",
                            protocol=paho.MQTTv5)
            c.user_data_set(i)
            c.on_message = self._on_message
            c.max_inflight_messages_set(1000)
            c.connect("127.0.0.1", port)
            c.subscribe(f"edge/results/sim-{i}/#", qos=1)
            c.loop_start()
            self.clients.append(c)
        time.sleep(1.0)  # connected and subscribed

    def payload(self, rid: str) -> bytes:
        texts = self.rng.sample(TEXTS, self.rng.randint(1, 3))
        return json.dumps({"id": rid, "text": texts}).encode()

    def send(self, i: int) -> str:
        rid = uuid.uuid4().hex[:16]
        payload = self.payload(rid)
        with self.lock:
            self.sent[rid] = time.perf_counter()
        self.clients[i].publish(C.JOB_TOPIC.format(task="tokenize", device_id=f"sim-{i}"),
                                payload, qos=1)
        return rid

    def _on_message(self, client, userdata, msg) -> None:
        at = time.perf_counter()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        status = "ok" if body.get("status") == "ok" else body.get("error", {}).get("code", "?")
        with self.lock:
            self.got[body.get("id", "")] = (at, status)
            self.timings[body.get("id", "")] = body.get("timings") or {}
        if self.closed_loop:
            self.send(userdata)

    def wait_all(self, rids: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(r in self.got for r in rids):
                    return
            time.sleep(0.02)

    def stats(self, rids: list[str], elapsed: float | None = None) -> dict[str, float]:
        with self.lock:
            pairs = [(self.sent[r], self.got[r]) for r in rids if r in self.got]
        lat = [(got - sent) * 1000 for sent, (got, _) in pairs]
        with self.lock:
            tim = [self.timings[r] for r in rids if r in self.got and self.timings.get(r)]
        stages = {f"{k}_p50": statistics.median(t[k] for t in tim) if tim else float("nan")
                  for k in ("queue_ms", "run_ms", "total_ms")}
        errors = sum(1 for _, (_, status) in pairs if status != "ok")
        if elapsed is None and pairs:
            elapsed = max(g for _, (g, _) in pairs) - min(s for s, _ in pairs)
        return {"n": len(rids), "answered": len(pairs), "errors": errors,
                "jobs_s": len(pairs) / elapsed if elapsed else float("nan"),
                "p50": statistics.median(lat) if lat else float("nan"), "p99": pct(lat, 0.99),
                **stages}

    def close(self) -> None:
        self.closed_loop = False
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def idle(fleet: Fleet, n: int = 30) -> dict[str, float]:
    """One job at a time, 100 ms of quiet after each answer."""
    rids = []
    for _ in range(n):
        rid = fleet.send(0)
        fleet.wait_all([rid], 10)
        rids.append(rid)
        time.sleep(0.1)
    return fleet.stats(rids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids(daemon: Daemon) -> dict[str, int]:
    """The processes of the daemon, and this one (the simulated devices)."""
    import os

    out = {"agent": daemon.agent.pid, "redis": daemon.redis.proc.pid,
           "mosquitto": daemon.broker.proc.pid, "devices (bench)": os.getpid()}
    for i, w in enumerate(daemon.workers):
        out[f"worker{i}"] = w.pid
    return out


def closed(fleet: Fleet, seconds: float, procs: dict[str, int] | None = None
           ) -> dict[str, float]:
    """Every device keeps one job in flight; counts the answers of the last `seconds`; with
    `procs`, also the share of one core each process used meanwhile (`cpu_<name>`)."""
    fleet.closed_loop = True
    for i in range(len(fleet.clients)):
        fleet.send(i)
    time.sleep(1.0)  # warm-up: batches form
    procs = procs or {}
    before = {k: cpu_seconds(p) for k, p in procs.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    t1 = time.perf_counter()
    used = {f"cpu_{k}": (cpu_seconds(p) - before[k]) / (t1 - t0) for k, p in procs.items()}
    fleet.closed_loop = False
    with fleet.lock:
        window = [r for r, s in fleet.sent.items() if t0 <= s and r in fleet.got
                  and fleet.got[r][0] <= t1]
    stats = fleet.stats(window, elapsed=t1 - t0) | used
    time.sleep(2.0)  # the last jobs in flight drain
    return stats


def open_loop(fleet: Fleet, rate: float, seconds: float) -> dict[str, float]:
    """`rate` jobs/s in total, round-robin over the devices, for `seconds`."""
    rids: list[str] = []
    n = int(rate * seconds)
    start = time.perf_counter()
    for k in range(n):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        rids.append(fleet.send(k % len(fleet.clients)))
    sent_for = time.perf_counter() - start
    fleet.wait_all(rids, 60)
    stats = fleet.stats(rids)
    stats["offered"] = n / sent_for
    return stats


def drain(daemon: Daemon, n: int = 2000) -> dict[str, float]:
    """The worker alone: `n` jobs from the 50 devices stored straight into Redis the way the
    agent stores them (no MQTT) while the workers are paused (SIGSTOP, by pid), then timed
    from their SIGCONT until every one is answered in the outbox: how fast it drains a backlog."""
    import os
    import signal

    from edge.config import load
    from edge.jobs import Route
    from edge.protocol import Submission
    from edge.queueing import Enqueuer

    enq = Enqueuer(daemon.conn, load(daemon.config))
    rng = random.Random(3)
    subs = []
    for k in range(n):
        dev, rid = f"sim-{k % DEVICES}", uuid.uuid4().hex[:16]
        route = Route(dev, rid, "tokenize", "envelope", f"edge/results/{dev}/{rid}")
        subs.append(Submission(route=route, params={}, batch=True,
                               text=tuple(rng.sample(TEXTS, rng.randint(1, 3)))))
    workers = [w.pid for w in daemon.workers]  # ours, by pid
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        for sub in subs:
            enq.submit(sub, time.time())
    finally:
        t0 = time.perf_counter()
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    while daemon.conn.zcard(C.UNANSWERED_KEY):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    return {"jobs_s": n / elapsed, "seconds": elapsed}


def intake(daemon: Daemon, fleet: Fleet, n: int = 2000) -> dict[str, float]:
    """The agent alone: `n` jobs published by the 50 devices at once while the workers are
    paused (SIGSTOP, by pid), timed from the first publish until every one is stored in Redis
    (the reaper's index of unanswered jobs holds it): how fast the agent takes a burst in."""
    import os
    import signal

    workers = [w.pid for w in daemon.workers]  # ours, by pid
    base = daemon.conn.zcard(C.UNANSWERED_KEY)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        rids = [fleet.send(k % len(fleet.clients)) for k in range(n)]
        deadline = time.monotonic() + 120
        while daemon.conn.zcard(C.UNANSWERED_KEY) < base + n and time.monotonic() < deadline:
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        stored = daemon.conn.zcard(C.UNANSWERED_KEY) - base
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    fleet.wait_all(rids, 120)
    return {"jobs_s": stored / elapsed, "stored": stored}


def run_setting(workdir: Path, bundle_root: Path, ring_file: Path, max_batch: int | None,
                seconds: float, step_seconds: float, workers: int = 1) -> dict:
    task: dict = {"devices": ["CPU"], "queue_limit": 100000, "device_limit": 10000}
    if max_batch is not None:
        task["max_batch"] = max_batch
    daemon = Daemon(workdir, bundle_root, ring_file, tasks={"tokenize": task},
                    appendfsync=FSYNC).start()
    for _ in range(workers - 1):  # several workers for one device: `edge-worker --device CPU` again
        proc = daemon._spawn("workers.worker", "--device", "CPU", log="worker-more.log")
        daemon.workers.append(proc)
    while daemon.conn.zcard(C.ALIVE_KEY.format(queue="edge.tokenize.CPU")) < workers:
        time.sleep(0.2)
    fleet = Fleet(daemon.broker.port)
    try:
        idle(fleet, 10)  # warm-up
        out: dict = {"idle": idle(fleet), "closed": closed(fleet, seconds, pids(daemon)),
                     "open": [], "drain": drain(daemon), "intake": intake(daemon, fleet)}
        print(f"  max_batch={max_batch or 'default'} idle p50 {out['idle']['p50']:.2f} ms; "
              f"closed loop {out['closed']['jobs_s']:.0f} jobs/s p50 {out['closed']['p50']:.1f} "
              f"p99 {out['closed']['p99']:.1f} ms (in the gateway, p50: queued "
              f"{out['closed']['queue_ms_p50']:.1f}, run {out['closed']['run_ms_p50']:.1f}, "
              f"agent to answer stored {out['closed']['total_ms_p50']:.1f}); CPU (cores) "
              + ", ".join(f"{k[4:]} {v:.2f}" for k, v in out["closed"].items()
                          if k.startswith("cpu_")), flush=True)
        print(f"  max_batch={max_batch or 'default'} worker alone (a backlog of 2000 jobs stored "
              f"straight into Redis): {out['drain']['jobs_s']:.0f} jobs/s; agent alone (2000 jobs published "
              f"at once, workers paused): {out['intake']['jobs_s']:.0f} jobs/s stored", flush=True)
        for rate in RATES:
            step = open_loop(fleet, rate, step_seconds)
            step["rate"] = rate
            out["open"].append(step)
            print(f"  max_batch={max_batch or 'default'} open {rate}/s: "
                  f"{step['jobs_s']:.0f} jobs/s p50 {step['p50']:.1f} p99 {step['p99']:.1f} ms "
                  f"errors {step['errors']}", flush=True)
            if not step["p99"] <= 100 or step["answered"] < step["n"]:
                break
        return out
    finally:
        fleet.close()
        daemon.stop()


def best_rate(steps: list[dict], p99_ms: float) -> dict | None:
    """The highest offered rate answered in full with p99 under `p99_ms`."""
    ok = [s for s in steps if s["p99"] < p99_ms and s["answered"] == s["n"] and not s["errors"]]
    return max(ok, key=lambda s: s["jobs_s"]) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0, help="closed-loop window")
    parser.add_argument("--step-seconds", type=float, default=4.0, help="each open-loop rate")
    parser.add_argument("--workers", type=int, default=1, help="CPU workers (processes)")
    args = parser.parse_args()
    import keys
    from workers.tokenize.prepare import prepare

    settings = {"max_batch=1": 1, f"max_batch={C.DEFAULT_MAX_BATCH} (default)": None}
    results: dict[str, list[dict]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ring = keys.Keyring.generate()
        ring_file = root / "keyring.json"
        ring.save(ring_file)
        bundle_root = root / "bundles"
        for folder in prepare(PREPARED):
            keys.pack_bundle(folder, bundle_root, ring)
        for r in range(args.rounds):
            for label, mb in settings.items():
                print(f"round {r + 1}: {label}", flush=True)
                results[label].append(run_setting(root / f"{r}-{mb}", bundle_root, ring_file, mb,
                                                  args.seconds, args.step_seconds, args.workers))
    print(f"\n{DEVICES} devices, tokenize jobs of 1-3 short texts, {args.workers} CPU worker(s), redis "
          f"appendfsync {FSYNC}; medians over {args.rounds} round(s)")
    print(f"{'setting':22} {'idle p50':>8} {'closed jobs/s':>13} {'p50':>6} {'p99':>6} "
          f"{'open best (p99<50)':>18} {'p50':>6} {'p99':>6} {'max open (p99<100)':>18} "
          f"{'worker alone':>12} {'agent alone':>11}")
    summary = {}
    for label, rounds in results.items():
        def med(f, rounds=rounds):
            vals = [f(x) for x in rounds]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")
        b50 = [best_rate(x["open"], 50) for x in rounds]
        b100 = [best_rate(x["open"], 100) for x in rounds]
        s = {"idle": med(lambda x: x["idle"]["p50"]),
             "closed": med(lambda x: x["closed"]["jobs_s"]),
             "closed_p50": med(lambda x: x["closed"]["p50"]),
             "closed_p99": med(lambda x: x["closed"]["p99"]),
             "open50": statistics.median([b["jobs_s"] if b else 0.0 for b in b50]),
             "open50_p50": med(lambda x: (best_rate(x["open"], 50) or {}).get("p50")),
             "open50_p99": med(lambda x: (best_rate(x["open"], 50) or {}).get("p99")),
             "open100": statistics.median([b["jobs_s"] if b else 0.0 for b in b100]),
             "drain": med(lambda x: x["drain"]["jobs_s"]),
             "intake": med(lambda x: x["intake"]["jobs_s"])}
        summary[label] = s
        print(f"{label:22} {s['idle']:8.2f} {s['closed']:13.0f} {s['closed_p50']:6.1f} "
              f"{s['closed_p99']:6.1f} {s['open50']:18.0f} {s['open50_p50']:6.1f} "
              f"{s['open50_p99']:6.1f} {s['open100']:18.0f} {s['drain']:12.0f} {s['intake']:11.0f}")
    one, dflt = summary.values()

    def ratio(key: str) -> str:
        return f"{dflt[key] / one[key]:.2f}x" if one[key] > 0 else "n/a (max_batch=1 had none)"

    print(f"\nratios default / max_batch=1: closed-loop jobs/s {ratio('closed')}, "
          f"open-loop jobs/s at p99 < 50 ms {ratio('open50')}, idle p50 {ratio('idle')}, "
          f"worker alone jobs/s {ratio('drain')}")
    print("goals (issue 18): >= 5x jobs/s of max_batch=1 with p99 < 50 ms at that rate; "
          "idle p50 within 10%")


if __name__ == "__main__":
    main()
