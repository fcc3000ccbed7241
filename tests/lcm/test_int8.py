"""The NNCF INT8 UNet bundle: same pictures as fp32 to within quantization noise."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_folder(lcm_folder):
    from tests.lcm.conftest import PREPARED
    from workers.lcm.prepare import prepare

    (folder,) = prepare(PREPARED, options={"unet": "int8"})
    return folder


def test_int8_unet_image_is_close_to_fp32(int8_folder, lcm_folder, core):
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    device = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2})
    fp32 = LCMPipeline.load(FolderBundle(lcm_folder), core, device)
    int8 = LCMPipeline.load(FolderBundle(int8_folder), ov.Core(), device)
    ops = [op.get_type_name() for op in int8._unet.get_ops()]
    assert ops.count("FakeQuantize") > 10  # it really is quantized
    for seed in (0, 1):
        a = fp32("a cat on a mat", seed=seed).pixels.astype(float)
        b = int8("a cat on a mat", seed=seed).pixels.astype(float)
        psnr = 10 * np.log10(255**2 / ((a - b) ** 2).mean())
        # measured 29-32 dB on the random-weight tiny model (bf16 both sides)
        assert psnr > 24, psnr


def test_int8_bundle_offers_no_lora(int8_folder):
    from workers.api import FolderBundle

    assert FolderBundle(int8_folder).manifest["settings"]["loras"] == {}
