"""Build the tiny LDM super-resolution bundle (build host only: torch, diffusers).

A randomly initialised `LDMSuperResolutionPipeline` (UNet 6 -> 3 channels, VQ-VAE with 3 latent
channels, DDIM) shaped like CompVis' ldm-super-resolution-4x, small enough for tests. It is
saved as OpenVINO IRs plus the VQ codebook, which is what `quality.py` runs; the parity test
rebuilds the same reference with `build_pipeline()` (seeded, so the weights are identical).
IRs are saved uncompressed: fp16 weights flip VQ codes and break parity.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
VERSION = "1"
NAME = "sr-ldm-x4-tiny"


def build_pipeline():
    """The reference diffusers pipeline with seeded random weights."""
    import torch
    from diffusers import LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(SEED)
    unet = UNet2DModel(
        in_channels=6, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16,
    )
    vqvae = VQModel(
        in_channels=3, out_channels=3, latent_channels=3, vq_embed_dim=3,
        num_vq_embeddings=128, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    pipe = LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=build_scheduler())
    return pipe.to("cpu")


def build_scheduler():
    """DDIM as CompVis' LDM-SR configures it (scaled-linear betas, steps_offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading",
    )


def build_ldm(folder: Path) -> dict:
    """Write diffusers weights, IRs, codebook and scheduler config; return the manifest."""
    import numpy as np
    import openvino as ov
    import torch

    pipe = build_pipeline()
    unet, vqvae = pipe.unet.eval().requires_grad_(False), pipe.vqvae.eval().requires_grad_(False)

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep):
            return self.unet(sample, timestep).sample

    class Decoder(torch.nn.Module):
        """post_quant_conv + decoder: the VQ lookup itself is done in numpy, in f32."""

        def __init__(self):
            super().__init__()
            self.vqvae = vqvae

        def forward(self, quant):
            return self.vqvae.decoder(self.vqvae.post_quant_conv(quant), None)

    with torch.no_grad():
        ov_unet = ov.convert_model(
            UNet(), example_input=(torch.randn(1, 6, 32, 32), torch.tensor([999])),
            input=[ov.PartialShape([1, 6, -1, -1]), (ov.PartialShape([1]), ov.Type.i64)])
        ov_dec = ov.convert_model(Decoder(), example_input=(torch.randn(1, 3, 32, 32),),
                                  input=[ov.PartialShape([1, 3, -1, -1])])
    for model, names in ((ov_unet, ("sample", "timestep")), (ov_dec, ("quant",))):
        for port, name in zip(model.inputs, names, strict=True):
            port.get_tensor().set_names({name})
    ov.save_model(ov_unet, folder / "unet.xml", compress_to_fp16=False)
    ov.save_model(ov_dec, folder / "vq_decoder.xml", compress_to_fp16=False)
    codebook = vqvae.quantize.embedding.weight.detach().numpy().astype(np.float32)
    np.save(folder / "codebook.npy", codebook, allow_pickle=False)
    (folder / "scheduler_config.json").write_text(json.dumps(dict(pipe.scheduler.config)))
    return {
        "name": NAME, "task": "superres", "version": VERSION,
        "settings": {
            "mode": "quality", "scale": 4, "unet": "unet.xml", "decoder": "vq_decoder.xml",
            "codebook": "codebook.npy", "scheduler": "scheduler_config.json",
            "latent_channels": 3, "multiple": 32, "max_input_pixels": 256 * 256,
            "weights": "random (seed 0): a structural stand-in for ldm-super-resolution-4x",
            "reference": "workers.superres.ldm_build.build_pipeline() (same seed)",
        },
    }
