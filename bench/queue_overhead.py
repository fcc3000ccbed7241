"""Queue overhead: what MQTT in, validation, blob, RQ, outbox and MQTT out add to a job.

Measured in one run, on the same private Redis:
  * bare RQ: enqueue -> a no-op job on a SimpleWorker (JSON serializer) replying through a Redis
    stream -> the reply read by the client (the baseline);
  * ours: a device publishes a tokenize job over MQTT -> its answer arrives, minus the in-process
    time of the same job (the handler alone, as `edgectl run` runs it).
At a low rate (latency) and at 100 jobs/s, plus a burst for sustained throughput.

    .venv/bin/python bench/queue_overhead.py [--n 300] [--low-n 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from edge.localdaemon import Daemon  # noqa: E402
from edge.localservices import RedisServer  # noqa: E402

PREPARED = Path("~/.cache/edge-daemon/prepared").expanduser()
TEXT = "Edge inference on the gateway, measured."
# The production Redis (configs/redis.conf) fsyncs its AOF every second; `always` costs one
# fsync per write (several ms on this VM's disk) and is measured separately with --fsync always.
FSYNC = "everysec"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def paced(n: int, rate: float, send) -> None:
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i)


# ------------------------------------------------------------------ bare RQ


def bare_rq(workdir: Path, n: int, low_n: int) -> dict[str, float]:
    server = RedisServer(workdir / "redis-bare", appendfsync=FSYNC).start()
    conn = redis.Redis.from_url(server.url)
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, 'bench'); import redis; from rq import SimpleWorker;"
         "from rq.serializers import JSONSerializer;"
         f"c = redis.Redis.from_url('{server.url}');"
         "SimpleWorker(['bare'], connection=c, serializer=JSONSerializer).work("
         "logging_level='WARNING')"],
        cwd=Path(__file__).resolve().parents[1])
    q = Queue("bare", connection=conn, serializer=JSONSerializer)
    stream = "bare:replies"
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    done = threading.Event()
    expected = [0]

    def reader():
        last = "$"
        rconn = redis.Redis.from_url(server.url)
        while not done.is_set():
            resp = rconn.xread({stream: last}, block=500, count=500)
            for _, entries in resp or []:
                for eid, fields in entries:
                    got[fields[b"token"].decode()] = time.perf_counter()
                    last = eid
            if len(got) >= expected[0]:
                done.set()

    def send(i):
        token = uuid.uuid4().hex
        sent[token] = time.perf_counter()
        q.enqueue("_rq_noop.reply", stream, token)

    try:
        time.sleep(1.0)
        out = {}
        for label, count, rate in (("low", low_n, 5.0), ("100/s", n, 100.0), ("burst", n, 1e9)):
            sent.clear(), got.clear()
            expected[0] = count
            done.clear()
            t = threading.Thread(target=reader)
            t.start()
            time.sleep(0.1)
            t0 = time.perf_counter()
            paced(count, rate, send)
            done.wait(120)
            elapsed = max(got.values()) - t0
            lat = [(got[k] - sent[k]) * 1000 for k in sent if k in got]
            out[label] = {"p50": statistics.median(lat), "p99": pct(lat, 0.99),
                          "rate": count / elapsed, "lost": count - len(lat)}
            done.set()
            t.join()
        return out
    finally:
        worker.terminate()
        worker.wait(10)
        server.stop()


# ------------------------------------------------------------------ ours


def in_process_ms(bundle_root: Path, ring) -> float:
    """The handler alone, as `edgectl run` runs it (median over 200 calls)."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401

    import keys
    from workers.api import DeviceSettings, Request, no_progress
    from workers.tokenize import load

    bundles, _ = keys.open_all(bundle_root, ring)
    handler = load([b for b in bundles if b.task == "tokenize"], ov.Core(),
                   DeviceSettings("CPU", {"PERFORMANCE_HINT": "LATENCY"}))
    req = Request(task="tokenize", params={"model": "all-minilm-l6-v2",
                                           "add_special_tokens": True}, text=TEXT)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        handler(req, no_progress)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def ours(workdir: Path, n: int, low_n: int) -> tuple[dict, float]:
    import keys
    from workers.tokenize.prepare import prepare

    ring = keys.Keyring.generate()
    ring_file = workdir / "keyring.json"
    ring.save(ring_file)
    bundle_root = workdir / "bundles"
    for folder in prepare(PREPARED):
        keys.pack_bundle(folder, bundle_root, ring)
    handler_ms = in_process_ms(bundle_root, ring)
    d = Daemon(workdir / "ours", bundle_root, ring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 100000}},
               appendfsync=FSYNC)
    d.start()
    out = {}
    try:
        with d.device("bench-dev") as dev:
            dev.request("tokenize", text=TEXT)  # warm up
            for label, count, rate in (("low", low_n, 5.0), ("100/s", n, 100.0),
                                       ("burst", n, 1e9)):
                sent: dict[str, float] = {}
                ids = [f"{label.replace('/', 'per')}-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]

                def send(i, ids=ids, sent=sent):
                    sent[ids[i]] = time.perf_counter()
                    dev.publish_envelope("tokenize", {"id": ids[i], "text": TEXT}, qos=1)

                t0 = time.perf_counter()
                paced(count, rate, send)
                got = {rid: dev.wait(rid, timeout=120).received for rid in ids}
                lat = [(got[r] - sent[r]) * 1000 for r in ids]
                elapsed = max(got.values()) - t0
                out[label] = {"p50": statistics.median(lat), "p99": pct(lat, 0.99),
                              "rate": count / elapsed, "lost": 0}
    finally:
        d.stop()
    return out, handler_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--low-n", type=int, default=30)
    parser.add_argument("--fsync", default="everysec", choices=("everysec", "always", "no"))
    args = parser.parse_args()
    global FSYNC
    FSYNC = args.fsync
    with tempfile.TemporaryDirectory() as tmp:
        base = bare_rq(Path(tmp), args.n, args.low_n)
        mine, handler_ms = ours(Path(tmp), args.n, args.low_n)
    print(f"redis appendfsync {FSYNC}; in-process tokenize job (handler, median): "
          f"{handler_ms:.3f} ms")
    print(f"{'rate':8} {'bare p50':>9} {'bare p99':>9} {'ours p50':>9} {'ours p99':>9} "
          f"{'added p50':>10} {'added/bare':>10} {'bare jobs/s':>11} {'ours jobs/s':>11} "
          f"{'ours/bare':>9}")
    for label in ("low", "100/s", "burst"):
        b, o = base[label], mine[label]
        added = o["p50"] - handler_ms
        print(f"{label:8} {b['p50']:9.2f} {b['p99']:9.2f} {o['p50']:9.2f} {o['p99']:9.2f} "
              f"{added:10.2f} {added / b['p50']:10.2f} {b['rate']:11.0f} {o['rate']:11.0f} "
              f"{o['rate'] / b['rate']:9.2f}")
    print("goals: added p50 <= 1.5x bare p50; ours p99 <= 15 ms; ours jobs/s >= 0.9x bare")


if __name__ == "__main__":
    main()
