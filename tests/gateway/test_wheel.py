"""The wheel carries the units and configs as package data, builds with Debian 12's setuptools,
and `edgectl install-units` / `init-gateway` work from it outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests.gateway.wheel import ROOT, build_python, build_sdist, build_wheel, setuptools_version

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_builds_with_the_oldest_setuptools_we_claim(wheel):
    python = build_python()
    major = int(setuptools_version(python).split(".")[0])
    print(f"built with {python}, setuptools {setuptools_version(python)}")
    assert major >= 66
    assert wheel.name.startswith("edge_inference_daemon-")


def test_wheel_ships_every_unit_and_config_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for folder in ("systemd", "configs"):
            files = [p for p in (ROOT / folder).rglob("*") if p.is_file()]
            assert files
            for path in files:
                inside = f"edgectl/data/{folder}/{path.relative_to(ROOT / folder).as_posix()}"
                assert inside in names, inside
                assert z.read(inside) == path.read_bytes(), inside


def test_install_units_and_init_gateway_run_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    # cwd outside the checkout and the wheel first on the path: nothing comes from the tree
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import edgectl; print(edgectl.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(site))
    for command in (["install-units", "--root", str(tmp_path / "a")],
                    ["init-gateway", "--root", str(tmp_path / "b"), "--node", "gw-w"]):
        run = subprocess.run([sys.executable, "-m", "edgectl.cli", *command], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "a/etc/sysusers.d/edge.conf").exists()
    assert (tmp_path / "b/etc/mosquitto/conf.d/edge.conf").read_text() == (
        ROOT / "configs/mosquitto.conf").read_text()
    assert "user edge-agent-gw-w" in (tmp_path / "b/etc/mosquitto/edge/acl").read_text()


def test_sdist_carries_the_same_files_as_real_files(tmp_path):
    with tarfile.open(build_sdist(tmp_path)) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for folder in ("systemd", "configs"):
            for path in (p for p in (ROOT / folder).rglob("*") if p.is_file()):
                inside = f"edgectl/data/{folder}/{path.relative_to(ROOT / folder).as_posix()}"
                assert inside in members and members[inside].isfile(), inside
                extracted = tar.extractfile(members[inside])
                assert extracted is not None and extracted.read() == path.read_bytes(), inside
