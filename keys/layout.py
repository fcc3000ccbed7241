"""Where bundles live: several versions of one model side by side, and which one serves.

    <bundle_dir>/<task>--<name>/<version>/bundle.json   one version of a model (what packing writes)
    <bundle_dir>/<task>--<name>/serving                 the serving version, then the versions that
                                                         served before it (newest first, one a line)
    <bundle_dir>/<task>--<name>/bundle.json             a flat bundle (the layout before versions):
                                                         its only version, which serves

Without a `serving` file the highest version serves (versions compare number by number:
"10" > "9" > "2.1" > "2"). The file is replaced atomically (temp file, fsync, rename), so a
reader sees the old content or the new, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from keys._fs import fsync_dir, replace_dir
from keys.errors import BundleError

MANIFEST = "bundle.json"
SERVING = "serving"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # "+": semver build metadata


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key under which "10" > "9" and "1.10" > "1.9" (numbers compare as numbers)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._+-]", version))


def check_version(version: str) -> str:
    """`version` when it is a safe folder name, else BundleError."""
    if not _VERSION.match(version) or version == SERVING:
        raise BundleError(f"{version!r} is not a valid model version (letters, digits, . _ + -)")
    return version


@dataclass(frozen=True, slots=True)
class Installed:
    """One model name of one task: its versions on disk and which one serves."""

    task: str
    name: str
    path: Path  # <bundle_dir>/<task>--<name>
    versions: dict[str, Path]  # version -> its bundle folder, lowest version first
    history: tuple[str, ...]  # the serving file: serving first, then the ones before it
    flat: bool  # a bundle packed before versions (bundle.json right in `path`)
    installed_ns: int  # when its oldest version was packed (orders the task's default model)

    @property
    def serving(self) -> str | None:
        """The serving version: the newest entry of the serving file still installed, else
        the highest version."""
        for version in self.history:
            if version in self.versions:
                return version
        return max(self.versions, key=version_key) if self.versions else None

    @property
    def previous(self) -> str | None:
        """The version a roll-back returns to (the one that served before), if installed."""
        serving = self.serving
        for version in self.history:
            if version != serving and version in self.versions:
                return version
        return None


def model_dirs(root: Path) -> list[Path]:
    """The `<task>--<name>` folders under `root` (hidden temp folders of a pack skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and "--" in p.name)


def version_dirs(model_dir: Path) -> dict[str, Path]:
    """version -> bundle folder of one model (a flat bundle: its manifest's version)."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        return {_manifest_version(model_dir): model_dir}
    found = {p.name: p for p in model_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()}
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def _manifest_version(folder: Path) -> str:
    try:
        return str(json.loads((folder / MANIFEST).read_text("utf-8")).get("version", ""))
    except (OSError, ValueError, AttributeError):
        return ""  # an unreadable manifest is reported when the bundle is opened


def bundle_dirs(root: Path) -> list[Path]:
    """Every bundle folder under `root`: every version of every model, flat bundles too."""
    return [p for d in model_dirs(root) for p in version_dirs(d).values()]


def installed(root: Path) -> list[Installed]:
    """Every model under `root`, in the order they were first installed (oldest first)."""
    out = []
    for d in model_dirs(root):
        task, _, name = d.name.partition("--")
        versions = version_dirs(d)
        if not versions:
            continue
        flat = (d / MANIFEST).is_file()
        stamp = min((p / MANIFEST).stat().st_mtime_ns for p in versions.values())
        out.append(Installed(task, name, d, versions, tuple(read_serving(d)), flat, stamp))
    return sorted(out, key=lambda m: (m.installed_ns, m.path.name))


def find(root: Path, task: str, name: str) -> Installed | None:
    """The installed model `task--name`, if any."""
    return next((m for m in installed(root) if m.task == task and m.name == name), None)


def read_serving(model_dir: Path) -> list[str]:
    """The serving file's versions, newest first ([] when there is none)."""
    try:
        text = (Path(model_dir) / SERVING).read_text("utf-8")
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_serving(model_dir: Path, history: list[str]) -> None:
    """Replace the serving file atomically: `history[0]` serves, the rest are for roll-back."""
    model_dir = Path(model_dir)
    unique = list(dict.fromkeys(check_version(v) for v in history))
    tmp = model_dir / f".{SERVING}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("".join(f"{v}\n" for v in unique))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, model_dir / SERVING)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(model_dir)


def unflatten(model_dir: Path) -> None:
    """Move a flat bundle into `<model_dir>/<its version>/` in one atomic directory swap (the
    files are hard-linked, not copied), pinning that version as the serving one."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        return
    version = check_version(_manifest_version(model_dir) or "0")
    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        shutil.copytree(model_dir, tmp / version, copy_function=os.link)
        (tmp / SERVING).write_text(f"{version}\n", encoding="utf-8")
        old = replace_dir(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(model_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_version(model_dir: Path, version: str) -> None:
    """Delete one version's folder (renamed aside first, so no reader sees half of it)."""
    folder = Path(model_dir) / check_version(version)
    if not (folder / MANIFEST).is_file():
        raise BundleError(f"{folder}: no such version")
    aside = folder.with_name(f".{version}.removed-{secrets.token_hex(4)}")
    os.rename(folder, aside)
    fsync_dir(Path(model_dir))
    shutil.rmtree(aside, ignore_errors=True)
