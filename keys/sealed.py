"""A keyring sealed to one gateway's X25519 public key and signed by the fleet signing key.

Format 2 (what `seal` makes), big-endian:

    header = MAGIC2 "EDGESEAL2" | created u64 (unix s) | recipient X25519 public key 32 |
             signer Ed25519 public key 32 | ephemeral X25519 public key 32 | nonce 12
    sealed = header | AES-256-GCM(ring JSON, aad=header) | Ed25519 signature 64

The signature covers a context string, the header (format tag, creation time, recipient,
signer, ephemeral key, nonce) and the ciphertext (hence the ring: its key ids and keys). The
AES key is HKDF-SHA256 of the X25519 shared secret, salted with the ephemeral and recipient
public keys. `unseal` checks, in this order and before any decryption: the signer is pinned,
the signature verifies, the ring is addressed to this gateway; only then does it decrypt.

Format 1 (`MAGIC1 | ephemeral 32 | nonce 12 | AES-256-GCM`, no signature: anyone who knows a
gateway's public key could make one) opens only with `allow_unsigned`, for development and
for rings sealed before signing existed.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keys import signer as signing
from keys.errors import KeyringError

MAGIC = b"EDGESEAL2"
MAGIC1 = b"EDGESEAL1"
MAX_SEALED = 256 << 10  # a ring of a few keys is ~1 KiB; thousands of keys still fit
_SIG_CONTEXT = b"edge-keyring-seal/2 signature\0"
_INFO = {1: b"edge-keyring-seal/1", 2: b"edge-keyring-seal/2"}
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_HEADER = struct.Struct(">9sQ32s32s32s12s")
_SIG, _TAG = 64, 16
NO_PIN = ("sealed keyring: no fleet signer is pinned on this gateway, so nothing proves who "
          "sealed this ring; pin the fleet's public signing key with `signer = "
          "\"/etc/edge/fleet-signer.pub\"` in the [keyring] table of the config (the .pub that "
          "`edgectl keys signer generate` wrote), or pass --allow-unsigned (development only)")


@dataclass(frozen=True, slots=True)
class SealInfo:
    """What a sealed ring said about itself, once opened (no key material)."""

    format: int
    created: int | None  # unix seconds; None for format 1
    signer: str | None  # fingerprint of the signing key; None for format 1
    verified: bool  # True only when the signer was one of the pinned keys

    def describe(self) -> str:
        """One line for the operator: who signed it, when, and whether a pin vouched for it."""
        if self.format == 1:
            return "UNSIGNED (format 1): nothing proves who sealed it"
        when = datetime.datetime.fromtimestamp(self.created or 0, datetime.UTC)
        how = "verified against the pinned signer" if self.verified else \
            "NOT verified: no signer pinned"
        return f"signed by {self.signer} at {when:%Y-%m-%dT%H:%M:%SZ}, {how}"


def identity_fingerprint(key: X25519PublicKey | bytes) -> str:
    """A short name for a gateway identity: `x25519:` + 16 hex digits of SHA-256."""
    data = key if isinstance(key, bytes) else key.public_bytes(*_RAW)
    return "x25519:" + hashlib.sha256(data).hexdigest()[:16]


def _key(shared: bytes, eph: bytes, recipient: bytes, version: int) -> bytes:
    return HKDF(hashes.SHA256(), 32, eph + recipient, _INFO[version]).derive(shared)


def _exchange(private_key: X25519PrivateKey, eph_pub: bytes) -> bytes:
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:  # a low-order point: no shared secret, so no honest sender made it
        raise KeyringError("sealed keyring: its ephemeral key is not a usable X25519 key "
                           "(altered)") from None


def seal(plaintext: bytes, recipient: X25519PublicKey, signer: Ed25519PrivateKey,
         created: int | None = None) -> bytes:
    """Encrypt `plaintext` for `recipient` only and sign the result with the fleet key."""
    eph = X25519PrivateKey.generate()
    eph_pub, rec_pub = eph.public_key().public_bytes(*_RAW), recipient.public_bytes(*_RAW)
    nonce = os.urandom(12)
    stamp = int(time.time()) if created is None else created
    header = _HEADER.pack(MAGIC, stamp, rec_pub, signing.raw(signer.public_key()), eph_pub,
                          nonce)
    body = AESGCM(_key(eph.exchange(recipient), eph_pub, rec_pub, 2)).encrypt(nonce, plaintext,
                                                                              header)
    return header + body + signer.sign(_SIG_CONTEXT + header + body)


def seal_unsigned(plaintext: bytes, recipient: X25519PublicKey) -> bytes:
    """The format-1 seal, without a signature: what edgectl made before rings were signed.

    Kept so that tests can play the sender nobody vouches for, and so that the refusal of
    such rings is tested against the real format; `edgectl keys seal` never makes one.
    """
    eph = X25519PrivateKey.generate()
    eph_pub, rec_pub = eph.public_key().public_bytes(*_RAW), recipient.public_bytes(*_RAW)
    nonce = os.urandom(12)
    header = MAGIC1 + eph_pub + nonce
    key = _key(eph.exchange(recipient), eph_pub, rec_pub, 1)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + rec_pub)


def unseal(sealed: bytes, private_key: X25519PrivateKey,
           pinned: Sequence[Ed25519PublicKey] = (),
           allow_unsigned: bool = False) -> tuple[bytes, SealInfo]:
    """Open a sealed ring addressed to `private_key`, signed by one of the `pinned` keys.

    Refused (KeyringError, one line saying why) before any decryption: no signer pinned
    (unless `allow_unsigned`), an unsigned ring (unless `allow_unsigned`), a signer not
    pinned, a signature that does not verify (any byte changed), a ring addressed to another
    gateway. `allow_unsigned` never admits a ring whose signature fails or whose signer is
    not pinned while a pin exists.
    """
    if not pinned and not allow_unsigned:
        raise KeyringError(NO_PIN)
    if len(sealed) > MAX_SEALED:
        raise KeyringError(f"sealed keyring: {len(sealed)} bytes, over the {MAX_SEALED}-byte "
                           f"limit for a sealed ring")
    if sealed.startswith(MAGIC):
        return _unseal_signed(sealed, private_key, pinned)
    if sealed.startswith(MAGIC1):
        if not allow_unsigned:
            raise KeyringError("sealed keyring: unsigned (format 1), so nothing proves who "
                               "sealed it; have the key host re-seal it with `edgectl keys "
                               "seal --sign-key`, or pass --allow-unsigned (development only)")
        return _unseal_unsigned(sealed, private_key), SealInfo(1, None, None, False)
    raise KeyringError("sealed keyring: not a sealed keyring (bad magic)")


def _unseal_signed(sealed: bytes, private_key: X25519PrivateKey,
                   pinned: Sequence[Ed25519PublicKey]) -> tuple[bytes, SealInfo]:
    if len(sealed) < _HEADER.size + _TAG + _SIG:
        raise KeyringError(f"sealed keyring: {len(sealed)} bytes is too short for format 2 "
                           f"(at least {_HEADER.size + _TAG + _SIG})")
    header, body, sig = sealed[:_HEADER.size], sealed[_HEADER.size:-_SIG], sealed[-_SIG:]
    _, created, rec_pub, signer_pub, eph_pub, nonce = _HEADER.unpack(header)
    who = signing.fingerprint(signer_pub)
    if pinned:
        match = [k for k in pinned if signing.raw(k) == signer_pub]
        if not match:
            pins = ", ".join(signing.fingerprint(k) for k in pinned)
            raise KeyringError(f"sealed keyring: signed by {who}, which this gateway does not "
                               f"pin (pinned: {pins}); it was not sealed by the fleet's key host")
        key = match[0]
    else:  # allow_unsigned without a pin: the signature is checked for integrity only
        key = Ed25519PublicKey.from_public_bytes(signer_pub)
    try:
        key.verify(sig, _SIG_CONTEXT + header + body)
    except InvalidSignature:
        raise KeyringError(f"sealed keyring: the signature by {who} does not verify "
                           f"(altered after signing)") from None
    own = private_key.public_key().public_bytes(*_RAW)
    if rec_pub != own:
        raise KeyringError(f"sealed keyring: sealed for another gateway (recipient "
                           f"{identity_fingerprint(rec_pub)}, this gateway is "
                           f"{identity_fingerprint(own)})")
    shared = _exchange(private_key, eph_pub)
    try:
        plain = AESGCM(_key(shared, eph_pub, own, 2)).decrypt(nonce, body, header)
    except InvalidTag:
        raise KeyringError("sealed keyring: signed, but does not open with this gateway's "
                           "private key (the key host sealed a broken ring)") from None
    return plain, SealInfo(2, created, who, bool(pinned))


def _unseal_unsigned(sealed: bytes, private_key: X25519PrivateKey) -> bytes:
    if len(sealed) < len(MAGIC1) + 44 + _TAG:
        raise KeyringError("sealed keyring: too short for format 1")
    eph_pub = sealed[len(MAGIC1):len(MAGIC1) + 32]
    nonce = sealed[len(MAGIC1) + 32:len(MAGIC1) + 44]
    header = sealed[:len(MAGIC1) + 44]
    rec_pub = private_key.public_key().public_bytes(*_RAW)
    shared = _exchange(private_key, eph_pub)
    try:
        return AESGCM(_key(shared, eph_pub, rec_pub, 1)).decrypt(nonce, sealed[len(header):],
                                                                 header + rec_pub)
    except InvalidTag:
        raise KeyringError("sealed keyring: does not open with this private key "
                           "(sealed for another gateway, or altered)") from None


# -- key files (PEM) -------------------------------------------------------------------


def write_identity(path: Path) -> Path:
    """A new gateway key pair: private key at `path` (PEM, 0600), public at `path`.pub."""
    return signing.write_key_pair(path, X25519PrivateKey.generate(), "a gateway identity")


def load_public_key(path: Path) -> X25519PublicKey:
    """A gateway's X25519 public key from its PEM file."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyringError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, X25519PublicKey):
        raise KeyringError(f"{path}: not an X25519 public key")
    return key


def load_private_key(path: Path) -> X25519PrivateKey:
    """This gateway's X25519 private key from its PEM file (unencrypted PKCS8)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyringError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyringError(f"{path}: not an X25519 private key")
    return key
