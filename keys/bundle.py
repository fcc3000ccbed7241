"""Bundles: a folder with `bundle.json` and encrypted files; open, read, verify, pack.

`bundle.json` holds the prepared folder's manifest plus `format` and `files` (logical names).
File `a/b.xml` is stored encrypted as `a/b.xml.enc`. Every file header carries the bundle id
(`<task>--<name>`), its own logical name and the digest of the canonical manifest, so a file
swapped in from another bundle, renamed, or a `bundle.json` edited after packing is refused.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from keys import _format as fmt
from keys import layout
from keys._fs import fsync_dir, replace_dir
from keys.errors import BundleError
from keys.keyring import Keyring

FORMAT = "edge-bundle/1"
MANIFEST = "bundle.json"
SUFFIX = ".enc"
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes whose digest every file header carries."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def bundle_id(task: str, name: str) -> str:
    """A bundle's identity and folder name: names repeat across tasks, task--name does not."""
    return f"{task}--{name}"


def _safe_name(where: Path, name: Any) -> str:
    parts = PurePosixPath(str(name)).parts
    if not isinstance(name, str) or not parts or name.startswith("/") or ".." in parts:
        raise BundleError(f"{where}: unsafe file name {name!r} in {MANIFEST}")
    return name


@dataclass(frozen=True, slots=True)
class Bundle:
    """An opened bundle: its manifest, and its files decrypted on demand, in memory only."""

    path: Path
    manifest: dict[str, Any]
    ring: Keyring = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def id(self) -> str:
        return bundle_id(self.task, self.name)

    @property
    def files(self) -> list[str]:
        return list(self.manifest["files"])

    @classmethod
    def open(cls, path: Path, ring: Keyring) -> Bundle:
        """Read `bundle.json` and check every listed file exists and its header is ours."""
        path = Path(path)
        manifest = _load_manifest(path)
        bundle = cls(path, manifest, ring)
        digest = fmt.manifest_digest(canonical(manifest))
        for name in bundle.files:
            with _open_file(bundle, name) as f:
                bundle._header(f, name, digest)
        return bundle

    def file_path(self, name: str) -> Path:
        """Where the encrypted form of logical file `name` is."""
        return self.path / (_safe_name(self.path, name) + SUFFIX)

    def read(self, name: str) -> bytearray:
        """Decrypt and authenticate file `name` into one new buffer (wiped if it fails)."""
        buf, size = self.read_into(name, bytearray)
        del buf[size:]
        return buf

    def read_into(self, name: str, allocate: Callable[[int], Any]) -> tuple[Any, int]:
        """Decrypt file `name` straight into a buffer of the caller's: `allocate(n)` returns a
        writable buffer of n bytes (the plaintext size plus 15 bytes of slack GCM needs).

        Returns (buffer, plaintext size). Lets a consumer such as OpenVINO own the only copy of
        the plaintext; the buffer is wiped if any chunk fails to authenticate.
        """
        with _open_file(self, name) as f:
            header, key, lay = self._start(f, name)
            buf = allocate(lay.plain_len + 15)
            view = memoryview(buf).cast("B")
            try:
                fmt.decrypt_chunks(f, header, key, lay, str(self.file_path(name)),
                                   lambda off, n: view[off:off + n + 15])
            except BaseException:
                view[:] = bytes(len(view))
                raise
            finally:
                view.release()
        return buf, lay.plain_len

    def verify(self) -> None:
        """Authenticate every chunk of every file without keeping any plaintext."""
        for name in self.files:
            with _open_file(self, name) as f:
                header, key, lay = self._start(f, name)
                scratch = bytearray(min(header.chunk_size, lay.plain_len) + 15)
                view = memoryview(scratch)
                try:
                    fmt.decrypt_chunks(f, header, key, lay, str(self.file_path(name)),
                                       _scratch(view))
                finally:
                    view[:] = bytes(len(view))

    def _start(self, f: BinaryIO, name: str) -> tuple[fmt.Header, bytes, fmt.Layout]:
        header = self._header(f, name, fmt.manifest_digest(canonical(self.manifest)))
        where = str(self.file_path(name))
        key, _ = fmt.unwrap(header, self.ring, where)
        return header, key, fmt.layout(header, os.fstat(f.fileno()).st_size, where)

    def _header(self, f: BinaryIO, name: str, digest: bytes) -> fmt.Header:
        where = self.file_path(name)
        header = fmt.read_header(f, str(where))
        if header.bundle_id != self.id or header.file_name != name:
            raise BundleError(f"{where}: belongs to {header.bundle_id}:{header.file_name}, "
                              f"not {self.id}:{name} (file swapped in?)")
        if header.manifest_digest != digest:
            raise BundleError(f"{where}: {MANIFEST} does not match the manifest this file "
                              f"was packed with (edited after packing?)")
        fmt.unwrap(header, self.ring, str(where))  # fail at open, not at the first read
        return header


def _load_manifest(path: Path) -> dict[str, Any]:
    where = path / MANIFEST
    try:
        manifest = json.loads(where.read_text("utf-8"))
    except OSError as exc:
        raise BundleError(f"{where}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise BundleError(f"{where}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not a {FORMAT} manifest")
    for key in ("name", "task", "files"):
        if key not in manifest:
            raise BundleError(f"{where}: missing {key!r}")
    if not isinstance(manifest["files"], list):
        raise BundleError(f"{where}: 'files' is not a list")
    for name in manifest["files"]:
        _safe_name(path, name)
    return manifest


def _open_file(bundle: Bundle, name: str) -> BinaryIO:
    where = bundle.file_path(name)
    try:
        return open(where, "rb", buffering=0)
    except FileNotFoundError:
        raise BundleError(f"{where}: listed in {MANIFEST} but missing") from None
    except OSError as exc:
        raise BundleError(f"{where}: cannot open ({exc.strerror})") from None


# A check of a manifest's task settings: raises BundleError naming the bad key. keys/ knows
# nothing of tasks: the operator tool passes the tasks' schema (workers/schema.py).
ManifestCheck = Callable[[dict[str, Any]], None]


def verify_bundle(path: Path, ring: Keyring, check: ManifestCheck | None = None) -> None:
    """Authenticate every chunk of every file of the bundle at `path` (and run `check` on its
    manifest); BundleError if not."""
    bundle = Bundle.open(path, ring)
    if check is not None:
        check(bundle.manifest)
    bundle.verify()


def bundle_dirs(root: Path) -> list[Path]:
    """Every bundle folder under `root`: each version of each model (`keys.layout`), flat
    bundles packed before versions too; hidden temp folders of a pack are skipped."""
    return layout.bundle_dirs(root)


def open_all(root: Path, ring: Keyring) -> tuple[list[Bundle], list[tuple[Path, BundleError]]]:
    """Open every bundle under `root`; errors come back per bundle instead of being raised."""
    opened, failed = [], []
    for path in bundle_dirs(root):
        try:
            opened.append(Bundle.open(path, ring))
        except BundleError as exc:
            failed.append((path, exc))
    return opened, failed


# -- packing ---------------------------------------------------------------------------

Source = Callable[[], BinaryIO]  # opens a plaintext stream for one file


def pack_bundle(src_dir: Path, dst_root: Path, ring: Keyring, name: str | None = None, *,
                chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
                check: ManifestCheck | None = None) -> Path:
    """Encrypt prepared folder `src_dir` into `dst_root/<task>--<name>/<version>`; return
    that path."""
    src_dir = Path(src_dir)
    where = src_dir / MANIFEST
    try:
        manifest = json.loads(where.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: cannot read prepared manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: not a JSON object")
    if name is not None:
        manifest["name"] = name
    files = {rel: _opener(src_dir / rel) for rel in _plain_files(src_dir)}
    return write_bundle(manifest, files, Path(dst_root), ring, chunk_size=chunk_size,
                        check=check)


def _plain_files(src_dir: Path) -> list[str]:
    found = (p for p in src_dir.rglob("*") if p.is_file())
    return sorted(p.relative_to(src_dir).as_posix() for p in found
                  if p.relative_to(src_dir).as_posix() != MANIFEST)


def _opener(path: Path) -> Source:
    return lambda: open(path, "rb")


def write_bundle(manifest: dict[str, Any], files: dict[str, Source], dst_root: Path,
                 ring: Keyring, *, chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
                 check: ManifestCheck | None = None) -> Path:
    """Write a bundle from plaintext streams: into a hidden temp folder, then swapped in
    (`check` refuses a manifest first)."""
    for key in ("name", "task", "version"):
        if key not in manifest:
            raise BundleError(f"{MANIFEST}: prepared manifest lacks {key!r}")
    task, name = str(manifest["task"]), str(manifest["name"])
    version = str(manifest["version"])
    for part in (task, name):
        if not _COMPONENT.match(part):
            raise BundleError(f"{MANIFEST}: {part!r} is not a safe task/bundle name")
    try:
        layout.check_version(version)
    except BundleError as exc:
        raise BundleError(f"{MANIFEST}: version: {exc}") from None
    manifest = {**manifest, "settings": manifest.get("settings", {}), "format": FORMAT,
                "files": sorted(files)}
    if check is not None:
        check(manifest)
    model_dir = dst_root / bundle_id(task, name)
    dst_root.mkdir(parents=True, exist_ok=True)
    layout.unflatten(model_dir)  # a bundle packed before versions moves to <its version>/
    model_dir.mkdir(exist_ok=True)
    _pin_serving(model_dir, version)
    final = model_dir / version
    tmp = model_dir / f".{version}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_files(tmp, manifest, files, ring, chunk_size)
        old = replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(model_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pin_serving(model_dir: Path, version: str) -> None:
    """Installing a new version must not make it serve: without a serving file the highest
    version would, so the one serving now is written down first (`edgectl models activate`
    switches)."""
    if layout.read_serving(model_dir):
        return
    have = layout.version_dirs(model_dir)
    if have and version not in have:
        layout.write_serving(model_dir, [max(have, key=layout.version_key)])


def _write_files(tmp: Path, manifest: dict[str, Any], files: dict[str, Source],
                 ring: Keyring, chunk_size: int) -> None:
    digest = fmt.manifest_digest(canonical(manifest))
    bid, kid = bundle_id(manifest["task"], manifest["name"]), ring.current_id
    dirs = {tmp}
    for rel, opener in sorted(files.items()):
        dst = tmp / (_safe_name(tmp, rel) + SUFFIX)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(dst.parent)
        with opener() as src, open(dst, "wb") as out:
            fmt.write_file(out, src, bundle_id=bid, name=rel, digest=digest, kid=kid,
                           kek=ring.key(kid), chunk_size=chunk_size)
            out.flush()
            os.fsync(out.fileno())
    with open(tmp / MANIFEST, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2, ensure_ascii=False)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    for d in dirs:
        fsync_dir(d)


def plain_source(data: bytes) -> Source:
    """A Source over bytes already in memory (tests, small generated files)."""
    return lambda: io.BytesIO(data)


def _scratch(view: memoryview) -> Callable[[int, int], memoryview]:
    """A `decrypt_chunks` destination that decrypts every chunk into the same scratch view."""
    return lambda offset, length: view[:length + 15]
