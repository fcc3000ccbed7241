"""One encrypted bundle file: header, key slots, AES-256-GCM chunks.

Layout (big-endian):

    immutable header  magic "EDGEBNDL" | version u16 | flags u16 | chunk size u32 |
                      nonce prefix 8 | manifest sha256 32 | bundle id len u16 | file name len u16 |
                      bundle id | file name
    key slot A, B     kid len u8 | kid 31 | wrap nonce 12 | wrapped data key 48   (92 bytes each)
    chunks            ciphertext + 16-byte tag, `chunk size` plaintext bytes each, the last shorter

Each chunk's nonce is prefix | index u32 and its AAD the immutable header | index u32 | last u8,
so a chunk cannot move, go missing, or be the end when it was not. The data key is wrapped with
AES-GCM under a keyring key with the immutable header and the kid as AAD, which ties the wrap to
this file without the chunks depending on the wrap: rotation only rewrites a key slot.

Two slots let rotation work in place and stay crash-safe without copying the file: the new wrap
goes into the free slot (fsync), then the old slot is cleared (fsync). At every instant one slot
holds a complete wrap under a key of the ring on disk, whichever write a crash interrupts.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keys.errors import BundleError

MAGIC = b"EDGEBNDL"
VERSION = 1
TAG = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 << 20  # a forged header must not make a reader allocate gigabytes
MAX_NAME = 1024
_PREFIX = struct.Struct(">8sHHI8s32sHH")
_SLOT = struct.Struct(">B31s12s48s")
_CHUNK_AAD = struct.Struct(">IB")
_WRAP_LABEL = b"edge-bundle-wrap/1"
EMPTY_SLOT = bytes(_SLOT.size)


@dataclass(frozen=True, slots=True)
class Slot:
    """One wrapped copy of the data key (kid empty when the slot is free)."""

    kid: str
    nonce: bytes
    wrapped: bytes

    def pack(self) -> bytes:
        kid = self.kid.encode("ascii")
        return _SLOT.pack(len(kid), kid, self.nonce, self.wrapped)


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed file header."""

    chunk_size: int
    nonce_prefix: bytes
    manifest_digest: bytes
    bundle_id: str
    file_name: str
    slots: tuple[Slot, Slot]
    immutable: bytes

    @property
    def slot_offset(self) -> int:
        return len(self.immutable)

    @property
    def size(self) -> int:
        return len(self.immutable) + 2 * _SLOT.size


def manifest_digest(manifest_json: bytes) -> bytes:
    """The digest every file header carries of its bundle's canonical manifest."""
    return hashlib.sha256(manifest_json).digest()


def _immutable(chunk_size: int, prefix: bytes, digest: bytes, bundle_id: str, name: str) -> bytes:
    bid, fname = bundle_id.encode("utf-8"), name.encode("utf-8")
    if len(bid) > MAX_NAME or len(fname) > MAX_NAME:
        raise BundleError(f"{name}: bundle or file name longer than {MAX_NAME} bytes")
    return _PREFIX.pack(MAGIC, VERSION, 0, chunk_size, prefix, digest, len(bid), len(fname)) \
        + bid + fname


def _wrap_aad(immutable: bytes, kid: str) -> bytes:
    return _WRAP_LABEL + immutable + kid.encode("ascii")


def wrap(kek: bytes, kid: str, immutable: bytes, data_key: bytes) -> Slot:
    """Wrap `data_key` under `kek`, bound to this header and key id."""
    nonce = os.urandom(12)
    return Slot(kid, nonce, AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(immutable, kid)))


def _parse_slot(raw: bytes) -> Slot:
    n, kid, nonce, wrapped = _SLOT.unpack(raw)
    text = kid[:n].decode("ascii", errors="replace") if 0 < n <= 31 else ""
    return Slot(text, nonce, wrapped)


def read_header(f: BinaryIO, where: str) -> Header:
    """Parse the header at the start of `f`; BundleError naming `where` if it is not sane."""
    raw = f.read(_PREFIX.size)
    if len(raw) < _PREFIX.size:
        raise BundleError(f"{where}: truncated header ({len(raw)} bytes)")
    magic, version, _flags, chunk, prefix, digest, blen, flen = _PREFIX.unpack(raw)
    if magic != MAGIC:
        raise BundleError(f"{where}: not a bundle file (bad magic)")
    if version != VERSION:
        raise BundleError(f"{where}: unsupported bundle format version {version}")
    if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
        raise BundleError(f"{where}: declared chunk size {chunk} is out of range "
                          f"({MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE})")
    if blen > MAX_NAME or flen > MAX_NAME:
        raise BundleError(f"{where}: header names are too long ({blen}, {flen} bytes)")
    rest = f.read(blen + flen + 2 * _SLOT.size)
    if len(rest) < blen + flen + 2 * _SLOT.size:
        raise BundleError(f"{where}: truncated header")
    try:
        bundle_id = rest[:blen].decode("utf-8")
        file_name = rest[blen:blen + flen].decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where}: header names are not UTF-8") from None
    slots = rest[blen + flen:]
    return Header(chunk, prefix, digest, bundle_id, file_name,
                  (_parse_slot(slots[:_SLOT.size]), _parse_slot(slots[_SLOT.size:])),
                  raw + rest[:blen + flen])


def unwrap(header: Header, ring, where: str) -> tuple[bytes, int]:
    """The data key and the index of the slot it came from (the current key's slot first)."""
    live = [i for i, s in enumerate(header.slots) if s.kid]
    usable = sorted((i for i in live if header.slots[i].kid in ring),
                    key=lambda i: header.slots[i].kid != ring.current_id)
    for i in usable:
        slot = header.slots[i]
        try:
            aad = _wrap_aad(header.immutable, slot.kid)
            return AESGCM(ring.key(slot.kid)).decrypt(slot.nonce, slot.wrapped, aad), i
        except InvalidTag:
            continue
    kids = ", ".join(header.slots[i].kid for i in live) or "none"
    if not usable:
        raise BundleError(f"{where}: data key is wrapped under key id {kids}, "
                          f"which the keyring does not have")
    raise BundleError(f"{where}: data key does not authenticate under key {kids} "
                      f"(wrong key or tampered header)")


# -- writing ---------------------------------------------------------------------------


def write_file(out: BinaryIO, source: BinaryIO, *, bundle_id: str, name: str, digest: bytes,
               kid: str, kek: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Encrypt everything `source.read()` yields into `out` as one bundle file."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise BundleError(f"{name}: chunk size {chunk_size} is out of range")
    data_key, prefix = AESGCM.generate_key(256), os.urandom(8)
    immutable = _immutable(chunk_size, prefix, digest, bundle_id, name)
    out.write(immutable + wrap(kek, kid, immutable, data_key).pack() + EMPTY_SLOT)
    aead = AESGCM(data_key)
    index, chunk = 0, _read_full(source, chunk_size)
    while True:
        # Read one chunk ahead: a chunk's AAD says whether it is the last one.
        ahead = _read_full(source, chunk_size) if len(chunk) == chunk_size else b""
        last = not ahead
        if index >= 1 << 32:
            raise BundleError(f"{name}: too many chunks; use a larger chunk size")
        nonce = prefix + index.to_bytes(4, "big")
        out.write(aead.encrypt(nonce, chunk, immutable + _CHUNK_AAD.pack(index, last)))
        if last:
            return
        index, chunk = index + 1, ahead


def _read_full(source: BinaryIO, n: int) -> bytes:
    """Read exactly n bytes unless the source ends first (pipes and wrappers read short)."""
    parts, got = [], 0
    while got < n:
        part = source.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the chunks of a file are, derived from its size."""

    count: int
    last_len: int  # plaintext bytes in the last chunk
    plain_len: int


def layout(header: Header, file_size: int, where: str) -> Layout:
    """Chunk count and plaintext length implied by the file size, or a truncation error."""
    body = file_size - header.size
    if body < TAG:
        raise BundleError(f"{where}: truncated (no complete chunk after the header)")
    full = header.chunk_size + TAG
    count = -(-body // full)
    last = body - (count - 1) * full
    if last < TAG:
        raise BundleError(f"{where}: truncated or padded (last chunk of {last} bytes is "
                          f"shorter than its tag)")
    return Layout(count, last - TAG, body - count * TAG)


def decrypt_chunks(f: Any, header: Header, data_key: bytes, lay: Layout, where: str,
                   dest: Callable[[int, int], memoryview]) -> None:
    """Decrypt and authenticate every chunk of `f` (positioned after the header).

    `dest(offset, length)` returns a writable view of at least length + 15 bytes for the
    plaintext: the GCM decryptor writes straight into it, so reading into one big buffer costs
    no copies. Plaintext from a chunk that fails is left in `dest`: callers wipe it.
    """
    cs, alg = header.chunk_size, algorithms.AES(data_key)
    scratch = bytearray(min(cs, lay.plain_len) + TAG)
    view = memoryview(scratch)
    for index in range(lay.count):
        last = index == lay.count - 1
        n = lay.last_len if last else cs
        got = f.readinto(view[:n + TAG])
        if got != n + TAG:
            raise BundleError(f"{where}: truncated in chunk {index}")
        nonce = header.nonce_prefix + index.to_bytes(4, "big")
        dec = Cipher(alg, modes.GCM(nonce, bytes(view[n:n + TAG]))).decryptor()
        dec.authenticate_additional_data(header.immutable + _CHUNK_AAD.pack(index, last))
        if n:
            dec.update_into(view[:n], dest(index * cs, n))
        try:
            dec.finalize()
        except InvalidTag:
            what = "last chunk" if last else "chunk"
            raise BundleError(f"{where}: {what} {index} of {lay.count} fails authentication "
                              f"(modified, reordered, truncated or from another file)") from None
