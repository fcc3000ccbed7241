"""`edgectl install-units`: copy the systemd units into place; start nothing.

The units (`systemd/` in a checkout, `edgectl/data/systemd/` inside the wheel: one folder, read
through importlib.resources) name the console scripts as `/opt/edge/bin/...`; the installer rewrites
that prefix to where this installation's scripts are (the venv's `bin/`), so the same files
serve a packaged install and a checkout. `--root` installs under another tree (a package
build's DESTDIR, or a test's temporary folder).

`--instance GPU:2` also gives a further worker of a device the device's drop-ins: systemd reads
`edge-worker@GPU.service.d/` for `edge-worker@GPU` only, so `edge-worker@GPU:2.service.d/` gets a
link to each of its files (a linked .conf is read; a linked folder is not: systemd 252).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from edge.config import WorkerInstance


def data_dir(name: str) -> Path:
    """A folder shipped inside the package: `systemd` or `configs` (wheel and checkout alike)."""
    # edgectl/data/<name> is a symlink to the checkout's top-level folder and a real folder in
    # an installed wheel; wheels install unzipped, so the Traversable is a filesystem path.
    return Path(str(resources.files("edgectl") / "data" / name))


UNITS_DIR = data_dir("systemd")
PLACEHOLDER_BIN = "/opt/edge/bin/"
SYSTEMD_DIR = Path("etc/systemd/system")
SYSUSERS = (Path("edge.sysusers.conf"), Path("etc/sysusers.d/edge.conf"))


def unit_files(src: Path = UNITS_DIR) -> list[Path]:
    """Every unit and drop-in under `src`, relative to it."""
    return sorted(p.relative_to(src) for p in src.rglob("*")
                  if p.is_file() and p.suffix in (".service", ".target", ".timer", ".conf")
                  and p.name != SYSUSERS[0].name)


def install(root: Path = Path("/"), bindir: Path | None = None, src: Path = UNITS_DIR,
            instances: Sequence[str] = ()) -> list[Path]:
    """Write the units under `root`, and the drop-in links of each worker instance in
    `instances` (`GPU:2`); return the files written (nothing is enabled or started)."""
    bindir = bindir or Path(sys.executable).parent
    prefix = str(bindir).rstrip("/") + "/"
    written = []
    for rel in unit_files(src):
        dest = root / SYSTEMD_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = (src / rel).read_text().replace(PLACEHOLDER_BIN, prefix)
        dest.write_text(text)
        dest.chmod(0o644)  # units are world-readable config, never secrets
        written.append(dest)
    sysusers = root / SYSUSERS[1]
    sysusers.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / SYSUSERS[0], sysusers)
    written.append(sysusers)
    for spec in instances:
        written += link_drop_ins(root / SYSTEMD_DIR, WorkerInstance.parse(spec))
    return written


def link_drop_ins(unit_dir: Path, instance: WorkerInstance) -> list[Path]:
    """Link every drop-in of `edge-worker@DEVICE` into `edge-worker@DEVICE:N.service.d/`;
    nothing for instance 1 or a device without drop-ins. Returns the links made."""
    device_dir = unit_dir / f"edge-worker@{instance.device}.service.d"
    if instance.number == 1 or not device_dir.is_dir():
        return []
    own = unit_dir / f"edge-worker@{instance.label}.service.d"
    own.mkdir(exist_ok=True)
    links = []
    for conf in sorted(device_dir.glob("*.conf")):
        link = own / conf.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / device_dir.name / conf.name)
        links.append(link)
    return links


def main(root: str, bindir: str | None, instances: Sequence[str] = ()) -> int:
    """CLI body: install, then say what to run next (the operator enables what they have)."""
    try:
        written = install(Path(root), Path(bindir) if bindir else None, instances=instances)
    except ValueError as exc:
        print(f"edgectl install-units: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"installed {path}")
    if Path(root) == Path("/"):
        workers = " ".join(f"edge-worker@{i}" for i in ["CPU", *instances])
        print("next: systemd-sysusers; systemctl daemon-reload; "
              f"systemctl enable --now edge.target edge-agent {workers} "
              "edge-key-rotation.timer")
    return 0
