"""Signed sealed rings: a gateway installs only a ring its pinned fleet signer vouched for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keys import Keyring, KeyringError, sealed
from keys.signer import (
    fingerprint,
    load_pinned,
    load_signing_key,
    public_pem,
    raw,
    write_signer,
)

SIGNER_AT = len(sealed.MAGIC) + 8 + 32  # magic, created, recipient, then the signer's key
HEADER = SIGNER_AT + 32 + 32 + 12  # signer, ephemeral key, nonce


@pytest.fixture
def fleet() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def gateway() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@pytest.fixture
def ring() -> Keyring:
    ring = Keyring.generate()
    ring.rotate()
    return ring


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


def test_ring_signed_by_the_pinned_key_opens_and_says_who_signed(fleet, gateway, ring) -> None:
    blob = ring.seal_for(gateway.public_key(), fleet)
    opened, info = Keyring.open_sealed(blob, gateway, (fleet.public_key(),))
    assert opened.to_json() == ring.to_json()
    assert info.verified and info.format == 2
    assert info.signer == fingerprint(fleet.public_key())
    assert fingerprint(fleet.public_key()) in info.describe()
    assert "verified against the pinned signer" in info.describe()


def test_no_pinned_signer_is_refused_with_how_to_pin_one(fleet, gateway, ring) -> None:
    blob = ring.seal_for(gateway.public_key(), fleet)
    with pytest.raises(KeyringError, match=r"no fleet signer is pinned.*\[keyring\].*"
                                           r"--allow-unsigned"):
        Keyring.open_sealed(blob, gateway)


def test_unsigned_ring_is_refused_while_a_signer_is_pinned(fleet, gateway, ring) -> None:
    blob = sealed.seal_unsigned(ring.to_json().encode(), gateway.public_key())
    with pytest.raises(KeyringError, match=r"unsigned \(format 1\).*--sign-key"):
        Keyring.open_sealed(blob, gateway, (fleet.public_key(),))


def test_unsigned_ring_opens_only_through_allow_unsigned_and_says_so(fleet, gateway,
                                                                     ring) -> None:
    blob = sealed.seal_unsigned(ring.to_json().encode(), gateway.public_key())
    opened, info = Keyring.open_sealed(blob, gateway, (fleet.public_key(),), allow_unsigned=True)
    assert opened.to_json() == ring.to_json()
    assert not info.verified and "UNSIGNED" in info.describe()


def test_signed_ring_without_a_pin_opens_through_allow_unsigned_unverified(fleet, gateway,
                                                                           ring) -> None:
    blob = ring.seal_for(gateway.public_key(), fleet)
    opened, info = Keyring.open_sealed(blob, gateway, allow_unsigned=True)
    assert opened.to_json() == ring.to_json()
    assert not info.verified and "NOT verified" in info.describe()


def test_ring_signed_by_another_key_is_refused_even_with_allow_unsigned(fleet, gateway,
                                                                       ring) -> None:
    attacker = Ed25519PrivateKey.generate()
    blob = Keyring.generate().seal_for(gateway.public_key(), attacker)
    for allow in (False, True):
        with pytest.raises(KeyringError, match=f"signed by {fingerprint(attacker.public_key())}"
                                               f", which this gateway does not pin"):
            Keyring.open_sealed(blob, gateway, (fleet.public_key(),), allow_unsigned=allow)


def test_fleet_ring_re_signed_by_an_attacker_is_refused(fleet, gateway, ring) -> None:
    attacker = Ed25519PrivateKey.generate()
    blob = ring.seal_for(gateway.public_key(), fleet)
    body = blob[:SIGNER_AT] + raw(attacker.public_key()) + blob[SIGNER_AT + 32:-64]
    forged = body + attacker.sign(b"edge-keyring-seal/2 signature\0" + body)
    with pytest.raises(KeyringError, match="does not pin"):
        Keyring.open_sealed(forged, gateway, (fleet.public_key(),))


def test_one_flipped_byte_anywhere_is_refused(fleet, gateway, ring) -> None:
    # Even through the development escape hatch: a changed byte is never "just unsigned".
    blob = ring.seal_for(gateway.public_key(), fleet)
    pinned = (fleet.public_key(),)
    for at in range(len(blob)):
        expected = "bad magic" if at < len(sealed.MAGIC) else \
            "does not pin" if SIGNER_AT <= at < SIGNER_AT + 32 else "does not verify"
        with pytest.raises(KeyringError, match=expected):
            Keyring.open_sealed(_flip(blob, at), gateway, pinned, allow_unsigned=True)


def test_refusals_happen_before_any_decryption(fleet, gateway, ring, monkeypatch) -> None:
    blob = ring.seal_for(gateway.public_key(), fleet)
    attacker = Ed25519PrivateKey.generate()
    other_gateway = X25519PrivateKey.generate()

    def no_decryption(*args):
        raise AssertionError("a refused ring reached key agreement / decryption")
    monkeypatch.setattr(sealed, "_exchange", no_decryption)
    bad = [_flip(blob, HEADER + 3), _flip(blob, len(blob) - 1), _flip(blob, 12),
           Keyring.generate().seal_for(gateway.public_key(), attacker)]
    for forged in bad:
        with pytest.raises(KeyringError):
            Keyring.open_sealed(forged, gateway, (fleet.public_key(),))
    with pytest.raises(KeyringError, match="another gateway"):
        Keyring.open_sealed(blob, other_gateway, (fleet.public_key(),))


def test_ring_for_another_gateway_is_refused_naming_both(fleet, gateway, ring) -> None:
    other = X25519PrivateKey.generate()
    blob = ring.seal_for(gateway.public_key(), fleet)
    with pytest.raises(KeyringError) as caught:
        Keyring.open_sealed(blob, other, (fleet.public_key(),))
    msg = str(caught.value)
    assert "sealed for another gateway" in msg
    assert sealed.identity_fingerprint(gateway.public_key()) in msg
    assert sealed.identity_fingerprint(other.public_key()) in msg


def test_recipient_swapped_in_the_header_breaks_the_signature(fleet, gateway, ring) -> None:
    # A ring signed for gateway A, its recipient field rewritten to gateway B's public key:
    # B must not even try it (and A's key is what the AEAD was made for anyway).
    b = X25519PrivateKey.generate()
    blob = ring.seal_for(gateway.public_key(), fleet)
    at = len(sealed.MAGIC) + 8
    swapped = blob[:at] + b.public_key().public_bytes_raw() + blob[at + 32:]
    with pytest.raises(KeyringError, match="does not verify"):
        Keyring.open_sealed(swapped, b, (fleet.public_key(),))


def test_two_pinned_signers_accept_either_during_a_change_over(gateway, ring,
                                                               tmp_path: Path) -> None:
    old_pub = write_signer(tmp_path / "old.key")
    new_pub = write_signer(tmp_path / "new.key")
    pin = tmp_path / "fleet-signer.pub"
    pin.write_bytes(b"# old, retire after 2027-01\n" + old_pub.read_bytes() + b"# new\n" +
                    new_pub.read_bytes())
    pinned = load_pinned(pin)
    assert len(pinned) == 2
    for key in ("old.key", "new.key"):
        blob = ring.seal_for(gateway.public_key(), load_signing_key(tmp_path / key))
        assert Keyring.open_sealed(blob, gateway, pinned)[0].to_json() == ring.to_json()
    pin.write_bytes(new_pub.read_bytes())  # change-over done: the old key is unpinned
    blob = ring.seal_for(gateway.public_key(), load_signing_key(tmp_path / "old.key"))
    with pytest.raises(KeyringError, match="does not pin"):
        Keyring.open_sealed(blob, gateway, load_pinned(pin))


def test_oversized_sealed_ring_is_refused_naming_the_limit(fleet, gateway) -> None:
    blob = sealed.MAGIC + os.urandom(sealed.MAX_SEALED)
    with pytest.raises(KeyringError, match=f"over the {sealed.MAX_SEALED}-byte limit"):
        Keyring.open_sealed(blob, gateway, (fleet.public_key(),))


def test_truncated_signed_ring_is_refused(fleet, gateway, ring) -> None:
    blob = ring.seal_for(gateway.public_key(), fleet)
    for cut in (len(sealed.MAGIC) + 1, HEADER, HEADER + 16 + 63):
        with pytest.raises(KeyringError, match="too short"):
            Keyring.open_sealed(blob[:cut], gateway, (fleet.public_key(),))


def test_pin_file_must_hold_ed25519_public_keys(tmp_path: Path, gateway) -> None:
    pin = tmp_path / "pin.pub"
    pin.write_text("nothing here\n")
    with pytest.raises(KeyringError, match="no PEM public key"):
        load_pinned(pin)
    from cryptography.hazmat.primitives import serialization
    pin.write_bytes(gateway.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyringError, match="not an Ed25519 key"):
        load_pinned(pin)
    with pytest.raises(KeyringError, match="cannot read the pinned signer"):
        load_pinned(tmp_path / "missing.pub")


def test_signing_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    key = tmp_path / "signer.key"
    pub = write_signer(key)
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_pinned(pub)[0].public_bytes_raw() == \
        load_signing_key(key).public_key().public_bytes_raw()
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        write_signer(key)
    os.chmod(key, 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        load_signing_key(key)
    assert public_pem(load_pinned(pub)[0]) == pub.read_bytes()
