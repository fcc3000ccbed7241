"""Every way a bundle file can be damaged or swapped is refused with a one-line error."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import pytest

from keys import Bundle, BundleError, Keyring, pack_bundle, verify_bundle
from keys import _format as fmt
from tests.keys.conftest import CHUNK, make_prepared

FILE = "model.bin"  # 5 full chunks + 17 bytes: 6 chunks


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return fmt.read_header(f, str(path)).size


def _chunks(path: Path) -> tuple[bytes, list[bytes]]:
    raw = path.read_bytes()
    h = _header_size(path)
    body, step = raw[h:], CHUNK + fmt.TAG
    return raw[:h], [body[i:i + step] for i in range(0, len(body), step)]


def _rewrite(path: Path, edit: Callable[[bytes, list[bytes]], bytes]) -> None:
    head, chunks = _chunks(path)
    path.write_bytes(edit(head, chunks))


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]


def _refused(bundle_dir: Path, ring: Keyring, match: str, file: str = FILE) -> str:
    """Opening + reading (and verifying) must fail; the message is one line naming the file."""
    with pytest.raises(BundleError, match=match) as info:
        Bundle.open(bundle_dir, ring).read(FILE)
    with pytest.raises(BundleError):
        verify_bundle(bundle_dir, ring)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{file}.enc: " in msg
    return msg


EDITS: dict[str, tuple[Callable[[bytes, list[bytes]], bytes], str]] = {
    "truncated mid-chunk": (lambda h, c: h + b"".join(c)[:-5], "fails authentication"),
    "truncated at chunk boundary": (lambda h, c: h + b"".join(c[:-1]), "last chunk"),
    "shorter than a tag": (lambda h, c: h + b"".join(c[:-1]) + c[-1][:7], "truncated"),
    "chunk missing": (lambda h, c: h + c[0] + b"".join(c[2:]), "fails authentication"),
    "chunks reordered": (lambda h, c: h + c[1] + c[0] + b"".join(c[2:]), "chunk 0"),
    "bit flipped in data": (lambda h, c: h + _flip(b"".join(c), 3), "chunk 0"),
    "bit flipped in tag": (lambda h, c: h + _flip(b"".join(c), CHUNK + 2), "chunk 0"),
    "chunk appended": (lambda h, c: h + b"".join(c) + c[0], "fails authentication"),
    "bit flipped in nonce prefix": (lambda h, c: _flip(h, 17) + b"".join(c), "authenticate"),
    "header truncated": (lambda h, c: h[:40], "truncated header"),
    "header cut in the names": (lambda h, c: h[:70], "truncated header"),
    "bad magic": (lambda h, c: b"X" + h[1:] + b"".join(c), "bad magic"),
    "huge chunk size": (lambda h, c: h[:12] + struct.pack(">I", 1 << 30) + h[16:]
                        + b"".join(c), "chunk size 1073741824 is out of range"),
    "future version": (lambda h, c: h[:8] + struct.pack(">H", 9) + h[10:] + b"".join(c),
                       "version 9"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_damaged_file_is_refused(packed: Path, ring: Keyring, case: str) -> None:
    edit, match = EDITS[case]
    _rewrite(packed / f"{FILE}.enc", edit)
    _refused(packed, ring, match)


def test_file_swapped_from_another_bundle_is_refused(packed: Path, ring: Keyring,
                                                     files: dict, tmp_path: Path) -> None:
    src = make_prepared(tmp_path, files, name="other")
    other = pack_bundle(src, tmp_path / "others", ring, chunk_size=CHUNK)
    (packed / f"{FILE}.enc").write_bytes((other / f"{FILE}.enc").read_bytes())
    assert "belongs to asr--other" in _refused(packed, ring, "swapped")


def test_file_swapped_within_the_bundle_is_refused(packed: Path, ring: Keyring) -> None:
    (packed / f"{FILE}.enc").write_bytes((packed / "exact.bin.enc").read_bytes())
    _refused(packed, ring, "belongs to asr--tiny:exact.bin")


def test_renamed_header_fields_do_not_help(packed: Path, ring: Keyring) -> None:
    # Forge the file name in a swapped file's header: the wrap and chunks no longer authenticate.
    raw = (packed / "exact.bin.enc").read_bytes()
    forged = raw.replace(b"exact.bin", FILE.encode(), 1)
    (packed / f"{FILE}.enc").write_bytes(forged)
    _refused(packed, ring, "does not authenticate")


def test_unknown_key_id_is_refused(packed: Path) -> None:
    _refused(packed, Keyring.generate(), "keyring does not have", file="")


def test_wrong_key_under_the_same_id_is_refused(packed: Path, ring: Keyring) -> None:
    impostor = Keyring({ring.current_id: bytes(32)}, ring.current_id)
    _refused(packed, impostor, "does not authenticate", file="")


def test_manifest_edited_after_packing_is_refused(packed: Path, ring: Keyring) -> None:
    manifest = json.loads((packed / "bundle.json").read_text())
    manifest["settings"]["beam"] = 5
    (packed / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited after packing"):
        Bundle.open(packed, ring)


def test_missing_file_is_refused_at_open(packed: Path, ring: Keyring) -> None:
    (packed / f"{FILE}.enc").unlink()
    with pytest.raises(BundleError, match=f"{FILE}.enc: listed in bundle.json but missing"):
        Bundle.open(packed, ring)


def test_failed_read_leaves_no_plaintext_returned(packed: Path, ring: Keyring) -> None:
    bundle = Bundle.open(packed, ring)
    _rewrite(packed / f"{FILE}.enc", lambda h, c: h + b"".join(c[:-1]) + _flip(c[-1], 0))
    with pytest.raises(BundleError, match="last chunk 5 of 6"):
        bundle.read(FILE)
