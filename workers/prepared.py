"""Writing a prepared folder so that a half-written one is never taken for a finished one.

    with building(cache_dir / "my-model") as tmp:
        write_everything_into(tmp)
    # the folder now exists, complete; on an error it is untouched and tmp is gone
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh folder beside `final` that replaces `final` when the block ends cleanly."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # one rename: readers see the old folder or the new one, complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
