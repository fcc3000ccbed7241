"""Versions side by side on disk: where packing puts them, which one serves, flat bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keys import Bundle, BundleError, open_all, pack_bundle
from keys import layout
from keys.bundle import bundle_dirs
from tests.keys.conftest import make_prepared


def _prepared(tmp_path: Path, version: str, name: str = "tiny") -> Path:
    src = make_prepared(tmp_path / f"src-{version}", {"m.xml": b"<net/>", "m.bin": os.urandom(64)},
                        name=name)
    manifest = json.loads((src / "bundle.json").read_text())
    manifest["version"] = version
    (src / "bundle.json").write_text(json.dumps(manifest))
    return src


def test_versions_compare_number_by_number():
    assert sorted(["10", "9", "2.1", "2", "1.10", "1.9"], key=layout.version_key) == [
        "1.9", "1.10", "2", "2.1", "9", "10"]


def test_packing_a_new_version_puts_it_beside_and_does_not_activate_it(tmp_path, ring):
    root = tmp_path / "bundles"
    v1 = pack_bundle(_prepared(tmp_path, "1"), root, ring)
    assert v1 == root / "asr--tiny" / "1"
    (model,) = layout.installed(root)
    assert (model.serving, model.history) == ("1", ())  # no file: the highest (only) serves
    v2 = pack_bundle(_prepared(tmp_path, "2"), root, ring)
    assert v2 == root / "asr--tiny" / "2"
    (model,) = layout.installed(root)
    assert list(model.versions) == ["1", "2"]
    assert (model.serving, model.previous) == ("1", None)
    assert layout.read_serving(model.path) == ["1"]
    assert sorted(b.version for b in open_all(root, ring)[0]) == ["1", "2"]


def test_serving_file_decides_and_falls_back_to_the_highest_installed(tmp_path, ring):
    root = tmp_path / "bundles"
    for v in ("1", "2", "10"):
        pack_bundle(_prepared(tmp_path, v), root, ring)
    model_dir = root / "asr--tiny"
    (model_dir / layout.SERVING).unlink()
    assert layout.find(root, "asr", "tiny").serving == "10"
    layout.write_serving(model_dir, ["2", "1"])
    model = layout.find(root, "asr", "tiny")
    assert (model.serving, model.previous) == ("2", "1")
    layout.remove_version(model_dir, "1")
    assert layout.find(root, "asr", "tiny").previous is None
    layout.write_serving(model_dir, ["7"])  # names a version no longer installed
    assert layout.find(root, "asr", "tiny").serving == "10"


def test_a_flat_bundle_still_loads_and_moves_under_its_version_when_another_arrives(
        tmp_path, ring):
    root = tmp_path / "bundles"
    v1 = pack_bundle(_prepared(tmp_path, "1"), root, ring)
    flat = root / "asr--tiny"
    # the layout before versions: the bundle's files right in <task>--<name>/
    for p in list(v1.iterdir()):
        p.rename(flat / p.name)
    v1.rmdir()
    assert not (flat / layout.SERVING).exists()
    assert bundle_dirs(root) == [flat]
    (model,) = layout.installed(root)
    assert (model.flat, model.serving) == (True, "1")
    assert Bundle.open(flat, ring).version == "1"
    pack_bundle(_prepared(tmp_path, "2"), root, ring)
    (model,) = layout.installed(root)
    assert (model.flat, list(model.versions), model.serving) == (False, ["1", "2"], "1")
    assert Bundle.open(flat / "1", ring).read("m.xml") == b"<net/>"


def test_unsafe_version_is_refused(tmp_path, ring):
    with pytest.raises(BundleError, match="version"):
        pack_bundle(_prepared(tmp_path, "../x"), tmp_path / "bundles", ring)
