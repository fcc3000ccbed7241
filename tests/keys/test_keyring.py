"""The keyring: file permissions, source order, rotate/retire, nothing secret in reprs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keys import Keyring, KeyringError


def test_saved_ring_is_private_and_loads_back(tmp_path: Path) -> None:
    ring = Keyring.generate()
    path = tmp_path / "ring.json"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keyring.load_file(path)
    assert loaded.current_id == ring.current_id
    assert loaded.key(ring.current_id) == ring.key(ring.current_id)
    doc = json.loads(path.read_text())
    assert set(doc) == {"current", "keys"}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ring.json"
    Keyring.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyringError, match=f"run `chmod 600 {path}`"):
        Keyring.load_file(path)


def test_key_ids_look_like_dated_ids() -> None:
    ring = Keyring.generate()
    kid = ring.current_id
    assert kid.startswith("k") and len(kid) == 16 and kid[9] == "-"


def test_rotate_adds_a_current_key_and_retire_drops_the_old() -> None:
    ring = Keyring.generate()
    old = ring.current_id
    new = ring.rotate()
    assert ring.current_id == new != old and ring.ids() == sorted([old, new])
    ring.retire(old)
    assert ring.ids() == [new]
    with pytest.raises(KeyringError, match="no key"):
        ring.key(old)


def test_current_key_cannot_be_retired() -> None:
    ring = Keyring.generate()
    with pytest.raises(KeyringError, match="current key"):
        ring.retire(ring.current_id)


def test_repr_shows_no_key_material() -> None:
    ring = Keyring.generate()
    text = repr(ring)
    assert ring.current_id in text
    assert ring.key(ring.current_id).hex() not in text
    assert json.loads(ring.to_json())["keys"][ring.current_id] not in text


@pytest.mark.parametrize("text,match", [
    ("not json", "not a keyring"),
    ('{"current": "k1", "keys": {}}', "not in the ring"),
    ('{"current": "k1", "keys": {"k1": "c2hvcnQ="}}', "not 32 bytes"),
    ('{"current": "k1", "keys": {"k1": "!!!"}}', "not a keyring"),
])
def test_malformed_ring_is_refused(text: str, match: str) -> None:
    with pytest.raises(KeyringError, match=match):
        Keyring.from_env_value(text)


def _ring_file(path: Path) -> Keyring:
    ring = Keyring.generate()
    ring.save(path)
    return ring


def test_sources_that_disagree_are_refused_naming_both(tmp_path: Path) -> None:
    # A stale credential must not beat a freshly installed key file (nor the other way round).
    creds = tmp_path / "creds"
    creds.mkdir()
    cred = _ring_file(creds / "edge-keyring")
    file = _ring_file(tmp_path / "ring.json")
    pick = Keyring.from_sources
    with pytest.raises(KeyringError, match=rf"disagree: credential .*{cred.current_id}.* vs "
                                           rf"key file .*{file.current_id}"):
        pick(creds, tmp_path / "ring.json", None)
    env = Keyring.generate().to_json()
    with pytest.raises(KeyringError, match="disagree"):
        pick(None, tmp_path / "ring.json", env)


def test_each_source_alone_and_agreeing_sources_load(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    ring = _ring_file(tmp_path / "ring.json")
    env = Keyring.generate().to_json()
    pick = Keyring.from_sources
    assert pick(tmp_path / "none", tmp_path / "ring.json", None).current_id == ring.current_id
    assert pick(None, tmp_path / "missing.json", env).current_id == json.loads(env)["current"]
    (creds / "edge-keyring").write_text(ring.to_json())
    assert pick(creds, tmp_path / "ring.json", ring.to_json()).current_id == ring.current_id


def test_credential_name_is_configurable(tmp_path: Path) -> None:
    cred = _ring_file(tmp_path / "other-name")
    ring = Keyring.from_sources(tmp_path, None, None, credential_name="other-name")
    assert ring.current_id == cred.current_id


def test_no_source_names_everything_tried(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="no keyring found.*credential.*key file.*environment"):
        Keyring.from_sources(tmp_path, tmp_path / "ring.json", None)


def test_unsafe_file_source_is_refused_not_skipped(tmp_path: Path) -> None:
    _ring_file(tmp_path / "ring.json")
    os.chmod(tmp_path / "ring.json", 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        Keyring.from_sources(None, tmp_path / "ring.json", Keyring.generate().to_json())


def test_sealed_ring_opens_only_for_its_recipient() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    gateway, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    fleet = Ed25519PrivateKey.generate()
    pinned = (fleet.public_key(),)
    ring = Keyring.generate()
    ring.rotate()
    blob = ring.seal_for(gateway.public_key(), fleet)
    assert ring.key(ring.current_id) not in blob
    opened, info = Keyring.open_sealed(blob, gateway, pinned)
    assert opened.ids() == ring.ids() and opened.current_id == ring.current_id
    assert all(opened.key(k) == ring.key(k) for k in ring.ids())
    assert info.verified
    with pytest.raises(KeyringError, match="another gateway"):
        Keyring.open_sealed(blob, other, pinned)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KeyringError, match="altered"):
        Keyring.open_sealed(flipped, gateway, pinned)
    with pytest.raises(KeyringError, match="bad magic"):
        Keyring.open_sealed(b"nope", gateway, pinned)
