"""The interface between the worker and a task: what a task folder gives, what it gets.

Every task folder (`workers/<task>/`) exposes, in its `__init__.py`:

    def load(bundles: Sequence[BundleLike], core: ov.Core, device: DeviceSettings) -> Handler

`load` runs once when the worker starts: it decrypts (through `bundle.read`), compiles and keeps
everything the task needs. The returned handler is called for every job:

    handler(request: Request, progress: Progress) -> Response

A handler raises `edge.errors.EdgeError` subclasses for anything the client should be told
(bad params, undecodable media, unknown model); anything else becomes `internal`.
Handlers know nothing of MQTT, Redis or RQ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.constants import DEFAULT_JOB_MEMORY


class BundleLike(Protocol):
    """A model bundle: its manifest (bundle.json) and its files, decrypted in memory."""

    @property
    def name(self) -> str: ...

    @property
    def manifest(self) -> Mapping[str, Any]: ...

    def read(self, name: str) -> bytearray: ...


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Where and how a worker compiles (device name, compile properties) and what one job may
    hold: `job_memory` bytes of decoded inputs, outputs and working buffers (`workers.budget`)."""

    name: str = "CPU"
    properties: Mapping[str, Any] = field(default_factory=dict)
    job_memory: int = DEFAULT_JOB_MEMORY


@dataclass(frozen=True, slots=True)
class Media:
    """One binary item of a request or a response (an image, an audio clip)."""

    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """One job as a task sees it: validated params and its inputs.

    `text` is a str or a tuple of str; `ids` a tuple of ints or a tuple of tuples; `media` the
    binary items in request order. `batch` is true when the client sent a list, so the answer
    mirrors that form.
    """

    task: str
    params: Mapping[str, Any] = field(default_factory=dict)
    text: str | tuple[str, ...] | None = None
    ids: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    media: tuple[Media, ...] = ()
    batch: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    """A task's answer: a JSON-able `result` object and binary items (images) in order."""

    result: Mapping[str, Any]
    media: tuple[Media, ...] = ()


Progress = Callable[[Mapping[str, Any]], None]


class Handler(Protocol):
    """What a task's `load` returns."""

    def __call__(self, request: Request, progress: Progress) -> Response: ...


def no_progress(_: Mapping[str, Any]) -> None:
    """A progress sink that drops everything (in-process runs without a reporter)."""


class FolderBundle:
    """A *plaintext* prepared folder read like a bundle.

    For the build host only (prepare checks, parity tests): the daemon reads encrypted bundles.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._manifest = json.loads((self.path / "bundle.json").read_text())

    @property
    def name(self) -> str:
        return str(self._manifest["name"])

    @property
    def manifest(self) -> Mapping[str, Any]:
        return self._manifest

    def read(self, name: str) -> bytearray:
        return bytearray((self.path / name).read_bytes())


def read_ir(core: Any, bundle: BundleLike, xml: str, weights: str | None = None) -> Any:
    """Read an OpenVINO IR from a bundle without it touching disk.

    The weights are decrypted straight into an `ov.Tensor` that OpenVINO allocates and owns, so
    the only plaintext copy is the model's own and lives exactly as long as the model needs it
    (a buffer of ours shared with the model could be freed under it; a copy of it would double
    the resident weights).
    """
    import openvino as ov

    weights = weights or xml[: -len(".xml")] + ".bin"
    xml_text = bytes(bundle.read(xml)).decode("utf-8")
    read_into = getattr(bundle, "read_into", None)
    if read_into is None:  # a plaintext FolderBundle (build host, tests)
        return core.read_model(xml_text, ov.Tensor(np.frombuffer(bundle.read(weights), np.uint8)))
    holder: list[Any] = []

    def allocate(n: int) -> Any:
        holder.append(ov.Tensor(ov.Type.u8, ov.Shape([n])))
        return holder[-1].data

    _, size = read_into(weights, allocate)
    tensor = holder[0]
    if size + 15 != tensor.get_byte_size():  # never: read_into asks for size + 15
        raise ValueError(f"{weights}: unexpected buffer size")
    return core.read_model(xml_text, tensor)
