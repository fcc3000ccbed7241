"""Sustained load: mixed tokenize/detokenize jobs at a fixed rate, checking that none is lost.

Starts a private daemon (Redis with appendfsync everysec as configs/redis.conf ships it,
Mosquitto, agent, one CPU worker),
publishes `--rate` jobs/s for `--seconds` from one device, then waits for every answer and
prints the rate reached, the answer codes, p50/p99 latency (publish -> answer at the device),
and any loss or duplicate. It reports what it measured, never a target.

    .venv/bin/python bench/load.py [--rate 100] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREPARED = Path.home() / ".cache" / "edge-daemon" / "prepared"
TEXTS = ["edge inference on a small gateway", "hello world", "the quick brown fox",
         "OpenVINO tokenizers in a worker"]
IDS = [101, 7592, 2088, 102]


@dataclass
class LoadResult:
    """What one load run saw."""

    sent: int
    seconds: float
    codes: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    answered_by: float = 0.0  # s from the first publish to the last first answer

    @property
    def rate(self) -> float:
        """Jobs published per second (what was offered)."""
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def ok_ratio(self) -> float:
        return self.codes["ok"] / self.sent if self.sent else 0.0

    @property
    def answer_rate(self) -> float:
        """`ok` answers per second, first publish to last answer (what was served)."""
        return self.codes["ok"] / self.answered_by if self.answered_by else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> str:
        return (f"sent {self.sent} in {self.seconds:.1f} s ({self.rate:.1f} jobs/s); "
                f"answers {dict(self.codes)} ({self.ok_ratio:.2%} ok, {self.answer_rate:.1f} "
                f"ok answers/s over {self.answered_by:.1f} s); lost {len(self.lost)}; "
                f"duplicated {len(self.duplicated)}; latency p50 {self.percentile(0.5):.1f} ms "
                f"p99 {self.percentile(0.99):.1f} ms max {max(self.latencies_ms or [0]):.1f} ms")


def run_load(dev, rate: float, seconds: float, prefix: str = "ld",
             answer_timeout: float = 120.0) -> LoadResult:
    """Publish mixed jobs at `rate` for `seconds` through `dev` (a DeviceClient), then collect."""
    sent_at: dict[str, float] = {}
    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        rid = f"{prefix}-{i}"
        if i % 2:
            env = {"id": rid, "ids": IDS, "params": {"skip_special_tokens": True}}
            task = "detokenize"
        else:
            env = {"id": rid, "text": TEXTS[i % len(TEXTS)]}
            task = "tokenize"
        sent_at[rid] = time.perf_counter()
        dev.client.publish(f"edge/jobs/{task}/{dev.device_id}", json.dumps(env), qos=1)
    elapsed = time.perf_counter() - start
    result = LoadResult(sent=n, seconds=elapsed)
    answers: dict[str, list] = {rid: [] for rid in sent_at}
    deadline = time.monotonic() + answer_timeout
    pending = set(sent_at)
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            if _drain(dev, rid, answers[rid]):
                pending.discard(rid)
        time.sleep(0.05)
    time.sleep(1.0)
    for rid in sent_at:
        _drain(dev, rid, answers[rid])
    for rid, got in answers.items():
        if not got:
            result.lost.append(rid)
            continue
        if len(got) > 1:
            result.duplicated[rid] = len(got)
        body, at = got[0]
        result.codes["ok" if body.get("status") == "ok" else body["error"]["code"]] += 1
        result.latencies_ms.append((at - sent_at[rid]) * 1000)
        result.answered_by = max(result.answered_by, at - start)
    return result


def _drain(dev, rid: str, into: list) -> bool:
    box = dev._box(rid)
    while True:
        try:
            kind, msg, at = box.get_nowait()
        except queue.Empty:
            return bool(into)
        if kind != "progress":
            into.append((json.loads(msg.payload), at))


def main(argv: list[str] | None = None) -> int:
    import keys
    from edgectl.localdaemon import Daemon
    from workers.tokenize.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ring = keys.Keyring.generate()
        ring.save(work / "keyring.json")
        for folder in prepare(PREPARED):
            keys.pack_bundle(folder, work / "bundles", ring)
        d = Daemon(work / "d", work / "bundles", work / "keyring.json",
                   appendfsync="everysec").start()
        try:
            dev = d.device("load-dev", session_expiry=3600)
            try:
                dev.request("tokenize", text="warm up")
                result = run_load(dev, args.rate, args.seconds)
            finally:
                dev.close()
        finally:
            d.stop()
    print(f"load: target {args.rate:g} jobs/s for {args.seconds:g} s (mixed tokenize/detokenize)")
    print(f"load: {result.summary()}")
    if result.latencies_ms:
        print(f"load: mean {statistics.fmean(result.latencies_ms):.1f} ms")
    return 1 if result.lost or result.duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
