"""Durable file-system steps: private atomic writes, directory fsyncs, directory swaps."""

from __future__ import annotations

import ctypes
import os
import secrets
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_dir(path: Path) -> None:
    """Make a rename or a create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600: temp file beside it, fsync, rename, fsync dir.

    The temp file is created 0600 from the start, so the secret is never readable by others,
    not even for the instant between create and chmod.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(new: Path, final: Path) -> Path | None:
    """Put directory `new` at `final`; return where the old `final` now is (to delete), if any.

    With RENAME_EXCHANGE readers never see `final` missing; elsewhere there is a short gap
    between moving the old one aside and renaming the new one in.
    """
    if not final.exists():
        os.rename(new, final)
        return None
    if _exchange(new, final):
        return new
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    os.rename(final, old)
    os.rename(new, final)
    return old
