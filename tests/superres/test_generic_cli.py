"""`edgectl prepare superres --from` end to end into an encrypted bundle, then `edgectl run`
on it: the same answer as a direct OpenVINO run of the user's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgectl.cli import main
from tests.superres import srmodels
from tests.superres.conftest import decode, photo, png
from tests.superres.test_generic import assert_matches


@pytest.fixture
def config(tmp_path: Path, keyring_file: Path) -> Path:
    """A daemon config with the session's test keyring, a private bundle dir and f32 CPU."""
    path = tmp_path / "edge.toml"
    path.write_text(f'bundle_dir = "{tmp_path / "bundles"}"\n'
                    f'[keyring]\nfile = "{keyring_file}"\ncredential = "none"\n'
                    '[tasks.superres]\ndevices = ["CPU"]\n'
                    '[devices.CPU]\ninference_precision = "f32"\n')
    return path


def test_prepare_from_packs_a_bundle_that_edgectl_run_serves(tmp_path, config, capsys):
    model = srmodels.single(2, seed=4)
    srmodels.save(model, tmp_path / "my-model")
    assert main(["--config", str(config), "prepare", "superres", "--from",
                 str(tmp_path / "my-model"), "--name", "mine-x2", "--version", "7",
                 "--cache", str(tmp_path / "cache"), "--option", "tile=32"]) == 0
    printed = capsys.readouterr().out
    assert "packed" in printed
    assert list((tmp_path / "bundles").rglob("*")), "no bundle was written"
    assert not list((tmp_path / "bundles").rglob("*.xml")), "plaintext IR in the bundle dir"

    image = photo(45, 70, seed=2)
    (tmp_path / "in.png").write_bytes(png(image))
    assert main(["--config", str(config), "run", "superres", str(tmp_path / "in.png"),
                 "--param", "model=mine-x2", "--out", str(tmp_path / "out")]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["result"]["model"] == "mine-x2"
    assert body["result"]["images"][0]["width"] == 140
    [answer] = body["result"]["files"]
    assert_matches(decode(Path(answer).read_bytes()), srmodels.direct(model, image, scale=2))


def test_prepare_from_a_folder_without_a_model_says_so(tmp_path, config, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["--config", str(config), "prepare", "superres", "--from",
                 str(tmp_path / "nothing"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "no model found" in err and "Traceback" not in err
