"""Model activation under load: how long a switch takes, and what it costs the jobs in flight.

Starts a private daemon (Mosquitto, Redis, agent, one CPU worker) with the MiniLM tokenizer
installed as versions 1 and 2 (same weights), sends tokenize jobs at `--rate` jobs/s from one
device, measures the usual latency for `--baseline` s, then switches `--repeats` times
(`edgectl models activate NAME 2`, then `rollback`), each followed by `--settle` s of flow.
Per switch it reports:

* `cli`: wall time of the `edgectl models` command (prepare on every worker, commit, confirm);
* `serving`: from the command's start to the first answer from the new version;
* `worst`: the slowest job (publish -> answer at the device) published during the switch or
  `--settle` s after it, as a ratio of the baseline p99 (goal: <= 2x).

Medians over the repetitions, next to the baseline measured in the same run. It prints what it
measured, never a target it assumes.

    .venv/bin/python bench/activation.py [--rate 20] [--baseline 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREPARED = Path.home() / ".cache" / "edge-daemon" / "prepared"
NAME = "all-minilm-l6-v2"


def _install(work: Path, ring) -> Path:
    import keys
    from workers.tokenize.prepare import prepare

    (prepared,) = prepare(PREPARED, options={"models": NAME})
    root = work / "bundles"
    for version in ("1", "2"):
        folder = work / f"v{version}"
        shutil.copytree(prepared, folder)
        manifest = json.loads((folder / "bundle.json").read_text())
        manifest["version"] = version
        (folder / "bundle.json").write_text(json.dumps(manifest))
        keys.pack_bundle(folder, root, ring)
    return root


class Sender:
    """Publishes one job every 1/rate s from a thread; remembers when each was published."""

    def __init__(self, dev, rate: float) -> None:
        self.dev, self.period = dev, 1.0 / rate
        self.sent: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n, next_at = 0, time.perf_counter()
        while not self._stop.is_set():
            rid = f"a-{n}"
            at = time.perf_counter()
            self.dev.publish_envelope("tokenize", {"id": rid, "text": f"activation bench {n}"})
            self.sent.append((rid, at))
            n += 1
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def start(self) -> Sender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _switch(config: Path, *args: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edgectl.cli", "--config", str(config),
                           "models", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
    return start, time.perf_counter(), done.returncode


def main(argv: list[str] | None = None) -> int:
    import keys
    from edgectl.localdaemon import Daemon

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--baseline", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=4.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ring = keys.Keyring.generate()
        ring.save(work / "keyring.json")
        root = _install(work, ring)
        roomy = {"devices": ["CPU"], "queue_limit": 100_000, "device_limit": 100_000}
        d = Daemon(work / "d", root, work / "keyring.json",
                   tasks={"tokenize": roomy, "detokenize": {"devices": ["CPU"]}}).start()
        try:
            dev = d.device("bench-activation", session_expiry=3600)
            try:
                dev.request("tokenize", text="warm up", timeout=60)
                sender = Sender(dev, args.rate).start()
                time.sleep(args.baseline)
                switches = []
                for _ in range(args.repeats):
                    for step, target in ((("activate", NAME, "2"), "2"),
                                         (("rollback", NAME), "1")):
                        start, end, rc = _switch(d.config, *step)
                        switches.append((step[0], target, start, end, rc))
                        time.sleep(args.settle)
                sender.stop()
                answers = {rid: dev.wait(rid, timeout=300) for rid, _ in sender.sent}
            finally:
                dev.close()
        finally:
            d.stop()
    return report(args, sender.sent, answers, switches)


def report(args, sent, answers, switches) -> int:
    """Print the baseline and the per-switch figures; 1 when a job failed or a switch did."""
    rows = [(at, answers[rid].received - at, answers[rid]) for rid, at in sent]
    failed = [r.body for _, _, r in rows if not r.ok]
    base_end = switches[0][2]
    base = sorted(lat for at, lat, _ in rows if at < base_end)
    p50 = statistics.median(base) * 1000
    p99 = base[min(len(base) - 1, int(0.99 * len(base)))] * 1000
    print(f"activation: {len(sent)} jobs at {args.rate:g}/s; baseline ({len(base)} jobs) "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    figures: dict[str, list[tuple[float, float, float]]] = {"activate": [], "rollback": []}
    for op, target, start, end, rc in switches:
        window = [(at, lat, r) for at, lat, r in rows if start <= at <= end + args.settle]
        new = [at + lat for at, lat, r in window
               if r.ok and r.body["result"].get("version") == target]
        serving = (min(new) - start) if new else float("nan")
        worst = max(lat for _, lat, _ in window) * 1000 if window else float("nan")
        figures[op].append((end - start, serving, worst))
        print(f"  {op:8s} -> {target}: exit {rc}, cli {end - start:.2f} s, new version "
              f"answering after {serving:.2f} s, worst job {worst:.1f} ms "
              f"({worst / p99:.2f}x baseline p99)")
    for op, values in figures.items():
        cli, serving, worst = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"activation: {op} median of {len(values)}: cli {cli:.2f} s, serving after "
              f"{serving:.2f} s, worst job {worst:.1f} ms = {worst / p99:.2f}x baseline p99 "
              "(goal <= 2x)")
    if failed:
        print(f"activation: {len(failed)} jobs not ok, e.g. {failed[0]}")
    return 1 if failed or any(s[4] for s in switches) else 0


if __name__ == "__main__":
    sys.exit(main())
