"""Parity with diffusers' LatentConsistencyModelPipeline on the same tiny weights.

Tolerance: with f32 inference the images agree to one 8-bit level (rounding of values that
land on .5 after tiny float differences), on at most 0.5% of the pixels; the per-step
denoised latents agree to 1e-3 (absolute) on latents of magnitude ~100.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _reference_run(reference, prompt, *, steps, width, height, seed, guidance, lora_scale=None):
    """diffusers' image, its per-step denoised latents, and its torch noise draws (in order)."""
    seen = []

    def on_step(pipe, i, t, kwargs):
        seen.append(kwargs["denoised"].numpy().copy())
        return {}

    gen = torch.Generator().manual_seed(seed)
    image = reference(prompt, num_inference_steps=steps, width=width, height=height,
                      generator=gen, guidance_scale=guidance, output_type="np",
                      callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["denoised"]).images[0]
    # diffusers draws the initial latents, then one noise tensor per step but the last
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 4, height // 8, width // 8)
    noise = [torch.randn(shape, generator=gen).numpy() for _ in range(steps)]
    return np.round(image * 255).astype(np.uint8), seen, noise


def _assert_same(ours, ours_steps, ref, ref_steps):
    step_diffs = [float(np.abs(a - b).max()) for a, b in zip(ours_steps, ref_steps)]
    diff = np.abs(ours.astype(int) - ref.astype(int))
    detail = f"per-step denoised max abs diff: {step_diffs}"
    assert ours.shape == ref.shape
    assert max(step_diffs) < 1e-3, detail
    assert diff.max() <= 1, detail
    assert (diff > 0).mean() <= 0.005, detail


@pytest.mark.parametrize("prompt,steps,width,height,guidance", [
    (PROMPT, 4, 64, 64, 8.0),
    (PROMPT, 1, 96, 64, 8.0),
    ("a cat", 8, 64, 128, 2.5),
    ("", 2, 64, 64, 8.0),  # empty prompt: an unconditioned image, as diffusers makes it
    ("word " * 120, 3, 64, 64, 8.0),  # past 77 tokens: both truncate the same way
])
def test_image_matches_diffusers(pipeline, reference, prompt, steps, width, height, guidance):
    ref, ref_steps, noise = _reference_run(reference, prompt, steps=steps, width=width,
                                           height=height, seed=11, guidance=guidance)
    ours_steps = []
    result = pipeline(prompt, steps=steps, width=width, height=height, guidance_scale=guidance,
                      noise=noise, on_step=lambda i, n, lat, den: ours_steps.append(den))
    _assert_same(result.pixels, ours_steps, ref, ref_steps)
    assert len(ours_steps) == steps


def test_tokenizer_matches_diffusers_tokenizer_call(pipeline, reference):
    for prompt in ("a red fox", "", "Hello, World! 3.14 naïve café", "word " * 100):
        ids, _ = pipeline.tokenize(prompt)
        expected = reference.tokenizer(prompt, padding="max_length", max_length=77,
                                       truncation=True).input_ids
        assert ids[0].tolist() == expected, prompt


def test_lora_matches_diffusers_fused_lora(lcm_folder, pipeline):
    from diffusers import LatentConsistencyModelPipeline

    from workers.lcm.prepare import reference_dir
    from tests.lcm.conftest import PREPARED

    fused = LatentConsistencyModelPipeline.from_pretrained(reference_dir(PREPARED),
                                                           local_files_only=True)
    fused.set_progress_bar_config(disable=True)
    fused.load_lora_weights(str(lcm_folder), weight_name="lora_demo.safetensors",
                            adapter_name="demo")
    fused.fuse_lora(lora_scale=0.7)
    fused.unload_lora_weights()
    ref, ref_steps, noise = _reference_run(fused, PROMPT, steps=4, width=64, height=64,
                                           seed=5, guidance=8.0)
    ours_steps = []
    result = pipeline(PROMPT, steps=4, width=64, height=64, guidance_scale=8.0, noise=noise,
                      lora="demo", lora_weight=0.7,
                      on_step=lambda i, n, lat, den: ours_steps.append(den))
    _assert_same(result.pixels, ours_steps, ref, ref_steps)
    plain = pipeline(PROMPT, steps=4, width=64, height=64, guidance_scale=8.0, noise=noise)
    assert np.abs(plain.pixels.astype(int) - ref.astype(int)).mean() > 2  # the LoRA mattered
