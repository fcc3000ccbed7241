"""The NNCF INT8 bundle (UNet + VAE decoder): same pictures as fp32 to within quantization noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_folder(lcm_folder):
    from tests.lcm.conftest import PREPARED
    from workers.lcm.prepare import prepare

    (folder,) = prepare(PREPARED, options={"unet": "int8"})
    return folder


def _int8_weights(model) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == "Constant"
               and op.get_output_element_type(0).get_type_name() == "i8")


def test_int8_bundle_quantizes_unet_and_vae_decoder(int8_folder, core):
    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    bundle = FolderBundle(int8_folder)
    assert bundle.manifest["settings"]["int8"] == ["unet", "vae_decoder"]
    int8 = LCMPipeline.load(bundle, core, DeviceSettings("CPU"))
    for model in (int8._unet, int8._vae):
        ops = [op.get_type_name() for op in model.get_ops()]
        assert ops.count("FakeQuantize") > 10
        assert _int8_weights(model) > 10


def test_int8_image_is_close_to_fp32(int8_folder, lcm_folder, core):
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    device = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2})
    fp32 = LCMPipeline.load(FolderBundle(lcm_folder), core, device)
    int8 = LCMPipeline.load(FolderBundle(int8_folder), ov.Core(), device)
    for seed in (0, 1):
        a = fp32("a cat on a mat", seed=seed).pixels
        b = int8("a cat on a mat", seed=seed).pixels
        # measured 28.9 / 30.4 dB on the random-weight tiny model (bf16 both sides); the INT8
        # UNet alone gives 28.9 / 30.6 dB: the UNet's error dominates
        assert _psnr(a, b) > 24


def test_int8_vae_decoder_alone_is_close_to_fp32(int8_folder, lcm_folder, core):
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    device = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2})
    fp32 = LCMPipeline.load(FolderBundle(lcm_folder), core, device)
    int8 = LCMPipeline.load(FolderBundle(int8_folder), ov.Core(), device)
    embeds = fp32._text_encoder(fp32.tokenize("a cat on a mat")[0])[0]
    for seed in (0, 1):
        latents = fp32.denoise(embeds, steps=4, seed=seed, guidance_scale=8.0, width=64,
                               height=64)
        # measured 43.7 / 41.5 dB on tiny; 41.7-42.0 dB on SD1.5 at 512x512
        assert _psnr(fp32.decode(latents), int8.decode(latents)) > 35


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return float(10 * np.log10(255**2 / mse))


def test_int8_bundle_offers_no_lora(int8_folder):
    from workers.api import FolderBundle

    assert FolderBundle(int8_folder).manifest["settings"]["loras"] == {}


def test_folder_from_an_older_recipe_is_rebuilt(lcm_folder, tmp_path):
    from tests.lcm.conftest import PREPARED
    from workers.lcm.prepare import prepare, reference_dir

    (tmp_path / "_reference").mkdir()
    (tmp_path / "_reference" / "lcm-tiny-seed0").symlink_to(reference_dir(PREPARED))
    stale = tmp_path / "lcm-tiny"
    stale.mkdir()
    (stale / "bundle.json").write_text(json.dumps({"name": "lcm-tiny", "version": "1+tiny.seed0"}))

    (folder,) = prepare(tmp_path)

    assert folder == stale
    assert json.loads((folder / "bundle.json").read_text())["version"] == \
        json.loads((lcm_folder / "bundle.json").read_text())["version"]
    assert (folder / "unet.xml").is_file() and (folder / "vae_decoder.xml").is_file()
