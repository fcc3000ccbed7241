"""`edge-worker --device DEV`: RQ's non-forking worker, pinned to one OpenVINO device.

`--device DEV:N` (`CPU:2`) is the device's N-th worker on this host: the same queues, its own
RQ name, metrics port and (under systemd, `edge-worker@CPU:2`) directories. Compiled models are
not shared between the processes: OpenVINO shares them only through its on-disk model cache,
and that would be the plaintext weights on disk.

Models are decrypted and compiled once, before the first job, and kept for every job (a forking
worker would compile in the parent and fork: OpenVINO must not be forked after compile).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

import redis
import structlog
from rq import SimpleWorker
from rq.executions import Execution
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import WorkerStatus

from edge import alive, metrics, sdnotify
from edge import constants as C
from edge.config import Config, ConfigError, WorkerInstance
from edge.queueing import Feeder, queue_name, take, taken
from keys import load_ring
from workers import perform
from workers.batching import Batcher, BatchLimit, limits_of
from workers.extensions import prune_kernel_files
from workers.lifecycle import ModelControl
from workers.model_store import build_models

log = structlog.get_logger("workers.worker")

HEARTBEAT_DEBOUNCE = 1.0  # s: RQ heartbeats closer together than this are not sent


class EdgeWorker(SimpleWorker):
    """A SimpleWorker that tells the agent, every few seconds, which queues it serves."""

    def __init__(self, queues, *, runtime: perform.Runtime,
                 batching: dict[str, BatchLimit] | None = None, instance: str | None = None,
                 **kwargs) -> None:
        super().__init__(queues, serializer=JSONSerializer, worker_ttl=35, **kwargs)
        self.runtime = runtime
        self.instance = instance or runtime.device  # `CPU`, `CPU:2`: which worker of the device
        self._beating = threading.Event()
        self._beat: threading.Thread | None = None  # the alive thread, once RQ handles SIGTERM
        self._starting: redis.client.Pipeline | None = None
        self._last_beat = 0.0
        self._job_in_hand = False  # dequeued, not yet started (its start transaction beats)
        self._feeder = Feeder(self.connection)
        self._batcher = Batcher(self, batching or {})  # off unless limits are given
        self._priority = list(self.queues)  # the order the config gives (TASK_ORDER)
        self._last: str | None = None  # the queue of the last job
        self._streak = 0  # jobs in a row from it
        # Watchdog: the loop beats at least every dequeue_timeout; allow Redis back-off too.
        self.progress = sdnotify.Progress(stall_after=self.dequeue_timeout + 100)
        perform.install(runtime)

    def heartbeat(self, timeout=None, pipeline=None):
        self.progress.beat()  # before Redis: a Redis outage is not a hung worker
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline)
        if self._job_in_hand:
            # RQ beats right after a dequeue; the job's start transaction, which comes next,
            # beats as well: skipping this one leaves one round trip fewer before the job runs.
            self._job_in_hand = False
            return None
        if timeout is None and time.monotonic() - self._last_beat < HEARTBEAT_DEBOUNCE:
            # RQ beats up to three times between two jobs; each beat pushes the key's expiry
            # out by worker_ttl + 60 s, so one a second keeps the worker just as alive.
            return None
        self._last_beat = time.monotonic()
        # RQ's heartbeat is three separate round trips: the same commands in one pipeline.
        pipe = self.connection.pipeline(transaction=False)
        super().heartbeat(timeout, pipe)
        pipe.execute()
        return None

    def reorder_queues(self, reference_queue):
        # RQ calls this right after a job was dequeued, before its last heartbeat.
        self._job_in_hand = True
        self.count_served(reference_queue.name, 1)

    def count_served(self, served: str, n: int) -> None:
        """Count `n` jobs just taken from queue `served` (a batch's count them all) and set the
        queue order for the next dequeue (`next_order`)."""
        self._streak = self._streak + n if served == self._last else n
        self._last = served
        self._ordered_queues = next_order(self._priority, served, self._streak)
        if self._ordered_queues[0].name != self._priority[0].name:
            self._streak = 0

    def set_state(self, state, pipeline=None):
        # RQ sets IDLE twice between two jobs (after one, before waiting for the next): the
        # state is already written, so the second write is skipped.
        if pipeline is None and state == self._state and state == WorkerStatus.IDLE:
            return None
        return super().set_state(state, pipeline)

    # Starting a job: RQ sends its execution record and the job's bookkeeping in two
    # transactions, and the job then reads its inputs; here the same commands go in one
    # transaction with the read of the inputs. Mirrors rq 3.0's prepare_execution and
    # prepare_job_execution (the version is pinned in pyproject.toml).

    def prepare_execution(self, job):
        pipe = self._starting = self.connection.pipeline()
        execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipe,
                                     worker_name=self.name)
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        return execution

    def prepare_job_execution(self, job, remove_from_intermediate_queue=False):
        pipe, self._starting = self._starting or self.connection.pipeline(), None
        self._job_in_hand = False
        ttl = self.get_heartbeat_ttl(job)
        self.heartbeat(ttl, pipeline=pipe)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        if remove_from_intermediate_queue:
            queue = self.queue_class(job.origin, connection=self.connection)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        room = self._batcher.taking  # jobs to run with this one (workers.batching)
        if room:  # taken fairly among devices, within the priority burst; feeds RQ's list after
            take(self.connection, job.origin, room, self._batcher.device_of(job), pipeline=pipe,
                 others=[q.name for q in self.queues if q.name != job.origin],
                 burst=max(0, C.PRIORITY_BURST - self._streak))
        else:
            # the next waiting job (fairly chosen among devices) takes this one's place on RQ's list
            self._feeder.feed(job.origin, pipeline=pipe)
        blob_key = C.BLOB_KEY.format(job_key=job.id)
        pipe.hgetall(blob_key)
        replies = pipe.execute()
        self.runtime.prefetched = {blob_key: replies[-1]}
        if room:
            self._batcher.start(job, taken(replies[-2]))
        self._last_beat = time.monotonic()
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")

    def execute_job(self, job, queue):
        self.progress.begin(job.timeout)
        try:
            room = self._batcher.room(queue.name)
            if room:  # this job and those waiting with it, as one
                self._batcher.execute(job, queue, room)
                return self.set_state(WorkerStatus.IDLE)
            return super().execute_job(job, queue)
        finally:
            self.progress.end()

    def request_stop(self, signum, frame):
        sdnotify.stopping("warm stop: finishing the job in hand")
        return super().request_stop(signum, frame)

    def work(self, *args, **kwargs) -> bool:
        try:
            return super().work(*args, **kwargs)
        finally:
            self._beating.set()
            if self._beat is not None:
                self._beat.join(timeout=5)
                self._withdraw()

    def _install_signal_handlers(self) -> None:
        # The worker announces itself only once a SIGTERM is a warm stop: one that arrived
        # between the first beat and RQ's handlers would end it without withdrawing, leaving a
        # live-looking worker in the alive sets until its beat aged out.
        super()._install_signal_handlers()
        self._beat = threading.Thread(target=self._beat_loop, name="alive", daemon=True)
        self._beat.start()

    def _beat_loop(self) -> None:
        # A thread, not RQ's heartbeat: a long job must not make the worker look dead.
        while not self._beating.is_set():
            try:
                self._announce()
                for q in self._priority:  # nothing waits in a fair list while we idle
                    self._feeder.feed(q.name)
            except redis.RedisError as exc:
                log.warning("alive_failed", error=str(exc))
            self._beating.wait(C.HEARTBEAT_INTERVAL)

    def _announce(self) -> None:
        # stamped with Redis' clock (edge.alive), so this host's clock never ages a beat
        ms = self.runtime.models
        doc = {"name": self.name, "device": self.runtime.device, "instance": self.instance,
               "pid": os.getpid(),
               "host": socket.gethostname(), "models": {t: list(m) for t, m in ms.models.items()},
               "unavailable": dict(ms.unavailable),
               "load_seconds": {t: round(s, 3) for t, s in ms.load_seconds.items()},
               "versions": ms.versions()}  # bundle task -> name -> serving, loaded
        alive.beat(self.connection, self.name, [q.name for q in self.queues], doc)

    def _withdraw(self) -> None:
        try:
            alive.withdraw(self.connection, self.name, [q.name for q in self.queues])
        except redis.RedisError as exc:
            log.warning("withdraw_failed", error=str(exc))


class Reloader:
    """SIGHUP: re-read the keyring, reopen and recompile every bundle, then swap them in.

    The work happens on a thread while jobs keep running on the old models; the swap is one
    attribute assignment, so a job sees either the old set or the new one, never a mix. A reload
    that fails (keyring missing, every bundle broken) keeps the old models and says why.
    """

    def __init__(self, config: Config, device: str, runtime: perform.Runtime) -> None:
        self.config, self.device, self.runtime = config, device, runtime
        self.lock = threading.Lock()  # shared with ModelControl: one rebuild at a time

    def request(self, *_: object) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def reload(self) -> bool:
        import keys

        with self.lock:
            log.info("reload_started")
            sdnotify.reloading("recompiling bundles with the new keyring")
            try:
                ring = load_ring(self.config.keyring)
                models = build_models(self.config, self.device, ring)
            except (keys.KeyringError, SystemExit) as exc:
                log.error("reload_failed", error=str(exc))
                sdnotify.ready("reload failed; serving the old models")
                return False
            del ring
            if not models.handlers:
                log.error("reload_failed", error="no task could be loaded; keeping the old models",
                          unavailable=dict(models.unavailable))
                sdnotify.ready("reload failed; serving the old models")
                return False
            self.runtime.models = models
            removed = prune_kernel_files(models.kernel_files)
            if removed:
                log.info("gpu_kernel_files_removed", files=removed, note="no model uses them now")
            metrics.observe_models(self.device, dict(models.load_seconds), list(models.handlers))
            sdnotify.ready(f"reloaded; serving {', '.join(models.handlers)}")
            log.info("reload_done", models={t: list(m) for t, m in models.models.items()},
                     unavailable=dict(models.unavailable))
            return True


def next_order(priority: list, served: str, streak: int) -> list:
    """The queue order for the next dequeue: the config's priority order, except that a queue
    that gave `C.PRIORITY_BURST` jobs in a row goes to the back for one turn, so a flood of one
    task delays another task's job by at most that many jobs (no task starves)."""
    if streak >= C.PRIORITY_BURST and len(priority) > 1:
        return ([q for q in priority if q.name != served]
                + [q for q in priority if q.name == served])
    return list(priority)


def instance_arg(spec: str) -> WorkerInstance:
    """argparse type of --device: `CPU`, `CPU:2` (edge.config.WorkerInstance)."""
    try:
        return WorkerInstance.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `edge-worker`."""
    from edge.redisconn import connect
    from edge.startup import start_daemon

    parser = argparse.ArgumentParser(prog="edge-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="CPU", type=instance_arg,
                        help="OpenVINO device: CPU, GPU, GPU.1, NPU; DEVICE:N runs its N-th "
                             "worker (CPU:2): the same queues, its own name and metrics port")
    parser.add_argument("--config", help="daemon TOML (default: $EDGE_CONFIG or configs/demo.toml)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", help="worker name (default: <host>-<DEVICE[:N]>-<pid>)")
    args = parser.parse_args(argv)
    instance: WorkerInstance = args.device
    device = instance.device
    config = start_daemon("edge-worker", args.config)
    tasks = config.tasks_on(device)
    if not tasks:
        print(f"edge-worker: no task is routed to {device} in the config", file=sys.stderr)
        return 2
    try:
        metrics_port = config.worker_metrics_port(device, instance.number)
    except ConfigError as exc:
        print(f"edge-worker: {exc}", file=sys.stderr)
        return 2
    import keys

    try:
        ring = load_ring(config.keyring)
    except keys.KeyringError as exc:
        print(f"edge-worker: {exc}", file=sys.stderr)
        return 2
    structlog.contextvars.bind_contextvars(device=device)
    if instance.number > 1:
        structlog.contextvars.bind_contextvars(instance=instance.label)
    models = build_models(config, device, ring)
    del ring  # bundles are decrypted and compiled: the worker needs no key until a reload
    served = [t for t in tasks if t in models.handlers]
    for task, reason in models.unavailable.items():
        log.error("task_unavailable", task=task, reason=reason)
    if not served:
        print(f"edge-worker: no task could be loaded on {device}", file=sys.stderr)
        return 3
    name = args.name or f"{socket.gethostname()}-{instance.label}-{os.getpid()}"
    runtime = perform.Runtime(worker=name, device=device, models=models)
    conn = connect(config.redis.for_worker())
    metrics.observe_models(device, dict(models.load_seconds), served)
    worker = EdgeWorker([queue_name(t, device) for t in served], runtime=runtime,
                        batching=limits_of(config.tasks), connection=conn,
                        name=name.replace(".", "_"), instance=instance.label)
    metrics.serve(metrics_port, live=worker.progress.healthy,
                  ready={"models": lambda: bool(runtime.models.handlers), "redis": conn.ping})
    log.info("worker_ready", worker=name, queues=[q.name for q in worker.queues])
    reloader = Reloader(config, device, runtime)
    signal.signal(signal.SIGHUP, reloader.request)
    control = ModelControl(config, device, runtime, conn, worker.name, reloader.lock).start()
    watchdog = sdnotify.Watchdog(worker.progress.healthy).start()
    sdnotify.ready(f"serving {', '.join(served)} on {instance.label}")
    try:
        worker.work(burst=args.burst, logging_level="WARNING")
    finally:
        control.stop()
        watchdog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
