"""The fleet signing key: Ed25519, held by the key host; its public half is pinned on gateways.

A gateway installs a sealed keyring only if it was signed by a key it pins (`[keyring]
signer`). The pin file holds one or more PEM public keys: two during a change of signing key.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keys._fs import write_private
from keys.errors import KeyringError

PUBLIC_KEY_BYTES = 32
MAX_PIN_FILE = 64 << 10  # a pin file is a few PEM blocks; anything larger is not one
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (as carried in a sealed ring)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey | bytes) -> str:
    """A short, stable name for a signing key: `ed25519:` + 16 hex digits of SHA-256."""
    data = key if isinstance(key, bytes) else raw(key)
    return "ed25519:" + hashlib.sha256(data).hexdigest()[:16]


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) form of a public key, as pinned on gateways."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def write_signer(path: Path) -> Path:
    """A new fleet signing key: private key at `path` (PEM, 0600), public at `path`.pub."""
    return write_key_pair(path, Ed25519PrivateKey.generate(), "a signing key")


def write_key_pair(path: Path, key: Ed25519PrivateKey | X25519PrivateKey, what: str) -> Path:
    """`key` at `path` (PKCS8 PEM, 0600, never over an existing file) and its public half at
    `path`.pub (SubjectPublicKeyInfo PEM); returns the public file."""
    path = Path(path)
    if path.exists():
        raise KeyringError(f"{path}: exists; refusing to overwrite {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The fleet signing key from its PEM file; refuses one that group or others may read."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise KeyringError(f"{path}: signing key is accessible by group/others "
                               f"(mode {mode:04o}); run `chmod 600 {path}`")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read signing key ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise KeyringError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyringError(f"{path}: not an Ed25519 signing key "
                           f"(make one with `edgectl keys signer generate`)")
    return key


def load_pinned(path: Path) -> tuple[Ed25519PublicKey, ...]:
    """Every Ed25519 public key in a pin file (one or more PEM blocks; other lines ignored)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PIN_FILE:
            raise KeyringError(f"{path}: pinned signer file is {size} bytes, over the "
                               f"{MAX_PIN_FILE}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read the pinned signer ({exc.strerror})") from None
    keys = []
    for i, block in enumerate(_PEM_BLOCK.findall(data)):
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise KeyringError(f"{path}: public key {i + 1} is not valid PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyringError(f"{path}: public key {i + 1} is not an Ed25519 key")
        keys.append(key)
    if not keys:
        raise KeyringError(f"{path}: no PEM public key in the pinned signer file")
    return tuple(keys)
