"""Rotation rewraps data keys in place; old keys can then be retired; crashes lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keys import (Bundle, BundleError, Keyring, bundles_needing, pack_bundle, rewrap_bundle,
                  verify_bundle)
from keys import _format as fmt
from keys.bundle import bundle_dirs
from keys.rotation import _write_slot, file_key_ids, rotate_keyring
from tests.keys.conftest import CHUNK, make_prepared

ROOT = Path(__file__).resolve().parents[2]


def test_rewrap_then_retire_old_key_everything_still_opens(packed: Path, ring: Keyring,
                                                           files: dict) -> None:
    before = {p: p.read_bytes() for p in packed.rglob("*.enc")}
    old = ring.current_id
    new = ring.rotate()
    assert bundles_needing(packed.parent.parent, old) == [packed]
    assert rewrap_bundle(packed, ring) == len(files)
    assert bundles_needing(packed.parent.parent, old) == []
    ring.retire(old)
    bundle = Bundle.open(packed, ring)
    assert all(bundle.read(name) == data for name, data in files.items())
    for path, raw in before.items():
        assert file_key_ids(path) == {new}
        after = path.read_bytes()
        with open(path, "rb") as f:
            header = fmt.read_header(f, str(path))
        # Only the key slots changed: immutable header and chunks are byte-identical.
        assert after[:header.slot_offset] == raw[:header.slot_offset]
        assert after[header.size:] == raw[header.size:]


def test_rewrap_is_idempotent(packed: Path, ring: Keyring) -> None:
    ring.rotate()
    assert rewrap_bundle(packed, ring) > 0
    assert rewrap_bundle(packed, ring) == 0


def test_rewrap_under_a_ring_missing_the_old_key_is_refused(packed: Path) -> None:
    with pytest.raises(BundleError, match="keyring does not have"):
        rewrap_bundle(packed, Keyring.generate())


def test_half_rotated_file_opens_with_either_key(packed: Path, ring: Keyring, files: dict) -> None:
    # A crash between "write new slot" and "clear old slot" leaves both slots live.
    old = ring.current_id
    ring.rotate()
    path = packed / "model.bin.enc"
    with open(path, "r+b") as f:
        header = fmt.read_header(f, str(path))
        key, used = fmt.unwrap(header, ring, str(path))
        slot = fmt.wrap(ring.key(ring.current_id), ring.current_id, header.immutable, key)
        _write_slot(f, header, 1 - used, slot.pack())
    assert file_key_ids(path) == {old, ring.current_id}
    assert bundles_needing(packed.parent.parent, old) == [packed]  # conservative until finished
    only_new = Keyring({ring.current_id: ring.key(ring.current_id)}, ring.current_id)
    only_old = Keyring({old: ring.key(old)}, old)
    assert Bundle(packed, Bundle.open(packed, ring).manifest, only_new).read("model.bin") \
        == files["model.bin"]
    assert Bundle(packed, Bundle.open(packed, ring).manifest, only_old).read("model.bin") \
        == files["model.bin"]
    rewrap_bundle(packed, ring)
    assert file_key_ids(path) == {ring.current_id}


def test_torn_new_slot_falls_back_to_the_old_one(packed: Path, ring: Keyring, files: dict) -> None:
    ring.rotate()
    path = packed / "model.bin.enc"
    with open(path, "r+b") as f:
        header = fmt.read_header(f, str(path))
        torn = fmt.Slot(ring.current_id, bytes(12), bytes(48)).pack()  # garbage wrap
        _write_slot(f, header, 1, torn)
    assert Bundle.open(packed, ring).read("model.bin") == files["model.bin"]
    assert rewrap_bundle(packed, ring) > 0
    verify_bundle(packed, Keyring({ring.current_id: ring.key(ring.current_id)}, ring.current_id))


_ROTATE_FOREVER = """
import sys
from pathlib import Path
from keys.rotation import rotate_keyring
print("ready", flush=True)
while True:
    rotate_keyring(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.slow
def test_killed_rotation_leaves_every_bundle_readable(tmp_path: Path) -> None:
    ring = Keyring.generate()
    ring_path, root = tmp_path / "ring.json", tmp_path / "bundles"
    ring.save(ring_path)
    many = {f"f{i:03}.bin": os.urandom(CHUNK * 2 + i) for i in range(60)}
    for name in ("a", "b", "c"):
        pack_bundle(make_prepared(tmp_path, many, name=name), root, ring, chunk_size=CHUNK)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mid_rotation = 0
    for delay in (0.0, 0.02, 0.05, 0.08, 0.13, 0.21, 0.34, 0.55):
        proc = subprocess.Popen([sys.executable, "-c", _ROTATE_FOREVER, str(ring_path),
                                 str(root)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        on_disk = Keyring.load_file(ring_path)
        for bundle in bundle_dirs(root):  # every version of every model
            verify_bundle(bundle, on_disk)
        kids = set().union(*(file_key_ids(p) for p in root.rglob("*.enc")))
        mid_rotation += len(kids) > 1
    # Most of the loop's time is rewrapping 180 files, so most kills land in the middle.
    assert mid_rotation >= 1, "no kill landed mid-rotation: the test proved nothing"
    # A clean rotation afterwards finishes whatever was interrupted; old keys then retire.
    kid, _ = rotate_keyring(ring_path, root)
    on_disk = Keyring.load_file(ring_path)
    assert len(on_disk.ids()) > 2, "the kills should have landed after some rotations"
    for old in on_disk.ids():
        if old != kid:
            assert bundles_needing(root, old) == []
            on_disk.retire(old)
    for bundle in bundle_dirs(root):  # every version of every model
        verify_bundle(bundle, on_disk)
