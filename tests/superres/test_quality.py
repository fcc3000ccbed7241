"""Quality mode (LDM-SR): parity with diffusers on the same weights, seed and steps."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import PayloadTooLarge
from tests.superres.conftest import F32, decode, photo, png, request
from workers.api import DeviceSettings, FolderBundle, no_progress

# f32 OpenVINO vs f32 torch on the same weights: measured ~1e-6; a VQ code flip would be ~0.1.
TOLERANCE = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 4])
def test_quality_mode_matches_diffusers(prepared, core, steps):
    import torch

    from workers.superres.ldm_build import build_pipeline
    from workers.superres.quality import LdmPipeline

    reference = build_pipeline()
    ours = LdmPipeline.load(FolderBundle(prepared["sr-ldm-x4-tiny"]), core,
                            DeviceSettings("CPU", F32))
    image = torch.from_numpy(photo(32, 64).transpose(2, 0, 1)[None].astype(np.float32))
    image = image / 255 * 2 - 1
    want = reference(image, num_inference_steps=steps, eta=0.0, output_type="np",
                     generator=torch.Generator().manual_seed(7)).images[0]
    # the same noise the reference drew (its RNG, injected into our loop)
    noise = torch.randn((1, 3, 32, 64), generator=torch.Generator().manual_seed(7)).numpy()
    got = ours.run(image.numpy(), noise, steps)[0].transpose(1, 2, 0)
    assert got.shape == want.shape == (128, 256, 3)
    assert np.abs(got - want).max() < TOLERANCE


@pytest.mark.slow
def test_quality_mode_reports_every_step_and_keeps_odd_sizes(handler):
    events = []
    response = handler(request(png(photo(20, 36)), mode="quality", steps=3, seed=1), events.append)
    assert response.result["model"] == "sr-ldm-x4-tiny"
    assert decode(response.media[0].data).shape == (80, 144, 3)
    assert [e["step"] for e in events] == [1, 2, 3]


@pytest.mark.slow
def test_quality_mode_is_reproducible_by_seed(handler):
    def run(seed):
        return handler(request(png(photo(16, 16)), mode="quality", steps=2, seed=seed),
                       no_progress).media[0].data

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_quality_mode_refuses_images_past_its_limit(handler):
    with pytest.raises(PayloadTooLarge, match="mode=fast"):
        handler(request(png(photo(300, 300)), mode="quality", steps=1), no_progress)


@pytest.mark.parametrize("steps", [1, 3, 20, 50])
def test_ddim_schedule_matches_diffusers_scheduler(steps):
    import torch

    from workers.superres.ldm_build import build_scheduler
    from workers.superres.quality import DdimSchedule

    reference = build_scheduler()
    reference.set_timesteps(steps)
    ours = DdimSchedule.from_config(dict(reference.config), steps)
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen)
    for t in reference.timesteps:
        want = reference.step(eps, t, x).prev_sample.numpy()
        assert np.abs(ours.step(eps.numpy(), int(t), x.numpy()) - want).max() < 1e-5
