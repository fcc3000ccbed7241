"""Bundles -> compiled task handlers, once, when a worker starts.

The worker asks for the tasks its device serves; every bundle of those tasks is opened with the
keyring, decrypted in memory and handed to the task's `load`. A bundle or task that fails to load
is reported (`model_unavailable` for its jobs) while the others keep serving.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog

from edge import constants as C
from workers.api import DeviceSettings, Handler

log = structlog.get_logger("workers.model_store")


@dataclass(frozen=True, slots=True)
class ModelSet:
    """What a worker serves: a handler per job task, and why the others are unavailable."""

    handlers: Mapping[str, Handler]
    unavailable: Mapping[str, str]
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    load_seconds: Mapping[str, float] = field(default_factory=dict)


def load_models(tasks: Sequence[str], bundle_dir: Path, ring: Any, core: Any,
                device: DeviceSettings) -> ModelSet:
    """Open, decrypt and compile every bundle the given job tasks need."""
    import keys

    bundles, errors = keys.open_all(bundle_dir, ring) if bundle_dir.exists() else ([], [])
    for path, err in errors:
        log.error("bundle_unreadable", bundle=str(path), error=str(err))
    by_task: dict[str, list] = {}
    for b in bundles:
        by_task.setdefault(b.task, []).append(b)
    handlers: dict[str, Handler] = {}
    unavailable: dict[str, str] = {}
    models: dict[str, tuple[str, ...]] = {}
    seconds: dict[str, float] = {}
    loaded: dict[str, Handler | str] = {}
    for task in tasks:
        bundle_task = C.BUNDLE_TASK[task]
        if bundle_task not in loaded:
            loaded[bundle_task] = _load_task(bundle_task, by_task.get(bundle_task, []), core,
                                             device, seconds)
        outcome = loaded[bundle_task]
        if isinstance(outcome, str):
            unavailable[task] = outcome
        else:
            handlers[task] = outcome
            models[task] = tuple(sorted(b.name for b in by_task.get(bundle_task, [])))
    return ModelSet(handlers, unavailable, models, seconds)


def _load_task(task: str, bundles: list, core: Any, device: DeviceSettings,
               seconds: dict[str, float]) -> Handler | str:
    if not bundles:
        return f"no {task} bundle on this gateway"
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"workers.{task}")
        handler = module.load(bundles, core, device)
    except Exception as exc:  # noqa: BLE001 - one broken model must not take the others down
        log.exception("task_load_failed", task=task, device=device.name)
        return f"{task} models failed to load on {device.name}: {type(exc).__name__}: {exc}"
    seconds[task] = time.perf_counter() - start
    log.info("task_loaded", task=task, device=device.name,
             models=sorted(b.name for b in bundles), seconds=round(seconds[task], 3))
    return handler
