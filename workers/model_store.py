"""Bundles -> compiled task handlers, once, when a worker starts.

The worker asks for the tasks its device serves; every bundle of those tasks is opened with the
keyring, decrypted in memory and handed to the task's `load`. A bundle or task that fails to load
is reported (`model_unavailable` for its jobs) while the others keep serving.

A bundle that cannot be opened or decrypted (tampered, truncated, wrapped under a key the ring
lacks) is dropped on its own and recorded in `ModelSet.broken`: the other bundles of its task
still load, and a job that names the broken model is answered `model_unavailable` with the
reason instead of "unknown model".

Custom-op extensions a bundle carries (`workers.extensions`) are added to the Core before its
task reads any IR; a bundle whose extension fails to load is broken the same way.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge.config import Config
from edge.errors import ModelUnavailable
from edge.tasks import TASKS, bundle_task
from workers.api import DeviceSettings, Handler, Progress, Request, Response
from workers.extensions import ExtensionError, Extensions

log = structlog.get_logger("workers.model_store")


@dataclass(frozen=True, slots=True)
class ModelSet:
    """What a worker serves: a handler per job task, and why the others are unavailable."""

    handlers: Mapping[str, Handler]
    unavailable: Mapping[str, str]
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    load_seconds: Mapping[str, float] = field(default_factory=dict)
    broken: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # bundle task->name->why
    kernel_files: frozenset[str] = frozenset()  # GPU kernel files (RAM dir) these models use

    def broken_reason(self, task: str, model: Any) -> str | None:
        """Why model `model` of job task `task` is not served, if its bundle is broken."""
        reason = self.broken.get(bundle_task(task), {}).get(model)
        return f"model {model!r} is unavailable on this worker: {reason}" if reason else None

    def check(self, task: str, model: Any = None) -> Handler:
        """The handler of `task`; ModelUnavailable, with the reason, when the task or the
        model named is not served here."""
        handler = self.handlers.get(task)
        if handler is None:
            raise ModelUnavailable(self.unavailable.get(task, f"{task} is not served here"))
        broken = self.broken_reason(task, model)
        if broken is not None:  # else the handler would call the model "unknown"
            raise ModelUnavailable(broken)
        return handler

    def handle(self, request: Request, progress: Progress) -> Response:
        """Run one request through its task's handler (see `check` for what is refused)."""
        return self.check(request.task, request.params.get("model"))(request, progress)


def load_models(tasks: Sequence[str], bundle_dir: Path, ring: Any, core: Any,
                device: DeviceSettings) -> ModelSet:
    """Open, decrypt and compile every bundle the given job tasks need."""
    import keys

    bundles, errors = keys.open_all(bundle_dir, ring) if bundle_dir.exists() else ([], [])
    broken: dict[str, dict[str, str]] = {}
    for path, err in errors:
        log.error("bundle_unreadable", bundle=str(path), error=str(err))
        # bundle.json may be the broken part, so the folder name (`task--name`) says whose it is
        task, sep, name = path.name.partition("--")
        if sep:
            broken.setdefault(task, {})[name] = str(err)
    by_task: dict[str, list] = {}
    for b in bundles:
        by_task.setdefault(b.task, []).append(b)
    handlers: dict[str, Handler] = {}
    unavailable: dict[str, str] = {}
    models: dict[str, tuple[str, ...]] = {}
    seconds: dict[str, float] = {}
    loaded: dict[str, Handler | str] = {}
    extensions = Extensions(core, device.name)
    for task in tasks:
        served_by = bundle_task(task)
        if served_by not in loaded:
            loaded[served_by] = _load_task(served_by, by_task.get(served_by, []), core,
                                           device, seconds, broken.setdefault(served_by, {}),
                                           extensions)
        outcome = loaded[served_by]
        if isinstance(outcome, str):
            unavailable[task] = outcome
        else:
            handlers[task] = outcome
            models[task] = tuple(sorted(b.name for b in by_task.get(served_by, [])
                                        if b.name not in broken.get(served_by, {})))
    return ModelSet(handlers, unavailable, models, seconds,
                    {t: dict(names) for t, names in broken.items() if names},
                    frozenset(extensions.kernel_files))


class _BrokenBundle(Exception):
    """A bundle's file failed to decrypt while its task was loading."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(f"{name}: {error}")
        self.name, self.error = name, error


class _Tracked:
    """A bundle whose decrypt failures name the bundle, so that its task can load without it."""

    def __init__(self, bundle: Any) -> None:
        self._bundle = bundle

    @property
    def name(self) -> str:
        return self._bundle.name

    @property
    def manifest(self) -> Mapping[str, Any]:
        return self._bundle.manifest

    def __getattr__(self, attr: str) -> Any:  # task loaders may use more of a real Bundle
        return getattr(self._bundle, attr)

    def read(self, name: str) -> bytearray:
        import keys

        try:
            return self._bundle.read(name)
        except keys.BundleError as exc:
            raise _BrokenBundle(self._bundle.name, exc) from exc

    def read_into(self, name: str, allocate: Any) -> Any:
        import keys

        try:
            return self._bundle.read_into(name, allocate)
        except keys.BundleError as exc:
            raise _BrokenBundle(self._bundle.name, exc) from exc


def _load_task(task: str, bundles: list, core: Any, device: DeviceSettings,
               seconds: dict[str, float], broken: dict[str, str],
               extensions: Extensions) -> Handler | str:
    bundles = [b for b in bundles if b.name not in broken]
    if not bundles:
        if broken:
            return f"every {task} bundle is broken: " + "; ".join(
                f"{n}: {why}" for n, why in sorted(broken.items()))
        return f"no {task} bundle on this gateway"
    start = time.perf_counter()
    try:
        for b in bundles:  # the ops an IR names must exist before the IR is read
            _add_extensions(extensions, b)
        module = importlib.import_module(TASKS[task].module)
        handler = module.load([_Tracked(b) for b in bundles], core, device)
    except _BrokenBundle as exc:
        # Chunks are authenticated only when read, so a tampered file shows up here, in the
        # middle of a task's load: drop that bundle and load the task again without it.
        log.error("bundle_broken", task=task, bundle=exc.name, error=str(exc.error))
        broken[exc.name] = str(exc.error)
        return _load_task(task, bundles, core, device, seconds, broken, extensions)
    except Exception as exc:  # noqa: BLE001 - one broken model must not take the others down
        log.exception("task_load_failed", task=task, device=device.name)
        return f"{task} models failed to load on {device.name}: {type(exc).__name__}: {exc}"
    seconds[task] = time.perf_counter() - start
    log.info("task_loaded", task=task, device=device.name,
             models=sorted(b.name for b in bundles), seconds=round(seconds[task], 3))
    return handler


def _add_extensions(extensions: Extensions, bundle: Any) -> None:
    try:
        extensions.apply(_Tracked(bundle))
    except ExtensionError as exc:
        raise _BrokenBundle(bundle.name, exc) from exc


def device_present(core, device: str) -> bool:
    """Whether OpenVINO sees `device` (GPU matches GPU.0 too)."""
    available = set(core.available_devices)
    return device in available or (device in ("GPU", "NPU") and f"{device}.0" in available)


def build_models(config: Config, device: str, ring: Any) -> ModelSet:
    """Compile everything this device serves."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401 - registers its ops with every Core made after it

    core = ov.Core()
    if not device_present(core, device):
        raise SystemExit(f"edge-worker: OpenVINO device {device!r} is not present on this "
                         f"host (available: {', '.join(core.available_devices)})")
    settings = DeviceSettings(device, config.device(device).properties(),
                              job_memory=config.limits.job_memory)
    return load_models(config.tasks_on(device), config.bundle_dir, ring, core, settings)
