"""A user's own model (`edgectl prepare superres --from`): every interface, against a direct
OpenVINO run of the same model on the same image, through tiles and the task handler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.errors import BadRequest
from tests.superres import srmodels
from tests.superres.conftest import F32, decode, photo, png, request
from workers.api import DeviceSettings, FolderBundle, no_progress
from workers.superres.generic import GenericPipeline
from workers.superres.prepare import prepare_from

TILE = "32"  # small tiles: every test image below spans several of them


def _prepared(tmp_path: Path, model, options=None, name="model") -> Path:
    src = srmodels.save(model, tmp_path / "src" / name)
    return prepare_from(src, tmp_path / "prepared", name=name,
                        options={"tile": TILE, **(options or {})})


def _pipeline(folder: Path, core) -> GenericPipeline:
    return GenericPipeline.load(FolderBundle(folder), core, DeviceSettings("CPU", F32))


def _settings(folder: Path) -> dict:
    return json.loads((folder / "bundle.json").read_text())["settings"]


def assert_matches(ours: np.ndarray, reference: np.ndarray) -> None:
    """Equal, but for rounding: the same f32 sums in another order (another tile shape picks
    other kernels) can land on the other side of a .5 and move a level by one."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 1e-3, (diff > 0).mean()


def test_u8_nhwc_dynamic_model_matches_a_direct_run(tmp_path, core):
    model = srmodels.single(4, layout="NHWC", dtype="u8")
    folder = _prepared(tmp_path, model)
    s = _settings(folder)
    assert (s["interface"], s["scale"], s["layout"], s["input_type"]) == ("single", 4, "NHWC", "u8")
    assert s["native"] == [None, None] and s["output_range"] == 255
    image = photo(75, 50, seed=1)  # 3 x 2 tiles of 32
    [ours] = _pipeline(folder, core)([image])
    assert_matches(ours, srmodels.direct(model, image, scale=4, layout="NHWC", input_range=255))


@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("static", [False, True])
def test_f32_nchw_model_any_scale_matches_a_direct_run(tmp_path, core, scale, static):
    model = srmodels.single(scale, hw=(24, 20) if static else None, seed=scale)
    folder = _prepared(tmp_path, model)
    s = _settings(folder)
    assert (s["scale"], s["layout"], s["input_type"], s["input_range"]) == (scale, "NCHW",
                                                                              "f32", 1)
    assert s["output_range"] == 1  # detected: the output keeps the input's mean
    assert s["native"] == ([24, 20] if static else [None, None])
    image = photo(61, 47, seed=scale)  # larger than one tile either way
    pipeline = _pipeline(folder, core)
    [ours] = pipeline([image])
    # the reference runs the whole image at once (the test model is fully convolutional, so
    # even a static one reshapes to the image's size for this run)
    assert_matches(ours, srmodels.direct(model, image, scale=scale))
    if static:  # at exactly its native size, nothing is padded or cut
        native = photo(24, 20, seed=7)
        [ours] = pipeline([native])
        assert_matches(ours, srmodels.direct(model, native, scale=scale))


def test_image_smaller_than_a_static_model_is_padded_to_its_native_size(tmp_path, core):
    folder = _prepared(tmp_path, srmodels.single(2, hw=(24, 20)))
    [out] = _pipeline(folder, core)([photo(5, 9)])
    assert out.shape == (10, 18, 3)


def test_omz_1032_two_input_form_matches_a_direct_run(tmp_path, core):
    model = srmodels.lr_bicubic(hw=(24, 32))
    folder = _prepared(tmp_path, model)
    s = _settings(folder)
    assert s["interface"] == "lr+bicubic" and s["scale"] == 4
    assert (s["channels"], s["input_range"], s["output_range"]) == ("bgr", 255, 1)
    assert (s["lr_index"], s["bicubic_index"], s["native"]) == (0, 1, [24, 32])
    image = photo(50, 70, seed=3)  # 3 x 3 native tiles
    [ours] = _pipeline(folder, core)([image])
    reference = srmodels.direct(model, image, scale=4, input_range=255, output_range=1,
                                bgr=True, two=True)
    assert_matches(ours, reference)


def test_dynamic_two_input_model_defaults_to_4x(tmp_path, core):
    model = srmodels.lr_bicubic(hw=None)
    folder = _prepared(tmp_path, model)
    s = _settings(folder)
    assert s["scale"] == 4 and s["native"] == [None, None]
    image = photo(40, 45, seed=4)
    [ours] = _pipeline(folder, core)([image])
    assert_matches(ours, srmodels.direct(model, image, scale=4, input_range=255,
                                         output_range=1, bgr=True, two=True))


@pytest.mark.slow  # importing torch and exporting: ~7 s here
def test_onnx_export_of_a_torch_model_matches_a_direct_run(tmp_path, core):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import openvino as ov

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 27, 3, padding=1), torch.nn.PixelShuffle(3))
    src = tmp_path / "onnx" / "tiny-x3.onnx"
    src.parent.mkdir()
    torch.onnx.export(net, (torch.rand(1, 3, 16, 16),), src, dynamo=False,
                      input_names=["lr"], output_names=["sr"],
                      dynamic_axes={"lr": {2: "h", 3: "w"}, "sr": {2: "H", 3: "W"}})
    # an untrained net's output does not look like its input: the range is stated
    folder = prepare_from(src.parent, tmp_path / "prepared",
                          options={"tile": TILE, "output_range": "1"})
    assert folder.name == "onnx" and _settings(folder)["scale"] == 3
    image = photo(40, 70, seed=5)
    [ours] = _pipeline(folder, core)([image])
    assert_matches(ours, srmodels.direct(ov.Core().read_model(src), image, scale=3))


def test_a_model_needing_sizes_divisible_by_n_gets_padded_tiles(tmp_path, core):
    model = srmodels.needs_multiple(2, 4)
    with pytest.raises(BadRequest, match="multiple=N"):
        _prepared(tmp_path, model, name="plain")
    folder = _prepared(tmp_path, model, {"multiple": "4", "tile": "30"}, name="padded")
    assert (_settings(folder)["multiple"], _settings(folder)["tile"]) == (4, 28)
    pipeline = _pipeline(folder, core)
    image = photo(50, 70, seed=10)  # neither side divisible by 4, several tiles
    [ours] = pipeline([image])
    # the pipeline edge-pads the whole image up to 52x72: the same padding, one direct run
    padded = np.pad(image, ((0, 2), (0, 2), (0, 0)), mode="edge")
    assert_matches(ours, srmodels.direct(model, padded, scale=2)[:100, :140])
    [small] = pipeline([photo(5, 7)])  # one tile: margins, then up to a multiple of 4
    assert small.shape == (10, 14, 3)


def test_options_override_what_inspection_found(tmp_path, core):
    model = srmodels.single(2, seed=9)
    folder = _prepared(tmp_path, model, {"input_range": "255", "channels": "bgr"})
    s = _settings(folder)
    assert (s["input_range"], s["output_range"], s["channels"]) == (255, 255, "bgr")
    image = photo(40, 40, seed=6)
    [ours] = _pipeline(folder, core)([image])
    assert_matches(ours, srmodels.direct(model, image, scale=2, input_range=255, bgr=True))


def test_a_folder_without_a_model_is_refused_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("weights go here")
    with pytest.raises(BadRequest, match="no model found"):
        prepare_from(tmp_path / "empty", tmp_path / "prepared")


def test_an_ir_without_its_weights_is_refused_clearly(tmp_path):
    xml = srmodels.save(srmodels.single(2), tmp_path / "m")
    xml.with_suffix(".bin").unlink()
    with pytest.raises(BadRequest, match="weights"):
        prepare_from(xml, tmp_path / "prepared")


def test_a_file_that_is_not_a_model_is_refused_clearly(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"this is not protobuf")
    with pytest.raises(BadRequest, match="cannot read"):
        prepare_from(tmp_path / "broken.onnx", tmp_path / "prepared")


def test_a_model_with_three_inputs_is_refused(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    params = [ops.parameter([1, 3, 8, 8], ov.Type.f32) for _ in range(3)]
    model = ov.Model([ops.add(ops.add(params[0], params[1]), params[2])], params)
    with pytest.raises(BadRequest, match="1 or 2 inputs"):
        prepare_from(srmodels.save(model, tmp_path / "m"), tmp_path / "prepared")


def test_an_ambiguous_layout_asks_for_the_option(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3, -1, 3], ov.Type.f32)  # channels first or last?
    model = ov.Model([ops.relu(x)], [x])
    with pytest.raises(BadRequest, match="layout=NCHW or NHWC"):
        prepare_from(srmodels.save(model, tmp_path / "m"), tmp_path / "prepared")


def test_prepared_folder_is_a_plaintext_bundle_of_the_task(tmp_path):
    folder = prepare_from(srmodels.save(srmodels.single(2), tmp_path / "src" / "x2"),
                          tmp_path / "prepared", version="5", options={"tile": TILE})
    manifest = json.loads((folder / "bundle.json").read_text())
    assert (manifest["name"], manifest["task"], manifest["version"]) == ("model", "superres",
                                                                         "5")
    assert manifest["settings"]["mode"] == "fast" and manifest["settings"]["xml"] == "model.xml"
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "model.bin", "model.xml"]


def test_handler_serves_a_scale_3_bundle_beside_the_others(tmp_path, core):
    """The task handler picks the generic pipeline from the bundle's settings and answers at
    the model's scale, alpha included."""
    from workers.superres import load

    folder = _prepared(tmp_path, srmodels.single(3, seed=3), name="mine-x3")
    handler = load([FolderBundle(folder)], core, DeviceSettings("CPU", F32))
    rgba = np.dstack([photo(30, 41, seed=8), np.full((30, 41), 200, np.uint8)])
    response = handler(request(png(rgba), model="mine-x3"), no_progress)
    assert response.result["model"] == "mine-x3"
    assert response.result["images"][0] | {} == {"width": 123, "height": 90,
                                                  "content_type": "image/png"}
    out = decode(response.media[0].data)
    assert out.shape == (90, 123, 4) and (out[..., 3] == 200).all()


def test_prepared_folder_is_reused_until_the_model_changes(tmp_path):
    src = srmodels.save(srmodels.single(2, seed=1), tmp_path / "src")
    first = prepare_from(src, tmp_path / "prepared", options={"tile": TILE})
    stamp = (first / "bundle.json").stat().st_mtime_ns
    assert prepare_from(src, tmp_path / "prepared", options={"tile": TILE}) == first
    assert (first / "bundle.json").stat().st_mtime_ns == stamp
    srmodels.save(srmodels.single(2, seed=2), tmp_path / "src")  # other weights, same name
    prepare_from(src, tmp_path / "prepared", options={"tile": TILE})
    assert (first / "bundle.json").stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_the_builtin_fast_model_brought_as_a_user_model_gives_the_same_pixels(prepared,
                                                                               tmp_path, core):
    """The shipped sr-fast-x4 IR (u8 NHWC, dynamic, radius 5) prepared with --from: other
    tiles (256 + 16 margin instead of 512 + 8), the very same pixels."""
    from workers.superres.fast import FastPipeline

    src = prepared["sr-fast-x4"]
    folder = prepare_from(src / "sr_fast_x4.xml", tmp_path / "prepared", name="again")
    s = _settings(folder)
    assert (s["scale"], s["layout"], s["input_type"], s["output_type"]) == (4, "NHWC", "u8",
                                                                             "u8")
    device = DeviceSettings("CPU", F32)
    builtin = FastPipeline.load(FolderBundle(src), core, device)
    ours = GenericPipeline.load(FolderBundle(folder), core, device)
    for image in (photo(300, 530, seed=11), photo(7, 9, seed=12)):
        np.testing.assert_array_equal(ours([image])[0], builtin([image])[0])


def test_a_users_model_does_not_become_the_default_beside_a_builtin_one(tmp_path, core):
    from workers.superres import load

    mine = _prepared(tmp_path, srmodels.single(2), name="aaa-mine")  # listed first
    builtin = tmp_path / "builtin"
    srmodels.save(srmodels.single(4, layout="NHWC", dtype="u8"), builtin, "sr_fast_x4")
    (builtin / "bundle.json").write_text(json.dumps(
        {"name": "builtin", "task": "superres", "version": "1", "settings": {"mode": "fast"}}))
    device = DeviceSettings("CPU", F32)
    both = load([FolderBundle(mine), FolderBundle(builtin)], core, device)
    assert both(request(png(photo(8, 8))), no_progress).result["model"] == "builtin"
    alone = load([FolderBundle(mine)], core, device)
    assert alone(request(png(photo(8, 8))), no_progress).result["model"] == "aaa-mine"


def test_a_users_model_the_device_cannot_run_leaves_the_others_serving(tmp_path, core):
    """Prepared elsewhere, it fails here (a corrupt IR stands in for an unsupported op): the
    task loads without it and asking for it is `model_unavailable`."""
    from edge.errors import ModelUnavailable
    from workers.superres import load

    good = _prepared(tmp_path, srmodels.single(2), name="good")
    bad = _prepared(tmp_path, srmodels.single(3), name="bad")
    (bad / "model.xml").write_text((bad / "model.xml").read_text().replace("Convolution",
                                                                           "NoSuchOp"))
    handler = load([FolderBundle(bad), FolderBundle(good)], core, DeviceSettings("CPU", F32))
    assert handler(request(png(photo(8, 8))), no_progress).result["model"] == "good"
    with pytest.raises(ModelUnavailable):
        handler(request(png(photo(8, 8)), model="bad"), no_progress)
