"""Custom-operation extensions that a bundle carries, applied to a worker's Core before its IRs
are read.

`bundle.json` `settings` may hold

    "extensions": {"CPU": ["libmy_ops.so"],
                   "GPU": {"config": "my_kernels.xml", "files": ["my_kernel.cl"]}}

naming files of the bundle (encrypted like every file). The libraries define the custom ops, so
they are added on every device (an IR naming an op no library defines cannot be read); the CPU
plugin runs them through the op's `evaluate`. The GPU entry adds OpenCL kernels for those ops and
is applied only when the worker's device is a GPU.

Plaintext never touches a disk, by two routes:

* Libraries are decrypted into anonymous memory files (`memfd_create`) and handed to OpenVINO as
  `/proc/self/fd/N`, which `dlopen` accepts. The descriptors stay open for the life of the
  process (a loaded library's ops need them); a library shipped by several bundles, or loaded
  again on a reload, is written once.
* GPU kernels and their config cannot use a memfd: a memfd has no real path. The GPU plugin
  `realpath()`s `CONFIG_FILE` (a memfd's resolves to `/memfd:name (deleted)`, which nothing can
  open) and reads each kernel as `<config's directory>/<Source filename>`. So they get real
  paths in the worker's private runtime directory, and nowhere else (decided 2026-12): a fresh
  0700 directory, files 0600, made once per process below `$RUNTIME_DIRECTORY` (systemd's
  `RuntimeDirectory=edge-worker-%i`, mode 0700, a tmpfs under /run that systemd removes when the
  unit stops). Without `$RUNTIME_DIRECTORY` a bundle with GPU kernels is refused (that bundle
  only: ExtensionError), and so is a runtime directory that is not on tmpfs or ramfs. tmpfs is
  RAM, and the units set `MemorySwapMax=0`, so its pages never reach a swap device either; the
  directory is private to the worker's (dynamic) user. Weights never go there.
  The config is written beside its kernels, its Source filenames rewritten to their names there.
  The plugin reads the config and kernels again on every compile, so the files stay for the
  life of the process (named by content: a reload with the same kernels writes nothing new) and
  are removed when it exits (`atexit`; after a SIGKILL, systemd's removal of the
  RuntimeDirectory does it).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

log = structlog.get_logger("workers.extensions")

_MEMFDS: dict[bytes, int] = {}  # sha256 of the plaintext -> its memfd, for the process life
RAM_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})


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
        self._gpu_config: tuple[str, str] | None = None  # (bundle, config path in the RAM dir)
        self.kernel_files: set[str] = set()  # every file of the RAM dir this Core's models use

    def apply(self, bundle: Any) -> None:
        """Add what `bundle` carries to the Core; ExtensionError says why it cannot be."""
        spec = spec_of(bundle.manifest)
        if spec.empty:
            return
        for name in spec.libraries:
            self._add_library(bundle, name)
        if spec.gpu_config is not None and self.device.upper().startswith("GPU"):
            self._set_gpu_config(bundle, spec.gpu_config, spec.gpu_files)

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

    def _set_gpu_config(self, bundle: Any, config: str, files: tuple[str, ...]) -> None:
        with _lock:  # refuse before any kernel is decrypted
            _kernel_dir or _make_kernel_dir(os.environ)
        kernels = {}
        for name in files:
            data = bundle.read(name)
            try:
                path = kernel_file(name, data)
            finally:
                _wipe(data)
            self.kernel_files.add(path)
            kernels[name] = os.path.basename(path)
        xml = bundle.read(config)
        try:
            text = gpu_config_text(bytes(xml), kernels, config)
        finally:
            _wipe(xml)
        path = kernel_file(config, text)
        self.kernel_files.add(path)
        if self._gpu_config is not None:
            if self._gpu_config[1] == path:  # the same kernels again (a task's load retried)
                return
            # the GPU plugin keeps one CONFIG_FILE per device: a second would replace the first
            raise ExtensionError(f"GPU kernel config {config!r}: bundle "
                                 f"{self._gpu_config[0]!r} already set another one on this worker")
        try:
            self.core.set_property(self.device, {"CONFIG_FILE": path})
        except RuntimeError as exc:
            raise ExtensionError(f"GPU kernel config {config!r} was refused: "
                                 f"{_cause(exc)}") from exc
        self._gpu_config = (bundle.name, path)
        log.info("gpu_kernels_set", bundle=bundle.name, config=config, path=path)


def gpu_config_text(xml: bytes, kernels: Mapping[str, str], where: str = "config") -> bytes:
    """The GPU custom-layer XML with each `<Source filename=...>` replaced by its kernel's entry
    in `kernels` (the kernel's file name beside the config: the plugin reads
    `<config's directory>/<filename>`).

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
        _write_all(fd, data)
        _MEMFDS[digest] = fd
    return f"/proc/self/fd/{fd}"


# -- the GPU kernels' private RAM directory, one per process --------------------------------

_lock = threading.Lock()
_kernel_dir: dict[str, Any] = {}  # "path", "pid", "files" (sha256 -> path); empty until used
_removal_registered = False


def kernel_file(name: str, data: bytes | bytearray) -> str:
    """Real absolute path of a 0600 file holding `data` in this process's RAM directory, named
    `<sha256 prefix>-<last part of name>` (written once per content)."""
    digest = hashlib.sha256(data).digest()
    with _lock:
        state = _kernel_dir or _make_kernel_dir(os.environ)
        path = state["files"].get(digest)
        if path is None:
            path = os.path.join(state["path"],
                                f"{digest.hex()[:16]}-{PurePosixPath(name).name[:100]}")
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)  # whatever the umask
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ExtensionError(f"cannot write GPU kernel file {name!r} to "
                                     f"{state['path']}: {exc.strerror}") from exc
            state["files"][digest] = path
        return path


def prune_kernel_files(keep: Collection[str]) -> list[str]:
    """Remove the kernel files not in `keep` (after a reload swapped in models that use other
    kernels: the old ones were read when the old models compiled); returns what was removed."""
    with _lock:
        files = _kernel_dir.get("files", {})
        gone = {digest: path for digest, path in files.items() if path not in keep}
        for digest, path in gone.items():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            del files[digest]
    return sorted(gone.values())


def remove_kernel_dir() -> None:
    """Remove the GPU kernel files and their directory (run at exit; only by the process that
    made them, so a forked child's exit leaves its parent's)."""
    with _lock:
        state = dict(_kernel_dir)
        _kernel_dir.clear()
    if state and state["pid"] == os.getpid():
        shutil.rmtree(state["path"], ignore_errors=True)
        log.info("gpu_kernel_dir_removed", path=state["path"])


def _make_kernel_dir(env: Mapping[str, str]) -> dict[str, Any]:
    global _removal_registered
    # systemd sets RUNTIME_DIRECTORY to every RuntimeDirectory= of the unit, colon-separated
    base = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0]
    if not base:
        raise ExtensionError("GPU custom operations need the worker's private runtime "
                             "directory, and $RUNTIME_DIRECTORY is not set: run the worker as "
                             "edge-worker@.service (RuntimeDirectory=edge-worker-%i, "
                             "RuntimeDirectoryMode=0700) or set RUNTIME_DIRECTORY to a private "
                             "0700 directory on tmpfs; decrypted kernels go nowhere else")
    require_ram_fs(base)  # before anything is made there
    try:
        mode = os.stat(base).st_mode & 0o777
    except OSError as exc:
        raise ExtensionError(f"runtime directory {base}: {exc.strerror}") from exc
    if mode & 0o077:  # RuntimeDirectoryMode=0700: nobody but the worker's user gets in
        raise ExtensionError(f"refusing to write decrypted GPU kernels below {base}: its mode "
                             f"is {mode:04o}, not private (RuntimeDirectoryMode=0700)")
    try:
        path = os.path.realpath(tempfile.mkdtemp(prefix="gpu-kernels-", dir=base))
        os.chmod(path, 0o700)  # mkdtemp's mode, whatever the umask
    except OSError as exc:
        raise ExtensionError(f"cannot make a GPU kernel directory in {base}: {exc}") from exc
    if not _removal_registered:
        atexit.register(remove_kernel_dir)
        _removal_registered = True
    _kernel_dir.update(path=path, pid=os.getpid(), files={})
    log.info("gpu_kernel_dir", path=path)
    return _kernel_dir


def require_ram_fs(path: str | os.PathLike[str]) -> None:
    """ExtensionError unless `path` is on tmpfs or ramfs (decrypted kernels never go to a disk)."""
    try:
        kind = fs_type(path)
    except OSError as exc:  # /proc/self/mountinfo unreadable: cannot tell, so refuse
        raise ExtensionError(f"cannot tell which file system {os.fspath(path)} is on: "
                             f"{exc}") from exc
    if kind not in RAM_FILE_SYSTEMS:
        raise ExtensionError(f"refusing to write decrypted GPU kernels to {os.fspath(path)}: it "
                             f"is on {kind or 'an unknown file system'}, not a RAM file system "
                             f"(tmpfs or ramfs); set RuntimeDirectory= in the worker's unit")


def fs_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """File system type of the mount holding `path`'s realpath, from /proc/self/mountinfo (the
    longest mount point containing it; of mounts stacked on one point, the last, i.e. top)."""
    real = os.path.realpath(path)
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    best, kind = "", None
    for line in mountinfo.splitlines():
        # "36 35 98:0 /root /mnt/point rw,noatime shared:1 - ext4 /dev/sda1 rw": the optional
        # fields vary in number, " - " ends them; spaces inside fields are escaped as \040
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        if not sep or len(fields) < 5 or not tail:
            continue
        point = _unescape(fields[4])
        inside = point == "/" or real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split(" ")[0]
    return kind


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


def _wipe(data: Any) -> None:
    if isinstance(data, bytearray):  # the memfd or RAM file holds the one copy OpenVINO needs
        data[:] = bytes(len(data))


def _cause(exc: BaseException) -> str:
    # OpenVINO messages start with "Exception from src/...:NN:"; the cause is on the lines after
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ")]
    return " ".join(useful or lines)[:500]
