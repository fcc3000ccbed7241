"""A keyring sealed to one gateway's X25519 public key, for delivery over the fleet broker.

    sealed = MAGIC | ephemeral public key 32 | nonce 12 | AES-256-GCM(ring JSON)

The AES key is HKDF-SHA256 of the X25519 shared secret, salted with both public keys; the
header is the AAD. Only the holder of the recipient's private key can open it, and any change
to the sealed bytes is refused.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keys.errors import KeyringError

MAGIC = b"EDGESEAL1"
_INFO = b"edge-keyring-seal/1"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _key(shared: bytes, eph: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, eph + recipient, _INFO).derive(shared)


def seal(plaintext: bytes, recipient: X25519PublicKey) -> bytes:
    """Encrypt `plaintext` so that only `recipient`'s private key opens it."""
    eph = X25519PrivateKey.generate()
    eph_pub, rec_pub = eph.public_key().public_bytes(*_RAW), recipient.public_bytes(*_RAW)
    nonce = os.urandom(12)
    header = MAGIC + eph_pub + nonce
    key = _key(eph.exchange(recipient), eph_pub, rec_pub)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + rec_pub)


def unseal(sealed: bytes, private_key: X25519PrivateKey) -> bytes:
    """Open what `seal` made for this private key; KeyringError if it is not for us or altered."""
    if len(sealed) < len(MAGIC) + 44 + 16 or not sealed.startswith(MAGIC):
        raise KeyringError("sealed keyring: not a sealed keyring (bad magic or too short)")
    eph_pub = sealed[len(MAGIC):len(MAGIC) + 32]
    nonce = sealed[len(MAGIC) + 32:len(MAGIC) + 44]
    header = sealed[:len(MAGIC) + 44]
    rec_pub = private_key.public_key().public_bytes(*_RAW)
    key = _key(private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, rec_pub)
    try:
        return AESGCM(key).decrypt(nonce, sealed[len(header):], header + rec_pub)
    except InvalidTag:
        raise KeyringError("sealed keyring: does not open with this private key "
                           "(sealed for another gateway, or altered)") from None
