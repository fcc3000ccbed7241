"""Key rotation: re-wrap data keys under the current key, in place, crash-safe and O(files).

Chunks never change on rotation (their AAD does not cover the key slots), so only a 92-byte
key slot per file is written; see `_format` for why two slots make that crash-safe.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from keys import _format as fmt
from keys.bundle import SUFFIX, bundle_dirs
from keys.delivery import PendingCredential, save_key_file
from keys.errors import BundleError
from keys.keyring import Keyring


def rewrap_file(path: Path, ring: Keyring) -> bool:
    """Leave file `path` wrapped under the ring's current key only; True if it was rewritten."""
    where = str(path)
    try:
        f = open(path, "r+b", buffering=0)
    except OSError as exc:
        raise BundleError(f"{where}: cannot open for rewrap ({exc.strerror})") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # two rotations must not interleave slot writes
        header = fmt.read_header(f, where)
        data_key, used = fmt.unwrap(header, ring, where)
        other = 1 - used
        if header.slots[used].kid == ring.current_id:
            if not header.slots[other].kid:
                return False
        else:
            # The new wrap lands in the slot we did not read from: `used` stays valid meanwhile.
            slot = fmt.wrap(ring.key(ring.current_id), ring.current_id, header.immutable,
                            data_key)
            _write_slot(f, header, other, slot.pack())
            other = used
        _write_slot(f, header, other, fmt.EMPTY_SLOT)  # drop the old wrap only after fsync
        return True


def _write_slot(f, header: fmt.Header, index: int, raw: bytes) -> None:
    offset = header.slot_offset + index * len(fmt.EMPTY_SLOT)
    if os.pwrite(f.fileno(), raw, offset) != len(raw):
        raise BundleError(f"{f.name}: short write of a key slot")
    os.fsync(f.fileno())


def _encrypted_files(bundle_dir: Path) -> list[Path]:
    return sorted(p for p in Path(bundle_dir).rglob("*" + SUFFIX) if p.is_file())


def rewrap_bundle(path: Path, ring: Keyring) -> int:
    """Re-wrap every file of the bundle at `path` under `ring.current_id`; files rewritten."""
    files = _encrypted_files(path)
    if not files:
        raise BundleError(f"{path}: no encrypted files to rewrap")
    return sum(rewrap_file(p, ring) for p in files)


def file_key_ids(path: Path) -> set[str]:
    """The key ids a file's slots are wrapped under (read from the header; no key needed)."""
    with open(path, "rb") as f:
        header = fmt.read_header(f, str(path))
    return {s.kid for s in header.slots if s.kid}


def bundles_needing(root: Path, kid: str) -> list[Path]:
    """Bundles under `root` with a file still wrapped under `kid`.

    A file caught mid-rotation has a slot under the old and the new key; it counts as needing
    the old one (the new slot may be a torn write after a power cut), so retiring waits for
    `rewrap_bundle` to finish it.
    """
    needing = []
    for bundle in bundle_dirs(root):
        for path in _encrypted_files(bundle):
            try:
                kids = file_key_ids(path)
            except (BundleError, OSError):
                continue  # unreadable whatever the ring holds; verify reports it
            if kid in kids:
                needing.append(bundle)
                break
    return needing


def check_bundles(root: Path, ring: Keyring) -> int:
    """Unwrap every file's data key under `ring` (headers only, no chunk is read) before a
    rotation or a rewrap changes anything; BundleError listing every file that fails.
    Returns the number of files checked."""
    bad, count = [], 0
    for bundle in bundle_dirs(root):
        files = _encrypted_files(bundle)
        if not files:
            bad.append(f"{bundle}: no encrypted files")
        for path in files:
            count += 1
            try:
                with open(path, "rb") as f:
                    fmt.unwrap(fmt.read_header(f, str(path)), ring, str(path))
            except OSError as exc:
                bad.append(f"{path}: cannot read ({exc.strerror})")
            except BundleError as exc:
                bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BundleError(f"{len(bad)} bundle file(s) do not open with the keyring, nothing "
                          f"was changed: {'; '.join(bad[:3])}{more}; fix or remove them first")
    return count


def rewrap_all(root: Path, ring: Keyring) -> int:
    """Check every bundle under `root`, then rewrap them all under the ring's current key."""
    check_bundles(root, ring)
    return sum(rewrap_bundle(b, ring) for b in bundle_dirs(root))


def rotate_keyring(ring_path: Path, root: Path,
                   credential: Callable[[Keyring], PendingCredential] | None = None,
                   ) -> tuple[str, int]:
    """Add a new current key to the ring file, then rewrap every bundle under `root`.

    In this order, so that no failure leaves the ring, its credential and the bundles apart:
    (1) every bundle is checked to open with the ring as it is (one bad file aborts, nothing
    changed); (2) the new ring's credential is made and checked beside the old one, when
    `credential` is given (a failure aborts, nothing changed); (3) the key file is saved;
    (4) the credential is moved into place; (5) the bundles are rewrapped. At every instant
    every file is wrapped under some key of the ring on disk and of the credential; a crash
    between (3) and (4) leaves key file and credential disagreeing, which workers refuse
    (`keys.delivery.resolve`) until `edgectl keys install` remakes the credential.
    Returns the new key id and the number of files rewritten.
    """
    ring = Keyring.load_file(ring_path)
    check_bundles(root, ring)
    kid = ring.rotate()
    pending = credential(ring) if credential is not None else None
    try:
        save_key_file(ring, ring_path)
    except BaseException:
        if pending is not None:
            pending.discard()
        raise
    if pending is not None:
        pending.commit()
    return kid, sum(rewrap_bundle(b, ring) for b in bundle_dirs(root))
