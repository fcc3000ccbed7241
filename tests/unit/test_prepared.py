"""`workers.prepared.building`: a prepared folder appears complete or not at all."""

from __future__ import annotations

import pytest

from workers.prepared import building


def test_the_folder_appears_when_the_block_ends(tmp_path):
    final = tmp_path / "cache" / "model"
    with building(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        assert not final.exists()
    assert (final / "weights.bin").read_bytes() == b"w"
    assert [p.name for p in final.parent.iterdir()] == ["model"]  # no temp folder left


def test_a_failed_build_leaves_the_old_folder_and_no_temp(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with building(final) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("conversion failed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in final.iterdir()] == ["old"]


def test_a_rebuild_replaces_the_folder(tmp_path):
    final = tmp_path / "model"
    for content in ("first", "second"):
        with building(final) as tmp:
            (tmp / content).write_text(content)
    assert [p.name for p in final.iterdir()] == ["second"]
