"""`edgectl top`: a refreshing terminal view of one gateway.

Fed by the retained status topic (`edge/status/<node>`: queues, workers and their models) and
by the daemons' /metrics (jobs per task and outcome, run times, busy answers, RSS and CPU of
each process). Keys: `q` quits. `--once` prints one frame and exits (for scripts and logs).
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from edge import constants as C
from edge.config import Config, ConfigError, WorkerInstance

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CLEAR = "\x1b[H\x1b[2J"


def scrape(port: int, timeout: float = 2.0) -> Samples | None:
    """Every sample of 127.0.0.1:port/metrics; None when nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Sum of metric `name` grouped by `labels`."""
    out: dict[tuple[str, ...], float] = {}
    for (n, lab), value in samples.items():
        if n == name:
            d = dict(lab)
            key = tuple(d.get(k, "") for k in labels)
            out[key] = out.get(key, 0.0) + value
    return out


@dataclass
class View:
    """What one frame shows, and what it remembers between frames (rates, last errors)."""

    node: str
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    agent: Samples | None = None
    workers: dict[str, Samples | None] = field(default_factory=dict)  # device -> samples
    errors: deque = field(default_factory=lambda: deque(maxlen=8))
    rates: dict[str, float | None] = field(default_factory=dict)  # per s, since the last scrape
    _prev: dict[str, tuple[float, dict]] = field(default_factory=dict)

    def update(self, agent: Samples | None, workers: Mapping[str, Samples | None],
               now: float) -> None:
        """New scrapes: remember error counts that grew as the last errors."""
        self.agent, self.workers = agent, dict(workers)
        counts = {f"worker {k[0]} {k[1]}": v for k, v in
                  self._sum_workers("edge_jobs_total", "task", "status").items() if k[1] != "ok"}
        if agent is not None:
            counts.update({f"agent {k[0]} {k[1]}": v for k, v in
                           by(agent, "edge_jobs_rejected_total", "task", "status").items()})
        prev = self._prev.get("errors")
        if prev is not None:
            for key, value in sorted(counts.items()):
                grew = value - prev[1].get(key, 0.0)
                if grew > 0:
                    who, task, code = key.split(" ")
                    self.errors.appendleft(f"{time.strftime('%H:%M:%S', time.localtime(now))}  "
                                           f"{task:<11} {code:<18} +{grew:g} ({who})")
        self._prev["errors"] = (now, counts)
        totals = {f"jobs:{k[0]}": 0.0 for k in self._sum_workers("edge_jobs_total", "task")}
        for (task,), value in self._sum_workers("edge_jobs_total", "task").items():
            totals[f"jobs:{task}"] = value
        for device, samples in self.workers.items():
            cpu = (samples or {}).get(("process_cpu_seconds_total", ()))
            if cpu is not None:
                totals[f"cpu:{device}"] = cpu
        self.rates = {key: self._rate(key, value, now) for key, value in totals.items()}

    def _sum_workers(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for samples in self.workers.values():
            for key, value in by(samples or {}, name, *labels).items():
                out[key] = out.get(key, 0.0) + value
        return out

    def _rate(self, key: str, value: float, now: float) -> float | None:
        """Per-second change of a total since the previous scrape."""
        prev = self._prev.get(key)
        self._prev[key] = (now, {"v": value})
        if prev is None or now <= prev[0]:
            return None
        return max(value - prev[1]["v"], 0.0) / (now - prev[0])

    def lines(self, now: float) -> list[str]:
        """The frame, as lines of text."""
        s = self.status
        age = f"{now - self.status_at:.0f} s ago" if self.status_at else "none yet"
        state = "online" if s.get("online") else ("OFFLINE" if s else "no status")
        out = [f"edgectl top  node {self.node}  {state}  status {age}   (q quits)"]
        if s:
            redis = s.get("redis") or {}
            fill = (f"{100 * redis['used_memory'] / redis['maxmemory']:.0f}% of maxmemory"
                    if redis.get("maxmemory") else "no maxmemory")
            out.append(f"outbox {s.get('outbox', 0)} (oldest {s.get('outbox_oldest_s', 0):.1f} s)"
                       f"  redis {fill}  submitted {s.get('submitted', 0)}"
                       f"  rejected {s.get('rejected', 0)}  busy {s.get('busy', 0)}")
        out += ["", f"{'TASK':<12}{'JOBS/S':>8}{'OK':>8}{'ERRORS':>8}{'RUN ms':>10}"
                    f"{'WAIT ms':>10}{'BUSY':>6}"]
        jobs = self._sum_workers("edge_jobs_total", "task", "status")
        run = self._sum_workers("edge_job_run_seconds_sum", "task")
        runs = self._sum_workers("edge_job_run_seconds_count", "task")
        wait = self._sum_workers("edge_job_queue_wait_seconds_sum", "task")
        busy = by(self.agent or {}, "edge_busy_rejections_total", "task")
        tasks = sorted({k[0] for k in jobs} | {q.split(".")[1] for q in s.get("queues", {})})
        for task in tasks:
            ok = jobs.get((task, "ok"), 0.0)
            err = sum(v for k, v in jobs.items() if k[0] == task and k[1] != "ok")
            r = self.rates.get(f"jobs:{task}")
            n = runs.get((task,), 0.0)
            out.append(f"{task:<12}{'-' if r is None else f'{r:.1f}':>8}{ok:>8.0f}{err:>8.0f}"
                       f"{_ms(run.get((task,)), n):>10}{_ms(wait.get((task,)), n):>10}"
                       f"{busy.get((task,), 0.0):>6.0f}")
        out += ["", f"{'QUEUE':<24}{'DEPTH':>7}{'LIMIT':>7}{'WORKERS':>9}"]
        for name, q in sorted(s.get("queues", {}).items()):
            flag = "  <- no worker" if not q.get("workers") else ""
            out.append(f"{name:<24}{q.get('depth', 0):>7}{q.get('limit', 0):>7}"
                       f"{q.get('workers', 0):>9}{flag}")
        out += ["", f"{'WORKER':<28}{'DEVICE':<8}{'RSS MiB':>9}{'CPU %':>7}  MODELS"]
        for name, w in sorted(s.get("workers", {}).items()):
            device = w.get("device", "?")
            instance = w.get("instance") or device  # `CPU:2`: scraped on its own port
            samples = self.workers.get(instance) or {}
            rss = samples.get(("process_resident_memory_bytes", ()))
            cpu_rate = self.rates.get(f"cpu:{instance}")
            models = "; ".join(f"{t}: {', '.join(m)}" for t, m in w.get("models", {}).items())
            out.append(f"{name:<28}{device:<8}{'-' if rss is None else f'{rss / 2**20:.0f}':>9}"
                       f"{'-' if cpu_rate is None else f'{100 * cpu_rate:.0f}':>7}  {models}")
            for task, why in (w.get("unavailable") or {}).items():
                out.append(f"{'':<28}{'':<8}{'':>16}  {task} UNAVAILABLE: {why}")
        out += ["", "LAST ERRORS"] + (list(self.errors) or ["(none since start)"])
        return out


def _ms(total: float | None, count: float) -> str:
    return "-" if not total or not count else f"{1000 * total / count:.1f}"


class StatusFeed:
    """The node's retained status document, kept current by an MQTT subscription."""

    def __init__(self, config: Config, host: str | None = None, port: int | None = None) -> None:
        m = config.mqtt
        self.topic = C.STATUS_TOPIC.format(node=config.node)
        self.doc: dict[str, Any] = {}
        self.at = 0.0
        self.changed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id=f"edgectl-top-{os.getpid()}")
        if m.username:
            password = m.password_file.read_text().strip() if m.password_file else None
            self.client.username_pw_set(m.username, password)
        if m.tls_ca:
            self.client.tls_set(ca_certs=str(m.tls_ca))
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async(host or m.host, port or m.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.doc = json.loads(msg.payload)
        except ValueError:
            return
        self.at = time.time()
        self.changed.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def worker_ports(config: Config, status: Mapping[str, Any] | None = None) -> dict[str, int]:
    """worker (`CPU`, `CPU:2`) -> its metrics port: the first worker of every device the config
    names, and every further worker (`edge-worker --device CPU:2`) the status shows."""
    if not config.metrics_port:
        return {}
    devices = {d for t in config.tasks.values() for d in t.devices} | set(config.devices)
    out = {d: config.worker_metrics_port(d) for d in sorted(devices)}
    for doc in ((status or {}).get("workers") or {}).values():
        try:
            inst = WorkerInstance.parse(str(doc.get("instance") or ""))
            if inst.number > 1:
                out[inst.label] = config.worker_metrics_port(inst.device, inst.number)
        except (ValueError, ConfigError):  # not ours to judge: that worker shows no numbers
            continue
    return out


def run(config: Config, interval: float = 2.0, once: bool = False, out: TextIO = sys.stdout,
        host: str | None = None, port: int | None = None,
        keys: Callable[[float], Iterable[str]] | None = None) -> int:
    """Draw frames every `interval` s until `q` (or one frame with `once`)."""
    feed = StatusFeed(config, host, port)
    view = View(config.node)
    keys = keys or _keys_from_stdin()
    try:
        if once:  # one frame: wait briefly for the retained status
            feed.changed.wait(5)
        while True:
            now = time.time()
            view.status, view.status_at = feed.doc, feed.at
            ports = worker_ports(config, feed.doc)
            view.update(scrape(config.metrics_port) if config.metrics_port else None,
                        {d: scrape(p) for d, p in ports.items()}, now)
            text = "\n".join(view.lines(now))
            out.write(text + "\n" if once else CLEAR + text + "\n")
            out.flush()
            if once or "q" in keys(interval):
                return 0
    finally:
        feed.close()


def _keys_from_stdin() -> Callable[[float], Iterable[str]]:
    """Keys typed on a terminal (cbreak mode, restored at exit), else a plain sleep."""
    if not sys.stdin.isatty():
        def wait(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        return wait
    import atexit
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, saved)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    return read
