"""Build the project's wheel from a copy of the checkout (the checkout stays clean)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("pyproject.toml", "README.md", "edge", "edgectl", "workers", "keys", "systemd",
           "configs")
# Debian 12's own python3 has setuptools 66.1 + wheel 0.38: the oldest build the project supports.
DEBIAN_PYTHON = Path("/usr/bin/python3")


def build_python() -> str:
    """Debian's python3 when it can build (setuptools + wheel), else this interpreter."""
    if DEBIAN_PYTHON.exists() and subprocess.run(
            [DEBIAN_PYTHON, "-c", "import setuptools, wheel, pip"], capture_output=True,
    ).returncode == 0:
        return str(DEBIAN_PYTHON)
    return sys.executable


def setuptools_version(python: str) -> str:
    return subprocess.run([python, "-c", "import setuptools; print(setuptools.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def copy_checkout(workdir: Path) -> Path:
    """What a build reads from the checkout, copied to workdir/src (symlinks kept)."""
    src = workdir / "src"
    src.mkdir(parents=True)
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            # symlinks=True: edgectl/data/* stay links into the copy, as in the checkout
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    return src


def build_wheel(workdir: Path, python: str | None = None) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the checkout; the wheel's path."""
    src = copy_checkout(workdir)
    out = workdir / "dist"
    subprocess.run([python or build_python(), "-m", "pip", "wheel", "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def build_sdist(workdir: Path, python: str | None = None) -> Path:
    """The sdist of a copy of the checkout, through setuptools' PEP 517 backend."""
    src = copy_checkout(workdir)
    out = workdir / "sdist"
    subprocess.run([python or build_python(), "-c", "import sys; from setuptools import "
                    "build_meta as b; b.build_sdist(sys.argv[1])", str(out)], cwd=src,
                   check=True, capture_output=True, text=True)
    (sdist,) = out.glob("*.tar.gz")
    return sdist
