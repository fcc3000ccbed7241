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


def test_superres_reuses_a_folder_of_its_own_version_only(tmp_path):
    from workers.superres.prepare import _build

    built = []

    def builder(folder):
        built.append(folder)
        return {"name": "m", "version": "2"}

    final = tmp_path / "m"
    _build(final, "2", False, builder)
    _build(final, "2", False, builder)  # complete, same version: reused
    assert len(built) == 1
    _build(final, "3", False, builder)  # made by an older recipe: rebuilt
    assert len(built) == 2
