"""Round trips of the bundle format: what goes in comes out, nothing plaintext on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keys import Bundle, BundleError, Keyring, open_all, pack_bundle, verify_bundle
from tests.keys.conftest import make_prepared


def test_every_file_reads_back_identical(packed: Path, ring: Keyring, files: dict) -> None:
    bundle = Bundle.open(packed, ring)
    assert sorted(bundle.files) == sorted(files)
    for name, data in files.items():
        out = bundle.read(name)
        assert isinstance(out, bytearray)
        assert out == data


def test_default_chunk_size_round_trip(tmp_path: Path, ring: Keyring) -> None:
    data = os.urandom((1 << 20) * 2 + 3)
    src = make_prepared(tmp_path, {"w.bin": data})
    bundle = Bundle.open(pack_bundle(src, tmp_path / "out", ring), ring)
    assert bundle.read("w.bin") == data


def test_manifest_keeps_prepared_fields_and_lists_files(packed: Path, ring: Keyring) -> None:
    bundle = Bundle.open(packed, ring)
    assert (bundle.name, bundle.task, bundle.version) == ("tiny", "asr", "1")
    assert bundle.manifest["settings"] == {"beam": 1}
    assert bundle.manifest["format"] == "edge-bundle/1"
    assert (packed.parent.name, packed.name) == ("asr--tiny", "1")  # <task>--<name>/<version>
    assert bundle.path == packed


def test_no_plaintext_is_written(packed: Path, files: dict) -> None:
    on_disk = [p for p in packed.rglob("*") if p.is_file() and p.name != "bundle.json"]
    assert on_disk and all(p.name.endswith(".enc") for p in on_disk)
    blob = b"".join(p.read_bytes() for p in on_disk)
    for data in files.values():
        if len(data) >= 8:
            assert data[:32] not in blob


def test_same_name_in_two_tasks_gives_two_bundles(tmp_path: Path, ring: Keyring) -> None:
    a = make_prepared(tmp_path, {"m.xml": b"<a/>"}, name="whisper-tiny.en", task="asr")
    b = make_prepared(tmp_path, {"m.xml": b"<b/>"}, name="whisper-tiny.en", task="tokenize")
    pa, pb = (pack_bundle(s, tmp_path / "out", ring) for s in (a, b))
    assert pa != pb
    assert Bundle.open(pb, ring).read("m.xml") == b"<b/>"


def test_name_argument_overrides_manifest_name(tmp_path: Path, ring: Keyring) -> None:
    src = make_prepared(tmp_path, {"m.xml": b"<a/>"})
    path = pack_bundle(src, tmp_path / "out", ring, name="renamed")
    assert path.parent.name == "asr--renamed" and Bundle.open(path, ring).name == "renamed"


def test_repack_replaces_existing_bundle(tmp_path: Path, ring: Keyring) -> None:
    src = make_prepared(tmp_path, {"m.xml": b"<old/>"})
    first = pack_bundle(src, tmp_path / "out", ring)
    (src / "m.xml").write_bytes(b"<new/>")
    second = pack_bundle(src, tmp_path / "out", ring)
    assert first == second
    assert Bundle.open(second, ring).read("m.xml") == b"<new/>"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["asr--tiny"]
    assert [p.name for p in (tmp_path / "out" / "asr--tiny").iterdir()] == ["1"]


def test_unsafe_bundle_name_is_refused(tmp_path: Path, ring: Keyring) -> None:
    src = make_prepared(tmp_path, {"m.xml": b"<a/>"})
    with pytest.raises(BundleError, match="safe"):
        pack_bundle(src, tmp_path / "out", ring, name="../escape")


def test_verify_accepts_a_good_bundle(packed: Path, ring: Keyring) -> None:
    verify_bundle(packed, ring)


def test_open_all_reports_bad_bundles_without_raising(packed: Path, ring: Keyring,
                                                      tmp_path: Path) -> None:
    src = make_prepared(tmp_path, {"m.xml": b"<a/>"}, name="other")
    other = pack_bundle(src, packed.parent.parent, ring)
    (other / "m.xml.enc").unlink()
    good, bad = open_all(packed.parent.parent, ring)
    assert [b.path for b in good] == [packed]
    assert [p for p, _ in bad] == [other] and "missing" in str(bad[0][1])


def test_listed_path_escaping_the_bundle_is_refused(packed: Path, ring: Keyring) -> None:
    manifest = json.loads((packed / "bundle.json").read_text())
    manifest["files"].append("../../etc/passwd")
    (packed / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unsafe file name"):
        Bundle.open(packed, ring)
