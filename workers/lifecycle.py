"""Model activation and roll-back on a running worker, without a job failing or waiting.

`edgectl models activate|rollback` (edgectl/models.py) appends commands to the Redis stream
`C.MODELS_STREAM`; this thread of every worker reads them and answers in `C.MODELS_ACK_KEY`:

* `prepare` (task, name, version): compile that version beside the ones serving (jobs keep
  running on those meanwhile), then put the new set in place: the serving versions are
  unchanged, the new one answers `model=name@version` only. Answer `ready`, or `failed` with
  the reason (the version is then never activated).
* `commit`: the serving file now names the version (edgectl wrote it once every worker was
  ready); swap to a set where it serves. Nothing is compiled: the swap is one assignment, so
  each job runs wholly on the old version or wholly on the new one. Answer `serving`.
* `abort`: drop a prepared version that will not serve. Answer `aborted`.

Between commands the thread also compares the serving files on disk with what it serves
(every `POLL` s): a worker that missed a command, or a version installed or removed by hand,
converges by itself. A model set is always built beside the one serving and swapped whole.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis
import structlog

from edge import constants as C
from edge import metrics
from edge.config import Config
from edge.tasks import bundle_task
from workers import perform
from workers.extensions import prune_kernel_files
from workers.model_store import ModelSet, build_models, new_core

log = structlog.get_logger("workers.lifecycle")

POLL = C.HEARTBEAT_INTERVAL  # s between two looks at the serving files
ACK_TTL = 3600  # s an activation's answers stay readable
PIN_TTL = 600.0  # s a prepared version stays loaded without its commit or abort


class ModelControl:
    """The thread that prepares, activates and drops model versions on one worker."""

    def __init__(self, config: Config, device: str, runtime: perform.Runtime,
                 conn: redis.Redis, worker: str, lock: threading.Lock) -> None:
        self.config, self.device, self.runtime = config, device, runtime
        self.conn, self.worker, self.lock = conn, worker, lock
        self.tasks = {bundle_task(t) for t in config.tasks_on(device)}
        self._pins: dict[tuple[str, str, str], float] = {}  # prepared version -> since
        self._stop = threading.Event()
        self._snapshot = self._on_disk()
        self._core: Any = None  # one Core for every rebuild (see start)
        self._thread = threading.Thread(target=self._run, name="models", daemon=True)

    def start(self) -> ModelControl:
        # the Core every rebuild uses, its plugins queried now, before the first job
        self._core = new_core()
        _ = self._core.available_devices
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last: Any = None  # read in the loop: Redis may be away when the worker starts
        next_poll = time.monotonic() + POLL
        while not self._stop.is_set():
            try:
                if last is None:
                    last = self._last_id()
                got: Any = self.conn.xread({C.MODELS_STREAM: last}, count=10, block=1000)
                for _, entries in got or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        self._command(json.loads(fields[b"cmd"]))
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL
                    self._expire_pins()
                    if self._on_disk() != self._snapshot:
                        self.rebuild("the serving files changed")
            except redis.RedisError as exc:
                log.warning("model_control_redis", error=str(exc))
                self._stop.wait(1.0)
            except (ValueError, KeyError) as exc:
                log.error("model_command_malformed", error=str(exc))

    def _last_id(self) -> Any:
        """Where to start reading: after the newest command (older ones are history)."""
        newest: Any = self.conn.xrevrange(C.MODELS_STREAM, count=1)
        return newest[0][0] if newest else "0-0"

    def _command(self, cmd: dict[str, Any]) -> None:
        op, task = cmd["op"], cmd["task"]
        if task not in self.tasks:
            return  # another device's worker serves it
        pin = (task, cmd["name"], str(cmd["version"]))
        log.info("model_command", op=op, task=task, model=pin[1], version=pin[2], id=cmd["id"])
        if op == "prepare":
            self._pins[pin] = time.monotonic()
            models = self.rebuild(f"prepare {pin[1]}@{pin[2]}")
            loaded = models is not None and pin[2] in models.loaded.get(task, {}).get(pin[1], {})
            self._ack(cmd, "ready" if loaded else "failed", self._why(models, pin))
        elif op == "commit":
            self._pins.pop(pin, None)
            models = self.rebuild(f"activate {pin[1]}@{pin[2]}")
            serving = models is not None and models.serving.get(task, {}).get(pin[1]) == pin[2]
            self._ack(cmd, "serving" if serving else "failed", self._why(models, pin))
        elif op == "abort":
            self._pins.pop(pin, None)
            self.rebuild(f"abort {pin[1]}@{pin[2]}")
            self._ack(cmd, "aborted")

    def rebuild(self, why: str) -> ModelSet | None:
        """Build the model set the disk and the pins ask for, reusing every version already
        compiled, and swap it in; None (the old set keeps serving) when it cannot be built."""
        import keys
        from keys import load_ring

        with self.lock:
            snapshot = self._on_disk()
            try:
                ring = load_ring(self.config.keyring)
                self._core = self._core or new_core()
                models = build_models(self.config, self.device, ring, core=self._core,
                                      reuse=self.runtime.models, pins=set(self._pins))
            except (keys.KeyringError, SystemExit) as exc:
                log.error("models_rebuild_failed", why=why, error=str(exc))
                return None
            del ring
            self._snapshot = snapshot
            swap(self.runtime, models, self.device)
            log.info("models_swapped", why=why, versions=models.versions(),
                     broken=dict(models.broken))
            return models

    def _on_disk(self) -> dict[tuple[str, str], tuple[str | None, str | None]]:
        from keys import layout

        return {(m.task, m.name): (m.serving, m.previous)
                for m in layout.installed(self.config.bundle_dir) if m.task in self.tasks}

    def _expire_pins(self) -> None:
        now = time.monotonic()
        for pin, since in list(self._pins.items()):
            if now - since > PIN_TTL:
                log.warning("prepared_version_dropped", model=pin[1], version=pin[2],
                            note="neither activated nor aborted in time")
                del self._pins[pin]

    @staticmethod
    def _why(models: ModelSet | None, pin: tuple[str, str, str]) -> str:
        if models is None:
            return "the worker could not rebuild its models (keyring unreadable?)"
        broken = models.broken.get(pin[0], {})
        return broken.get(f"{pin[1]}@{pin[2]}") or broken.get(pin[1]) or ""

    def _ack(self, cmd: dict[str, Any], state: str, reason: str = "") -> None:
        key = C.MODELS_ACK_KEY.format(id=cmd["id"])
        body = {"state": state, "version": str(cmd["version"]), "reason": reason,
                "device": self.device}
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(key, f"{cmd['op']}:{self.worker}", json.dumps(body))
        pipe.expire(key, ACK_TTL)
        pipe.execute()


def swap(runtime: perform.Runtime, models: ModelSet, device: str) -> None:
    """Put `models` in place for the next job (one assignment: a job sees one set whole)."""
    runtime.models = models
    removed = prune_kernel_files(models.kernel_files)
    if removed:
        log.info("gpu_kernel_files_removed", files=removed, note="no model uses them now")
    metrics.observe_models(device, dict(models.load_seconds), list(models.handlers))
