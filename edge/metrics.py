"""Prometheus metrics of the agent and the workers, with fixed label sets (task, device, status).

Each process serves its own registry on 127.0.0.1 (never on an outside interface: scrape it
through the gateway's node exporter / Prometheus agent, or an SSH tunnel):

* the agent on `metrics_port`;
* a worker on `[devices.<DEV>] metrics_port` when set, else `metrics_port + 1 + i`, where `i` is
  the device's place in the sorted list of devices the config names (`Config.worker_metrics_port`).

`metrics_port = 0` turns every endpoint off. `status` is "ok" or one of the closed error codes.
The same port answers `/healthz` and `/readyz` (edge/health.py). Process metrics (`process_*`:
RSS, CPU seconds, open fds) come from prometheus_client's ProcessCollector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from edge import constants as C
from edge import health
from edge.tasks import TASK_ORDER

log = structlog.get_logger("edge.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, _cpu_seconds_total, _open_fds

# Job latencies span a 0.2 ms tokenizer call to a 10-minute LCM run.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            120, 300, 600)

# -- workers
# model / version: the model version that answered ("" when the job failed before one was chosen)
JOBS = Counter("edge_jobs", "Jobs a worker finished, by outcome and model version",
               ("task", "device", "status", "model", "version"), registry=REGISTRY)
QUEUE_WAIT = Histogram("edge_job_queue_wait_seconds", "From receipt by the agent to run start",
                       ("task", "device"), buckets=_BUCKETS, registry=REGISTRY)
RUN_TIME = Histogram("edge_job_run_seconds", "Run time of a job on its worker, by model version",
                     ("task", "device", "model", "version"), buckets=_BUCKETS, registry=REGISTRY)
MODEL_LOAD = Gauge("edge_model_load_seconds", "Decrypt + compile time of a task's bundles",
                   ("task", "device"), registry=REGISTRY)
MODELS_READY = Gauge("edge_models_ready", "1 when a task's models are compiled on this worker",
                     ("task", "device"), registry=REGISTRY)

# -- agent
SUBMITTED = Counter("edge_jobs_submitted", "Jobs the agent enqueued (not duplicates)",
                    ("task", "device"), registry=REGISTRY)
REJECTED = Counter("edge_jobs_rejected", "Jobs the agent answered itself with an error",
                   ("task", "status"), registry=REGISTRY)
BUSY = Counter("edge_busy_rejections",
               "Jobs answered `busy`, by whose limit it was: device_limit (the device's quota), "
               "queue_limit (every queue of the task full), redis_full (Redis at maxmemory)",
               ("task", "reason"), registry=REGISTRY)
JOB_STALL = Gauge("edge_agent_job_stall_seconds",
                  "How long the agent has been retrying job messages it cannot store or "
                  "answer (0 when none): the broker holds the device's later jobs meanwhile",
                  registry=REGISTRY)
REDIS_MEMORY = Gauge("edge_redis_memory_used_ratio",
                     "Redis used_memory / maxmemory (0 when no maxmemory is set); at 1 the "
                     "agent answers new jobs `busy`", registry=REGISTRY)
END_TO_END = Histogram("edge_job_end_to_end_seconds",
                       "From receipt of the job to the broker's PUBACK of its answer",
                       ("task", "status"), buckets=_BUCKETS, registry=REGISTRY)
QUEUE_DEPTH = Gauge("edge_queue_depth", "Jobs waiting in a task/device queue",
                    ("task", "device"), registry=REGISTRY)
QUEUE_WORKERS = Gauge("edge_queue_workers", "Live workers listening to a task/device queue",
                      ("task", "device"), registry=REGISTRY)
ANSWERS_REFUSED = Counter(
    "edge_answers_refused",
    "Answers the broker refused (PUBACK reason code, e.g. 0x87; `local`: the MQTT client did) or "
    "that were past its packet limit (0x95), by what the relay did: retry, replaced (by an "
    "error answer), dropped", ("task", "reason", "action"), registry=REGISTRY)
DEVICE_JOBS = Counter(
    "edge_device_jobs", "Job messages the agent received, by device id (the first "
    "DEVICE_SERIES ids seen since start; later ones as `other`), task and outcome "
    "(submitted, duplicate, rejected)", ("device_id", "task", "outcome"), registry=REGISTRY)
OUTBOX_LENGTH = Gauge("edge_outbox_length", "Answers in the outbox stream not yet relayed",
                      registry=REGISTRY)
OUTBOX_OLDEST = Gauge("edge_outbox_oldest_pending_seconds",
                      "Age of the oldest answer still in the outbox (0 when empty)",
                      registry=REGISTRY)


# Device ids are client input: at most this many get their own series (bounded cardinality).
DEVICE_SERIES = 50


class DeviceLabels:
    """The `device_id` label of a device: its id for the first `limit` ids seen, else `other`.

    Admission is first come and sticky, not a moving top N: a counter series that changed hands
    (or an `other` that shrank when a device left it) would read as a counter reset to
    `rate()`. Dashboards take the top talkers with `topk()` over these series.
    """

    def __init__(self, limit: int = DEVICE_SERIES) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, device_id: str) -> str:
        with self._lock:
            if device_id in self._seen:
                return device_id
            if len(self._seen) < self.limit and device_id != "other":
                self._seen.add(device_id)
                return device_id
        return "other"


device_label = DeviceLabels()


def observe_device(device_id: str, task: str, outcome: str) -> None:
    """Count one job message from a device (`outcome`: submitted, duplicate or rejected)."""
    DEVICE_JOBS.labels(device_label(device_id), task, outcome).inc()


def serve(port: int, host: str = "127.0.0.1", live: health.Check | None = None,
          ready: Mapping[str, health.Check] | None = None) -> bool:
    """Serve REGISTRY, /healthz (`live`) and /readyz (`ready`) on host:port (0 = off); False,
    with a log line, when the port is taken."""
    if not port:
        return False
    try:
        health.start(port, host, REGISTRY, live, ready)
    except OSError as exc:
        # A second worker for the same device on one host: it runs, without its own endpoint.
        log.warning("metrics_not_served", port=port, error=str(exc))
        return False
    log.info("metrics_served", address=f"http://{host}:{port}/metrics")
    return True


def observe_answer(task: str, device: str, body: Mapping[str, Any]) -> None:
    """Count one finished job from its result body (status and timings)."""
    status = body.get("status", "ok")
    if status == "error":
        status = (body.get("error") or {}).get("code", "internal")
    result = body.get("result")
    if not isinstance(result, Mapping):
        result = {}
    model, version = str(result.get("model", "")), str(result.get("version", ""))
    JOBS.labels(task, device, status, model, version).inc()
    timings = body.get("timings") or {}
    if "queue_ms" in timings:
        QUEUE_WAIT.labels(task, device).observe(max(timings["queue_ms"], 0.0) / 1000)
    if "run_ms" in timings:
        RUN_TIME.labels(task, device, model, version).observe(max(timings["run_ms"], 0.0) / 1000)


def observe_models(device: str, load_seconds: dict[str, float], served: list[str]) -> None:
    """Model load times and which tasks are ready, after a start or a reload."""
    for task, seconds in load_seconds.items():
        MODEL_LOAD.labels(task, device).set(seconds)
    for task in TASK_ORDER:
        MODELS_READY.labels(task, device).set(1 if task in served else 0)


def outbox_lag(conn: redis.Redis, stream: str = C.OUTBOX_STREAM) -> tuple[int, float]:
    """(entries in the outbox, age in s of the oldest one); stream ids are ms timestamps."""
    try:
        length = conn.xlen(stream)
        first = conn.xrange(stream, count=1) if length else []
    except redis.ResponseError:
        return 0, 0.0
    if not first:
        return length, 0.0
    entry_id: Any = first[0][0]  # bytes (redis-py types replies loosely)
    ms = int(entry_id.split(b"-")[0])
    return length, max(time.time() - ms / 1000, 0.0)


def observe_status(doc: dict, conn: redis.Redis) -> dict:
    """Update the agent's gauges from a node status document; return the summary figures."""
    for name, q in doc.get("queues", {}).items():
        _, task, device = name.split(".", 2)
        QUEUE_DEPTH.labels(task, device).set(q["depth"])
        QUEUE_WORKERS.labels(task, device).set(q["workers"])
    redis_doc = doc.get("redis") or {}
    if redis_doc.get("maxmemory"):
        REDIS_MEMORY.set(redis_doc["used_memory"] / redis_doc["maxmemory"])
    length, oldest = outbox_lag(conn)
    OUTBOX_LENGTH.set(length)
    OUTBOX_OLDEST.set(oldest)
    return {"outbox_oldest_s": round(oldest, 3), "submitted": total(SUBMITTED),
            "rejected": total(REJECTED), "busy": total(BUSY)}


def total(counter: Counter) -> int:
    """A counter summed over all its labels (for the status topic's summary)."""
    return int(sum(s.value for m in counter.collect() for s in m.samples
                   if s.name.endswith("_total")))
