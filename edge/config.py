"""The daemon's configuration: one TOML file, parsed once into frozen typed objects.

A bad config is refused at start-up with the path of the offending field
(`tasks.superres.devices[1]: ...`). No other module reads the file or the environment.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from edge import constants as C
from edge.tasks import TASK_ORDER, TASKS

DEVICE_RE = r"^(CPU|GPU(\.\d+)?|NPU(\.\d+)?)$"
DEFAULT_NODE = "edge-gateway"
MAX_INSTANCES = 64  # workers of one device on one host: `CPU` .. `CPU:64`


class ConfigError(Exception):
    """The config file is missing, unreadable or has a bad field (named in the message)."""


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """How the agent reaches the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # default: edge-agent-<node>
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30
    session_expiry: int = 86400
    shared_group: str | None = None  # e.g. "edge": several agents share the job topics


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """How the agent and workers reach Redis."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password_file: Path | None = None
    # [redis.worker]: the workers' own ACL user (least privilege); unset fields come from [redis]
    worker: RedisConfig | None = None

    def for_worker(self) -> RedisConfig:
        """The connection settings a worker uses."""
        return self.worker or self


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """Routing and limits of one task."""

    devices: tuple[str, ...] = ("CPU",)
    queue_limit: int = 100
    max_bytes: int = 1 << 20
    timeout: int = 60  # s a job may run
    deadline: int = 300  # s a job may wait in the queue before it is answered `timeout`
    # jobs of this task one device may have queued or running at once (its quota); None:
    # the default, min(queue_limit, C.DEFAULT_DEVICE_LIMIT)
    device_limit: int | None = None
    # Dynamic batching (workers/batching.py): a worker that takes a job of a task whose handler
    # batches also takes up to max_batch - 1 more jobs already waiting, and waits at most
    # batch_wait_ms for more (0: never idles); max_batch = 1 turns batching off.
    max_batch: int = C.DEFAULT_MAX_BATCH
    batch_wait_ms: int = 0
    # the model a request without `model` gets; None: the first one installed for the task
    default_model: str | None = None

    @property
    def per_device(self) -> int:
        """The quota of one device: jobs of this task it may have queued or running."""
        return self.device_limit or min(self.queue_limit, C.DEFAULT_DEVICE_LIMIT)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on what one message may cost (README, "Hostile input")."""

    job_memory: int = C.DEFAULT_JOB_MEMORY  # bytes a worker may allocate for one job's data
    json_depth: int = C.DEFAULT_JSON_DEPTH  # nesting of a JSON envelope, checked before parsing
    # new jobs are answered `busy` once Redis uses this share of its maxmemory: the rest is
    # for the work already accepted (workers' bookkeeping, answers)
    redis_fill_percent: int = C.DEFAULT_REDIS_FILL_PERCENT


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How a worker compiles models for one OpenVINO device."""

    performance_hint: str = "LATENCY"
    num_streams: int | None = None
    num_requests: int | None = None
    inference_precision: str | None = None  # "f32", "bf16", "f16"; None: the plugin's default
    cache_dir: Path | None = None  # OpenVINO model cache; only where encrypted (see README)
    metrics_port: int | None = None  # this device's worker /metrics; None: see worker_metrics_port
    # CPU only: cores one worker's inference may use (INFERENCE_NUM_THREADS), so that several
    # workers of the device (`CPU`, `CPU:2`, ...) split the cores; None: all of them, each
    threads: int | None = None

    def properties(self) -> dict[str, Any]:
        """OpenVINO compile properties."""
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.performance_hint}
        if self.threads is not None:
            props["INFERENCE_NUM_THREADS"] = self.threads
        if self.num_streams is not None:
            props["NUM_STREAMS"] = self.num_streams
        if self.num_requests is not None:
            props["PERFORMANCE_HINT_NUM_REQUESTS"] = self.num_requests
        if self.inference_precision is not None:
            props["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return props


@dataclass(frozen=True, slots=True)
class KeyringConfig:
    """Where the key-encryption keys come from (systemd credential, file, env: when several
    are present they must agree) and who makes new keys (docs/keys.md)."""

    credential: str = "edge-keyring"
    file: Path | None = None
    env: str | None = "EDGE_KEYRING"
    signer: Path | None = None  # pinned fleet signing key(s), PEM: `keys unseal` checks it
    # "single": this host makes its own keys (a lone gateway, the KMS / build host);
    # "fleet": the ring comes sealed from the KMS, so `keys rotate` is refused here and the
    # rotation timer does nothing.
    mode: str = "single"
    credential_file: Path | None = None  # the encrypted credential `keys install` makes


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration."""

    node: str = DEFAULT_NODE
    bundle_dir: Path = Path("var/bundles")
    blob_ttl: int = C.DEFAULT_BLOB_TTL
    dedup_ttl: int = C.DEFAULT_DEDUP_TTL
    metrics_port: int = 0
    log_format: str = "auto"  # auto | json | console
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    keyring: KeyringConfig = field(default_factory=KeyringConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tasks: Mapping[str, TaskConfig] = field(default_factory=dict)
    devices: Mapping[str, DeviceConfig] = field(default_factory=dict)

    def device(self, name: str) -> DeviceConfig:
        """A device's settings (defaults when the config has no section for it)."""
        return self.devices.get(name, DeviceConfig())

    def tasks_on(self, device: str) -> tuple[str, ...]:
        """Tasks routed to `device`, in priority order."""
        return tuple(t for t in TASK_ORDER if t in self.tasks and device in self.tasks[t].devices)

    def worker_metrics_port(self, device: str, instance: int = 1) -> int:
        """Where worker `instance` of a device serves /metrics; 0 = off. Instance 1: the device's
        own setting, else metrics_port + 1 + its place among the n devices the config names
        (sorted). Instance k: the own setting + k - 1, else that port + (k - 1) * n, so the
        instances of every device fill blocks of n ports after the first."""
        own = self.device(device).metrics_port
        named = sorted({d for t in self.tasks.values() for d in t.devices} | set(self.devices)
                       | {device})
        if own is not None:
            port = own + instance - 1 if own else 0
        elif not self.metrics_port:
            return 0
        else:
            port = self.metrics_port + 1 + named.index(device) + (instance - 1) * len(named)
        if port > 65535:
            raise ConfigError(f"worker {device}:{instance}: its metrics port {port} is past 65535"
                              " (lower metrics_port or [devices] metrics_port)")
        return port

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.node}"


@dataclass(frozen=True, slots=True)
class WorkerInstance:
    """Which worker of a device a process is: `CPU` (instance 1), `CPU:2`, `GPU.1:3`.

    Every instance of a device serves the same queues; the number only keeps their names,
    metrics ports and systemd directories apart."""

    device: str
    number: int = 1

    @classmethod
    def parse(cls, spec: str) -> WorkerInstance:
        """`DEVICE` or `DEVICE:N` (N in 1..MAX_INSTANCES; `CPU:1` is `CPU`); ValueError if not."""
        device, sep, number = spec.partition(":")
        if not re.match(DEVICE_RE, device):
            raise ValueError(f"{spec!r}: not an OpenVINO device name (CPU, GPU, GPU.1, NPU), "
                             "optionally with :N for its N-th worker (CPU:2)")
        if not sep:
            return cls(device)
        if not re.fullmatch(r"[1-9]\d*", number) or int(number) > MAX_INSTANCES:
            raise ValueError(f"{spec!r}: the worker number after ':' must be 1..{MAX_INSTANCES}")
        return cls(device, int(number))

    @property
    def label(self) -> str:
        """As written on the command line and in the unit name: `CPU`, `CPU:2`."""
        return self.device if self.number == 1 else f"{self.device}:{self.number}"


def load(path: str | Path) -> Config:
    """Parse and check a config file; raise ConfigError naming the bad field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse(raw, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse(raw: Mapping[str, Any], base: Path = Path(".")) -> Config:
    """Build a Config from a parsed TOML table; relative paths resolve against `base`."""
    r = _Reader(raw, "", base)
    cfg = Config(
        node=r.str("node", DEFAULT_NODE, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"),
        bundle_dir=r.path("bundle_dir", Path("var/bundles")),
        blob_ttl=r.int("blob_ttl", C.DEFAULT_BLOB_TTL, low=10),
        dedup_ttl=r.int("dedup_ttl", C.DEFAULT_DEDUP_TTL, low=10),
        metrics_port=r.int("metrics_port", 0, low=0, high=65535),
        log_format=r.choice("log_format", "auto", ("auto", "json", "console")),
        mqtt=_mqtt(r.table("mqtt")),
        redis=_redis(r.table("redis")),
        keyring=_keyring(r.table("keyring")),
        limits=_limits(r.table("limits")),
        tasks=_tasks(r.table("tasks")),
        devices=_devices(r.table("devices")),
    )
    r.done()
    return cfg


def _mqtt(r: _Reader) -> MqttConfig:
    out = MqttConfig(
        host=r.str("host", "127.0.0.1"),
        port=r.int("port", 1883, low=1, high=65535),
        client_id=r.str("client_id", ""),
        username=r.opt_str("username"),
        password_file=r.opt_path("password_file"),
        tls_ca=r.opt_path("tls_ca"),
        tls_cert=r.opt_path("tls_cert"),
        tls_key=r.opt_path("tls_key"),
        keepalive=r.int("keepalive", 30, low=5, high=3600),
        session_expiry=r.int("session_expiry", 86400, low=0),
        shared_group=r.opt_str("shared_group"),
    )
    r.done()
    return out


def _redis(r: _Reader, parent: RedisConfig | None = None) -> RedisConfig:
    base = parent or RedisConfig()
    out = RedisConfig(
        url=r.str("url", base.url, pattern=r"^(redis|rediss|unix)://"),
        username=r.opt_str("username", base.username),
        password_file=r.opt_path("password_file") or base.password_file,
    )
    if parent is None and "worker" in r.raw:
        out = RedisConfig(out.url, out.username, out.password_file,
                          worker=_redis(r.table("worker"), parent=out))
    r.done()
    return out


def _keyring(r: _Reader) -> KeyringConfig:
    out = KeyringConfig(
        credential=r.str("credential", "edge-keyring"),
        file=r.opt_path("file"),
        env=r.opt_str("env", "EDGE_KEYRING"),
        signer=r.opt_path("signer"),
        mode=r.choice("mode", "single", ("single", "fleet")),
        credential_file=r.opt_path("credential_file"),
    )
    r.done()
    return out


def _limits(r: _Reader) -> LimitsConfig:
    out = LimitsConfig(
        job_memory=r.int("job_memory", C.DEFAULT_JOB_MEMORY, low=16 << 20),
        json_depth=r.int("json_depth", C.DEFAULT_JSON_DEPTH, low=2, high=1000),
        redis_fill_percent=r.int("redis_fill_percent", C.DEFAULT_REDIS_FILL_PERCENT, low=10,
                                 high=100),
    )
    r.done()
    return out


def _tasks(r: _Reader) -> dict[str, TaskConfig]:
    out = {}
    for name in r.keys():
        if name not in TASKS:
            raise ConfigError(f"{r.where(name)}: unknown task (known: {', '.join(TASKS)})")
        t = r.table(name)
        devices = t.str_list("devices", ["CPU"], pattern=DEVICE_RE)
        if not devices:
            raise ConfigError(f"{t.where('devices')}: needs at least one device")
        out[name] = TaskConfig(
            devices=tuple(devices),
            queue_limit=t.int("queue_limit", 100, low=1),
            max_bytes=t.int("max_bytes", 1 << 20, low=1),
            timeout=t.int("timeout", 60, low=1),
            deadline=t.int("deadline", 300, low=1),
            device_limit=t.opt_int("device_limit", low=1),
            max_batch=t.int("max_batch", C.TASK_MAX_BATCH.get(name, C.DEFAULT_MAX_BATCH),
                            low=1, high=C.MAX_BATCH_LIMIT),
            batch_wait_ms=t.int("batch_wait_ms", 0, low=0, high=1000),
            default_model=t.opt_str("default_model"),
        )
        t.done()
    return out


def _devices(r: _Reader) -> dict[str, DeviceConfig]:
    out = {}
    for name in r.keys():
        if not re.match(DEVICE_RE, name):
            raise ConfigError(f"{r.where(name)}: not an OpenVINO device name (CPU, GPU, GPU.1, NPU)")
        d = r.table(name)
        out[name] = DeviceConfig(
            performance_hint=d.choice("performance_hint", "LATENCY",
                                      ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")),
            num_streams=d.opt_int("num_streams", low=1),
            num_requests=d.opt_int("num_requests", low=1),
            inference_precision=d.opt_choice("inference_precision", ("f32", "bf16", "f16")),
            cache_dir=d.opt_path("cache_dir"),
            metrics_port=d.opt_int("metrics_port", low=0),
            threads=d.opt_int("threads", low=1),
        )
        if out[name].threads is not None and not name.startswith("CPU"):
            raise ConfigError(f"{d.where('threads')}: only a CPU takes threads "
                              "(INFERENCE_NUM_THREADS); a GPU or NPU plugin has none")
        d.done()
    return out


_Str: TypeAlias = str  # inside _Reader, `str` and `int` name its methods
_Int: TypeAlias = int


class _Reader:
    """Reads typed fields from one TOML table, remembering the path for error messages."""

    def __init__(self, raw: Any, prefix: _Str, base: Path) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix or '<root>'}: must be a table")
        self.raw, self.prefix, self.base = raw, prefix, base
        self.seen: set[str] = set()

    def where(self, key: _Str) -> _Str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def keys(self) -> list[_Str]:
        self.seen.update(self.raw)
        return list(self.raw)

    def _get(self, key: _Str) -> Any:
        self.seen.add(key)
        return self.raw.get(key)

    def table(self, key: _Str) -> _Reader:
        value = self._get(key)
        return _Reader({} if value is None else value, self.where(key), self.base)

    def str(self, key: _Str, default: _Str, pattern: _Str | None = None) -> _Str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: must be a string")
        if pattern is not None:
            if not re.match(pattern, value):
                raise ConfigError(f"{self.where(key)}: {value!r} does not match {pattern}")
        return value

    def opt_str(self, key: _Str, default: _Str | None = None) -> _Str | None:
        return self.str(key, default or "") if key in self.raw else default

    def choice(self, key: _Str, default: _Str, choices: tuple[_Str, ...]) -> _Str:
        value = self.str(key, default)
        if value not in choices:
            raise ConfigError(f"{self.where(key)}: must be one of {', '.join(choices)}")
        return value

    def opt_choice(self, key: _Str, choices: tuple[_Str, ...]) -> _Str | None:
        return self.choice(key, choices[0], choices) if key in self.raw else self._get(key)

    def int(self, key: _Str, default: _Int, low: _Int | None = None,
            high: _Int | None = None) -> _Int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where(key)}: must be an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{self.where(key)}: {value} is out of range [{low}, {high}]")
        return value

    def opt_int(self, key: _Str, low: _Int | None = None) -> _Int | None:
        return self.int(key, 0, low=low) if key in self.raw else self._get(key)

    def path(self, key: _Str, default: Path) -> Path:
        value = self.str(key, str(default))
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def opt_path(self, key: _Str) -> Path | None:
        return self.path(key, Path(".")) if key in self.raw else self._get(key)

    def str_list(self, key: _Str, default: list[_Str], pattern: _Str | None = None) -> list[_Str]:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, list):
            raise ConfigError(f"{self.where(key)}: must be a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or (pattern and not re.match(pattern, item)):
                raise ConfigError(f"{self.where(key)}[{i}]: {item!r} is not valid")
        return list(value)

    def done(self) -> None:
        """Refuse keys nobody asked for: a typo must not be silently ignored."""
        extra = sorted(set(self.raw) - self.seen)
        if extra:
            raise ConfigError(f"{self.where(extra[0])}: unknown setting")
