"""Build-host only: random-weight LCM pipelines in diffusers, the CLIP tokenizer, a demo LoRA.

Imports torch/diffusers/transformers lazily; never imported by runtime code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the real CLIP tokenizer (77 tokens), built once for the tokenize and lcm tasks alike
from workers.tokenize.prepare import build_clip as clip_tokenizer  # noqa: F401

#: LCM-Dreamshaper-v7's scheduler config (the values a real LCM checkpoint ships).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

# Component sizes. "tiny" is what tests use; "sd15" is the SD1.5 architecture for benchmarks.
ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            time_cond_proj_dim=32,
        ),
        # four blocks: the real SD VAE's 8x spatial factor, so sizes behave as on SD1.5
        "vae": dict(
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=64,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                     num_hidden_layers=2, projection_dim=32),
        "size": 64,
    },
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            time_cond_proj_dim=256,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=512,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                     num_hidden_layers=12, projection_dim=768),
        "size": 512,
    },
}


def build_pipeline(arch: str = "tiny", seed: int = 0) -> Any:
    """A randomly initialised diffusers LatentConsistencyModelPipeline, same weights per seed."""
    import torch
    from diffusers import (
        AutoencoderKL,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = ARCHS[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.18215, **spec["vae"])
    # transformers 5 configs are dataclasses made by huggingface_hub's @strict at runtime, which
    # type checkers do not see: mypy knows only PreTrainedConfig's fields
    text = CLIPTextModel(CLIPTextConfig(  # type: ignore[call-arg]  # see above
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="quick_gelu", **spec["text"]))
    _scale_random_weights(unet)
    return LatentConsistencyModelPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=LCMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _scale_random_weights(unet: Any) -> None:
    """Give the UNet's zero-initialised output layers random weights.

    diffusers zero-initialises nothing in UNet2DConditionModel, but its conv_out/proj_out
    defaults give a near-identity denoiser on random weights; a little extra spread makes the
    tiny model's images depend visibly on prompt, seed and LoRA (what tests check).
    """
    import torch

    with torch.no_grad():
        unet.conv_out.weight.mul_(4.0)


def save_demo_lora(pipe: Any, path: Path, rank: int = 4, alpha: int = 8, seed: int = 1) -> None:
    """A random LoRA on the UNet's attention projections, saved the way diffusers saves one."""
    import torch
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft zero-inits B: give it weights so the LoRA changes the output
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # the full peft config, as diffusers' training scripts save it (load_lora_weights needs it)
    meta = unet.peft_config["default"].to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    LatentConsistencyModelPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=state, weight_name=path.name,
        unet_lora_adapter_metadata=meta, safe_serialization=True)
    unet.delete_adapters(unet.active_adapters())


def describe(path: Path) -> str:
    """One line about a safetensors file's keys (debug aid for prepare logs)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        keys = list(f.keys())
    return json.dumps({"tensors": len(keys), "first": keys[:2]})
