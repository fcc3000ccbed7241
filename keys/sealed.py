"""A keyring sealed to one gateway's X25519 public key, for delivery over the fleet broker.

    sealed = MAGIC | ephemeral public key 32 | nonce 12 | AES-256-GCM(ring JSON)

The AES key is HKDF-SHA256 of the X25519 shared secret, salted with both public keys; the
header is the AAD. Only the holder of the recipient's private key can open it, and any change
to the sealed bytes is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keys._fs import write_private
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


# -- key files (PEM) -------------------------------------------------------------------


def write_identity(path: Path) -> Path:
    """A new gateway key pair: private key at `path` (PEM, 0600), public at `path`.pub."""
    path = Path(path)
    if path.exists():
        raise KeyringError(f"{path}: exists; refusing to overwrite a gateway identity")
    key = X25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


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
