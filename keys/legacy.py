"""Import of legacy models encrypted with `openssl enc -aes-128-cbc -K <hex> -iv <hex>`.

The legacy files are raw AES-128-CBC with PKCS#7 padding, no salt header. They are decrypted
as a stream straight into the bundle writer: no plaintext reaches the disk, and no whole file
is held in memory. Files other than .xml/.bin are taken as plaintext (the legacy tool left
them so) and packed encrypted too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keys.bundle import MANIFEST, Source, _opener, _plain_files, write_bundle
from keys.errors import BundleError
from keys.keyring import Keyring

ENCRYPTED_SUFFIXES = (".xml", ".bin")
_BLOCK = 16
_READ = 1 << 20


class _CbcReader:
    """A file-like `read(n)` over the plaintext of one legacy ciphertext file."""

    def __init__(self, path: Path, key: bytes, iv: bytes) -> None:
        self._path = path
        self._src: BinaryIO = open(path, "rb")
        self._dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        self._unpad = padding.PKCS7(128).unpadder()
        self._buf = bytearray()
        self._done = False

    def __enter__(self) -> _CbcReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._src.close()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._done:
            raw = self._src.read(_READ)
            if raw:
                self._buf += self._unpad.update(self._dec.update(raw))
            else:
                self._buf += self._finish()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _finish(self) -> bytes:
        self._done = True
        try:
            tail = self._dec.finalize()
        except ValueError:
            raise BundleError(f"{self._path}: not AES-CBC ciphertext (length is not a "
                              f"multiple of {_BLOCK})") from None
        try:
            return self._unpad.update(tail) + self._unpad.finalize()
        except ValueError:
            raise BundleError(f"{self._path}: bad padding after decryption "
                              f"(wrong key or IV?)") from None


def _parse_hex(value: str, what: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise BundleError(f"legacy import: {what} is not hex") from None
    if len(raw) != size:
        raise BundleError(f"legacy import: {what} must be {size} bytes ({2 * size} hex digits)")
    return raw


def _check_xml(path: Path, key: bytes, iv: bytes) -> None:
    """Decrypt the first blocks of an IR .xml: a wrong key shows before any big file is read."""
    head = path.read_bytes()[:64]
    if len(head) < _BLOCK:
        raise BundleError(f"{path}: too short to be AES-CBC ciphertext")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    text = dec.update(head[: len(head) // _BLOCK * _BLOCK]).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"<"):
        raise BundleError(f"{path}: does not decrypt to XML (wrong key or IV?)")


def import_openssl(src_dir: Path, dst_root: Path, ring: Keyring, key_hex: str, iv_hex: str,
                   name: str, task: str) -> Path:
    """Decrypt a legacy OpenSSL-encrypted model folder in memory and pack it as a bundle."""
    src_dir = Path(src_dir)
    key = _parse_hex(key_hex, "key", 16)
    iv = _parse_hex(iv_hex, "IV", 16)
    rels = _plain_files(src_dir)
    if not any(r.endswith(ENCRYPTED_SUFFIXES) for r in rels):
        raise BundleError(f"{src_dir}: no .xml/.bin files to import")
    for rel in rels:
        if rel.endswith(".xml"):
            _check_xml(src_dir / rel, key, iv)
    files: dict[str, Source] = {}
    for rel in rels:
        path = src_dir / rel
        if rel.endswith(ENCRYPTED_SUFFIXES):
            files[rel] = _cbc_opener(path, key, iv)
        else:
            files[rel] = _opener(path)
    manifest = _legacy_manifest(src_dir, name, task)
    return write_bundle(manifest, files, Path(dst_root), ring)


def _legacy_manifest(src_dir: Path, name: str, task: str) -> dict:
    """A plaintext bundle.json beside the legacy files, if any, gives version and settings."""
    manifest: dict = {"version": "legacy", "settings": {}}
    existing = src_dir / MANIFEST
    if existing.is_file():
        try:
            manifest.update(json.loads(existing.read_text("utf-8")))
        except ValueError as exc:
            raise BundleError(f"{existing}: not JSON ({exc})") from None
    manifest.update(name=name, task=task)
    return manifest


def _cbc_opener(path: Path, key: bytes, iv: bytes) -> Source:
    """Opens `path` as its OpenSSL-decrypted plaintext stream."""
    return lambda: _CbcReader(path, key, iv)  # type: ignore[return-value]  # a BinaryIO reader
