"""Custom-operation extensions that a bundle carries, applied to a worker's Core before its IRs
are read.

`bundle.json` `settings` may hold

    "extensions": {"CPU": ["libmy_ops.so"],
                   "GPU": {"config": "my_kernels.xml", "files": ["my_kernel.cl"]}}

naming files of the bundle (encrypted like every file). The libraries define the custom ops, so
they are added on every device (an IR naming an op no library defines cannot be read); the CPU
plugin runs them through the op's `evaluate`. The GPU entry adds OpenCL kernels for those ops and
is applied only when the worker's device is a GPU.

Plaintext never touches a file system: every file is decrypted into an anonymous memory file
(`memfd_create`) and handed to OpenVINO as `/proc/self/fd/N`, which `dlopen` and file readers
accept. The descriptors stay open for the life of the process (a loaded library's ops, and the
GPU plugin's reading of its config at compile time, need them); a library shipped by several
bundles, or loaded again on a reload, is written once.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Mapping

import structlog

log = structlog.get_logger("workers.extensions")

_MEMFDS: dict[bytes, int] = {}  # sha256 of the plaintext -> its memfd, for the process life


class ExtensionError(Exception):
    """A bundle's extensions are malformed or fail to load; that bundle cannot be served."""


@dataclass(frozen=True, slots=True)
class ExtensionSpec:
    """What a bundle asks for: extension libraries, and an optional GPU kernel config."""

    libraries: tuple[str, ...] = ()
    gpu_config: str | None = None
    gpu_files: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.libraries and self.gpu_config is None


def spec_of(manifest: Mapping[str, Any]) -> ExtensionSpec:
    """The `settings.extensions` of a manifest, checked (ExtensionError names the bad field)."""
    ext = (manifest.get("settings") or {}).get("extensions")
    if ext is None:
        return ExtensionSpec()
    where = "settings.extensions"
    if not isinstance(ext, dict) or set(ext) - {"CPU", "GPU"}:
        raise ExtensionError(f"{where}: expected an object with keys CPU and/or GPU")
    libs = ext.get("CPU", [])
    if not isinstance(libs, list) or not all(isinstance(n, str) for n in libs):
        raise ExtensionError(f"{where}.CPU: expected a list of file names")
    gpu = ext.get("GPU")
    if gpu is None:
        return ExtensionSpec(tuple(libs))
    files = gpu.get("files", []) if isinstance(gpu, dict) else None
    if (not isinstance(gpu, dict) or not isinstance(gpu.get("config"), str)
            or not isinstance(files, list) or not all(isinstance(n, str) for n in files)):
        raise ExtensionError(f"{where}.GPU: expected {{\"config\": XML, \"files\": [kernels]}}")
    return ExtensionSpec(tuple(libs), gpu["config"], tuple(files))


class Extensions:
    """The extensions applied to one Core: each library once, one GPU kernel config at most."""

    def __init__(self, core: Any, device: str) -> None:
        self.core, self.device = core, device
        self._libraries: set[bytes] = set()
        self._gpu_config: tuple[str, str] | None = None  # (bundle, /proc/self/fd path)

    def apply(self, bundle: Any) -> None:
        """Add what `bundle` carries to the Core; ExtensionError says why it cannot be."""
        spec = spec_of(bundle.manifest)
        if spec.empty:
            return
        for name in spec.libraries:
            self._add_library(bundle, name)
        if spec.gpu_config is not None and self.device.upper().startswith("GPU"):
            self._set_gpu_config(bundle, spec)

    def _add_library(self, bundle: Any, name: str) -> None:
        data = bundle.read(name)
        digest = hashlib.sha256(data).digest()
        path = None if digest in self._libraries else memfd_path(name, data, digest)
        _wipe(data)
        if path is None:
            return
        try:
            self.core.add_extension(path)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for a library it cannot use
            raise ExtensionError(f"extension library {name!r} failed to load: "
                                 f"{_cause(exc)}") from exc
        self._libraries.add(digest)
        log.info("extension_added", bundle=bundle.name, library=name, path=path)

    def _set_gpu_config(self, bundle: Any, spec: ExtensionSpec) -> None:
        kernels = {}
        for name in spec.gpu_files:
            data = bundle.read(name)
            kernels[name] = memfd_path(name, data, hashlib.sha256(data).digest())
            _wipe(data)
        xml = bundle.read(spec.gpu_config)
        try:
            text = gpu_config_text(bytes(xml), kernels, spec.gpu_config)
        finally:
            _wipe(xml)
        path = memfd_path(spec.gpu_config, text, hashlib.sha256(text).digest())
        if self._gpu_config is not None:
            if self._gpu_config[1] == path:  # the same kernels again (a task's load retried)
                return
            # the GPU plugin keeps one CONFIG_FILE per device: a second would replace the first
            raise ExtensionError(f"GPU kernel config {spec.gpu_config!r}: bundle "
                                 f"{self._gpu_config[0]!r} already set another one on this worker")
        try:
            self.core.set_property(self.device, {"CONFIG_FILE": path})
        except RuntimeError as exc:
            raise ExtensionError(f"GPU kernel config {spec.gpu_config!r} was refused: "
                                 f"{_cause(exc)}") from exc
        self._gpu_config = (bundle.name, path)
        log.info("gpu_kernels_set", bundle=bundle.name, config=spec.gpu_config, path=path)


def gpu_config_text(xml: bytes, kernels: Mapping[str, str], where: str = "config") -> bytes:
    """The GPU custom-layer XML with each `<Source filename=...>` pointing at its kernel's path.

    Every Source must name one of the bundle's kernel files, so a config never reads anything
    from the host's file system.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ExtensionError(f"GPU kernel config {where!r} is not XML: {exc}") from None
    for source in root.iter("Source"):
        name = source.get("filename", "")
        path = kernels.get(name) or kernels.get(PurePosixPath(name).name)
        if path is None:
            raise ExtensionError(f"GPU kernel config {where!r} names kernel {name!r}, which is "
                                 f"not among the bundle's GPU files {sorted(kernels)}")
        source.set("filename", path)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def memfd_path(name: str, data: bytes | bytearray, digest: bytes) -> str:
    """`/proc/self/fd/N` of an anonymous memory file holding `data` (made once per content)."""
    fd = _MEMFDS.get(digest)
    if fd is None:
        fd = os.memfd_create(PurePosixPath(name).name, os.MFD_CLOEXEC)
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        _MEMFDS[digest] = fd
    return f"/proc/self/fd/{fd}"


def _wipe(data: Any) -> None:
    if isinstance(data, bytearray):  # the memfd holds the one copy OpenVINO needs
        data[:] = bytes(len(data))


def _cause(exc: BaseException) -> str:
    # OpenVINO messages start with "Exception from src/...:NN:"; the cause is on the lines after
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ")]
    return " ".join(useful or lines)[:500]
