"""Bundles -> compiled models, one per model version, and the request -> version dispatch.

The worker asks for the tasks its device serves. Of every model installed for those tasks
(`keys.layout`: `<bundle_dir>/<task>--<name>/<version>/`) it compiles the serving version and
the one that served before it (so a roll-back and `model=name@version` for it cost no compile),
plus any version an activation in progress asked for (`pins`). Each version is opened with the
keyring, decrypted in memory and handed alone to its task's `load`, so versions of one name sit
side by side. A version already compiled in the previous set (`reuse`, same folder, same
manifest) is kept, not compiled again: an activation compiles only the new version.

A request names `model=name` (its serving version), `model=name@version` (any version loaded
here) or nothing: then `[tasks.X] default_model`, else the first model installed for the task.
The answer's result says which version ran (`version`, next to `model`).

A bundle that cannot be opened, decrypted or compiled is dropped on its own and recorded in
`ModelSet.broken` (by name when it is the serving version, else by `name@version`): the other
models still load, and a job that names the broken one is answered `model_unavailable` with the
reason. Custom-op extensions a bundle carries (`workers.extensions`) are added to the Core
before its task reads any IR.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge.config import Config
from edge.errors import EdgeError, ModelUnavailable
from edge.tasks import TASKS, bundle_task
from workers.api import DeviceSettings, Handler, Progress, Request, Response, no_progress
from workers.extensions import ExtensionError, Extensions
from workers.schema import default_candidates

log = structlog.get_logger("workers.model_store")


@dataclass(frozen=True, slots=True)
class Version:
    """One compiled version of one model."""

    task: str  # the bundle task (tokenize serves detokenize too)
    name: str
    version: str
    handler: Handler
    identity: tuple[str, str]  # (folder, manifest digest): the same bundle, no new compile
    manifest: Mapping[str, Any]
    seconds: float
    kernel_files: frozenset[str] = frozenset()


Loaded = Mapping[str, Mapping[str, Mapping[str, Version]]]  # bundle task -> name -> version


@dataclass(frozen=True, slots=True)
class ModelSet:
    """What a worker serves: a handler per job task (it picks the model version), what is
    loaded and serving, and why the rest is unavailable. Swapped whole, never edited."""

    handlers: Mapping[str, Handler]
    unavailable: Mapping[str, str]
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    load_seconds: Mapping[str, float] = field(default_factory=dict)
    broken: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # bundle task->name->why
    kernel_files: frozenset[str] = frozenset()  # GPU kernel files (RAM dir) these models use
    loaded: Loaded = field(default_factory=dict)
    serving: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # task->name->version

    def broken_reason(self, task: str, model: Any) -> str | None:
        """Why model `model` of job task `task` is not served, if its bundle is broken."""
        reason = self.broken.get(bundle_task(task), {}).get(model)
        return f"model {model!r} is unavailable on this worker: {reason}" if reason else None

    def check(self, task: str, model: Any = None, params: Mapping[str, Any] | None = None
              ) -> Handler:
        """The handler of `task`; ModelUnavailable, with the reason, when the task or the
        model named is not served here (the default model is resolved only given `params`)."""
        handler = self.handlers.get(task)
        if handler is None:
            raise ModelUnavailable(self.unavailable.get(task, f"{task} is not served here"))
        broken = self.broken_reason(task, model)
        if broken is not None:  # else the handler would call the model "unknown"
            raise ModelUnavailable(broken)
        if isinstance(handler, Dispatch) and (model or params is not None):
            handler.resolve(model, params or {})
        return handler

    def handle(self, request: Request, progress: Progress) -> Response:
        """Run one request through its task's handler (see `check` for what is refused)."""
        return self.check(request.task, request.params.get("model"))(request, progress)

    def versions(self) -> dict[str, dict[str, dict[str, Any]]]:
        """bundle task -> name -> {"serving", "loaded"}: for the status document."""
        return {task: {name: {"serving": self.serving.get(task, {}).get(name),
                              "loaded": sorted(versions)}
                       for name, versions in names.items()}
                for task, names in self.loaded.items()}


class Dispatch:
    """The handler of one job task: picks the model version a request names and stamps the
    answer with it."""

    def __init__(self, task: str, loaded: Mapping[str, Mapping[str, Version]],
                 serving: Mapping[str, str], order: Sequence[str], default: str | None,
                 broken: Mapping[str, str]) -> None:
        self.task, self.loaded, self.serving = task, loaded, serving
        self.order, self.default, self.broken = tuple(order), default, broken

    def resolve(self, model: Any, params: Mapping[str, Any]) -> Version:
        """The version that answers a request naming `model` (None: the default)."""
        if not model:
            name = self._default(params)
            version = self.serving[name]
        else:
            name, sep, version = str(model).rpartition("@")
            if not sep:
                name, version = version, ""
            if name not in self.loaded:
                why = self.broken.get(name)
                if why:
                    raise ModelUnavailable(f"model {name!r} is unavailable on this worker: {why}")
                raise ModelUnavailable(f"{self.task} model {name!r} is not installed here "
                                       f"(have: {', '.join(sorted(self.loaded)) or 'none'})")
            version = version or self.serving.get(name, "")
        found = self.loaded[name].get(version)
        if found is None:
            why = self.broken.get(f"{name}@{version}") or self.broken.get(name)
            have = ", ".join(f"{name}@{v}" for v in self.loaded[name])
            raise ModelUnavailable(f"model {name}@{version} is not loaded on this worker"
                                   + (f": {why}" if why else f" (loaded: {have})"))
        return found

    def _default(self, params: Mapping[str, Any]) -> str:
        if self.default:
            if self.default not in self.serving:
                raise ModelUnavailable(f"the default {self.task} model {self.default!r} "
                                       f"(tasks.{self.task}.default_model) is not loaded here")
            return self.default
        manifests = {n: self.loaded[n][self.serving[n]].manifest for n in self.order}
        names = default_candidates(self.task, self.order, manifests, params)
        if not names:
            raise ModelUnavailable(f"no {self.task} model for these params is installed here")
        return names[0]

    def __call__(self, request: Request, progress: Progress) -> Response:
        found = self.resolve(request.params.get("model"), request.params)
        return _stamped(found, found.handler(_named(request, found), progress))

    @property
    def batches(self) -> bool:
        """Whether the models of this task run several requests as one (workers/batching.py)."""
        return any(hasattr(v.handler, "batch") for vs in self.loaded.values()
                   for v in vs.values())

    def runs_alone(self, params: Mapping[str, Any]) -> bool:
        """Whether a job with `params` must run on its own, outside a batch: its version's
        handler says so (`runs_alone`; e.g. superres quality mode)."""
        try:
            found = self.resolve(params.get("model"), params)
        except EdgeError:
            return False  # the batch answers its error
        alone = getattr(found.handler, "runs_alone", None)
        return bool(alone({**params, "model": found.name})) if alone else False

    def batch(self, requests: Sequence[Request]) -> list[Response | EdgeError]:
        """Several requests (workers/batching.py): each resolved to its version on its own (an
        error fails only its request), those of one version run through one `batch` call."""
        out: list[Response | EdgeError | None] = [None] * len(requests)
        groups: dict[tuple[str, str], tuple[Version, list[int]]] = {}
        for i, request in enumerate(requests):
            try:
                found = self.resolve(request.params.get("model"), request.params)
            except EdgeError as exc:
                out[i] = exc
                continue
            groups.setdefault((found.name, found.version), (found, []))[1].append(i)
        for found, members in groups.values():
            named = [_named(requests[i], found) for i in members]
            results = (found.handler.batch(named) if hasattr(found.handler, "batch")
                       else [_call(found.handler, r) for r in named])
            for i, res in zip(members, results, strict=True):
                out[i] = res if isinstance(res, EdgeError) else _stamped(found, res)
        return [o for o in out if o is not None]


def _named(request: Request, found: Version) -> Request:
    """The request as the version's own handler sees it: the model named."""
    return Request(request.task, {**request.params, "model": found.name}, request.text,
                   request.ids, request.media, request.batch)


def _stamped(found: Version, response: Response) -> Response:
    """The answer names the version next to the model."""
    result: dict[str, Any] = {}
    for key, value in response.result.items():
        result[key] = value
        if key == "model":
            result["version"] = found.version
    result.setdefault("version", found.version)
    return Response(result, response.media)


def _call(handler: Handler, request: Request) -> Response | EdgeError:
    try:
        return handler(request, no_progress)
    except EdgeError as exc:
        return exc


def load_models(tasks: Sequence[str], bundle_dir: Path, ring: Any, core: Any,
                device: DeviceSettings, *, defaults: Mapping[str, str] | None = None,
                reuse: ModelSet | None = None,
                pins: Collection[tuple[str, str, str]] = ()) -> ModelSet:
    """Open, decrypt and compile the versions the given job tasks need (module docstring):
    `defaults` job task -> model name, `reuse` the set now serving, `pins` extra
    (bundle task, name, version) to load."""
    from keys import layout

    wanted = {bundle_task(t) for t in tasks}
    old = {v.identity: v for names in (reuse.loaded if reuse else {}).values()
           for versions in names.values() for v in versions.values()}
    extensions = Extensions(core, device.name)
    loaded: dict[str, dict[str, dict[str, Version]]] = {t: {} for t in wanted}
    serving: dict[str, dict[str, str]] = {t: {} for t in wanted}
    order: dict[str, list[str]] = {t: [] for t in wanted}
    broken: dict[str, dict[str, str]] = {t: {} for t in wanted}
    for model in layout.installed(bundle_dir) if bundle_dir.exists() else []:
        if model.task not in wanted:
            continue
        keep = {model.serving, model.previous} | {v for t, n, v in pins
                                                   if (t, n) == (model.task, model.name)}
        for version in sorted((v for v in keep if v in model.versions), key=layout.version_key):
            label = model.name if version == model.serving else f"{model.name}@{version}"
            outcome = _load_version(model.versions[version], ring, core, device, extensions,
                                    old, model.task)
            if isinstance(outcome, str):
                broken[model.task][label] = outcome
                continue
            loaded[model.task].setdefault(model.name, {})[version] = outcome
        if model.serving in loaded[model.task].get(model.name, {}):
            serving[model.task][model.name] = model.serving
            order[model.task].append(model.name)
    return _assemble(tasks, loaded, serving, order, broken, defaults or {},
                     frozenset(extensions.kernel_files))


def _assemble(tasks: Sequence[str], loaded: dict[str, dict[str, dict[str, Version]]],
              serving: dict[str, dict[str, str]], order: dict[str, list[str]],
              broken: dict[str, dict[str, str]], defaults: Mapping[str, str],
              kernel_files: frozenset[str]) -> ModelSet:
    handlers: dict[str, Handler] = {}
    unavailable: dict[str, str] = {}
    models: dict[str, tuple[str, ...]] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        bt = bundle_task(task)
        if not serving[bt]:
            unavailable[task] = (f"every {bt} bundle is broken: " + "; ".join(
                f"{n}: {why}" for n, why in sorted(broken[bt].items()))
                if broken[bt] else f"no {bt} bundle on this gateway")
            continue
        handlers[task] = Dispatch(task, loaded[bt], serving[bt], order[bt], defaults.get(task),
                                  broken[bt])
        models[task] = tuple(sorted(serving[bt]))
        seconds[task] = sum(v.seconds for names in loaded[bt].values() for v in names.values())
    kernels = kernel_files.union(*(v.kernel_files for names in loaded.values()
                                   for versions in names.values() for v in versions.values()))
    return ModelSet(handlers, unavailable, models, seconds,
                    {t: dict(names) for t, names in broken.items() if names}, kernels,
                    {t: names for t, names in loaded.items() if names},
                    {t: names for t, names in serving.items() if names})


def _load_version(path: Path, ring: Any, core: Any, device: DeviceSettings,
                  extensions: Extensions, old: Mapping[tuple[str, str], Version],
                  task: str) -> Version | str:
    """One version compiled (or reused), or why it cannot be."""
    import keys

    where = f"{path.parent.name}/{path.name}"
    known = old.get(_identity(path))
    if known is not None:  # compiled already: not even reopened (a switch costs jobs nothing)
        return known
    try:
        bundle = keys.Bundle.open(path, ring)
    except keys.BundleError as exc:
        log.error("bundle_unreadable", bundle=str(path), error=str(exc))
        return str(exc)
    identity = (str(path), hashlib.sha256(keys.bundle.canonical(bundle.manifest)).hexdigest())
    if bundle.task != task:
        return f"{where}: bundle.json says task {bundle.task!r}, its folder {task!r}"
    start = time.perf_counter()
    before = set(extensions.kernel_files)
    try:
        extensions.apply(bundle)  # the ops an IR names must exist before it is read
        module = importlib.import_module(TASKS[task].module)
        handler = module.load([bundle], core, device)
    except (keys.BundleError, ExtensionError) as exc:
        # chunks are authenticated only when read: a tampered file shows up here
        log.error("bundle_broken", task=task, bundle=where, error=str(exc))
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken model must not take the others down
        log.exception("model_load_failed", task=task, bundle=where, device=device.name)
        return f"{where} failed to load on {device.name}: {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    log.info("model_loaded", task=task, model=bundle.name, version=bundle.version,
             device=device.name, seconds=round(seconds, 3))
    return Version(task, bundle.name, bundle.version, handler, identity, bundle.manifest,
                   seconds, frozenset(set(extensions.kernel_files) - before))


def _identity(path: Path) -> tuple[str, str]:
    """(folder, manifest digest) read from bundle.json alone; every file header binds that
    digest, so files of another manifest would not open."""
    import keys

    try:
        manifest = json.loads((path / keys.bundle.MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return (str(path), "")
    return (str(path), hashlib.sha256(keys.bundle.canonical(manifest)).hexdigest())


def device_present(core, device: str) -> bool:
    """Whether OpenVINO sees `device` (GPU matches GPU.0 too)."""
    available = set(core.available_devices)
    return device in available or (device in ("GPU", "NPU") and f"{device}.0" in available)


def new_core() -> Any:
    """An OpenVINO Core with openvino-tokenizers' ops registered."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401 - registers its ops with every Core made after it

    return ov.Core()


def default_models(config: Config, tasks: Sequence[str]) -> dict[str, str]:
    """Job task -> `[tasks.X] default_model` (detokenize falls back to tokenize's)."""
    out = {}
    for task in tasks:
        for source in (task, bundle_task(task)):
            name = getattr(config.tasks.get(source), "default_model", None)
            if name:
                out[task] = name
                break
    return out


def build_models(config: Config, device: str, ring: Any, *, reuse: ModelSet | None = None,
                 pins: Collection[tuple[str, str, str]] = (), core: Any = None) -> ModelSet:
    """Compile everything this device serves (keeping what `reuse` already compiled), with a
    new Core unless one is given (a new one queries every plugin for its devices: seconds,
    some of them with the GIL held, which an activation must not cost the running jobs)."""
    core = core if core is not None else new_core()
    if not device_present(core, device):
        raise SystemExit(f"edge-worker: OpenVINO device {device!r} is not present on this "
                         f"host (available: {', '.join(core.available_devices)})")
    settings = DeviceSettings(device, config.device(device).properties(),
                              job_memory=config.limits.job_memory)
    tasks = config.tasks_on(device)
    return load_models(tasks, config.bundle_dir, ring, core, settings,
                       defaults=default_models(config, tasks), reuse=reuse, pins=pins)

