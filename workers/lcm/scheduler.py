"""The Latent Consistency Model multistep scheduler in numpy (diffusers' `LCMScheduler` maths).

One LCM step: predict x0 from the UNet's epsilon, apply the consistency boundary condition
(`denoised = c_out * x0 + c_skip * x_t`), then re-noise to the next timestep with fresh noise,
except at the last step. All float32 like the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class LCMScheduler:
    """Timesteps and per-step coefficients from a diffusers scheduler config."""

    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    num_train_timesteps: int
    original_inference_steps: int
    timestep_scaling: float
    prediction_type: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LCMScheduler:
        """Build from `scheduler_config.json` values (never trust defaults: read the config)."""
        n = int(config.get("num_train_timesteps", 1000))
        betas = _betas(config, n)
        if config.get("rescale_betas_zero_snr", False) or config.get("trained_betas"):
            raise ValueError("rescale_betas_zero_snr / trained_betas are not supported")
        if config.get("thresholding", False) or config.get("clip_sample", False):
            raise ValueError("thresholding / clip_sample are not supported")
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, n, int(config.get("original_inference_steps", 50)),
                   float(config.get("timestep_scaling", 10.0)),
                   str(config.get("prediction_type", "epsilon")))

    def timesteps(self, steps: int) -> np.ndarray:
        """The `steps` timesteps (descending), evenly spaced over the distillation schedule."""
        if not 1 <= steps <= self.original_inference_steps:
            raise ValueError(f"steps must be in 1..{self.original_inference_steps}")
        k = self.num_train_timesteps // self.original_inference_steps
        origin = (np.arange(1, self.original_inference_steps + 1) * k - 1)[::-1]
        index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        return origin[index].astype(np.int64)

    def step(self, model_output: np.ndarray, timesteps: np.ndarray, index: int,
             sample: np.ndarray, noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One step at `timesteps[index]`: returns (next sample, denoised x0 estimate).

        `noise` (standard normal, sample's shape) is used for every step but the last.
        """
        t = int(timesteps[index])
        last = index == len(timesteps) - 1
        prev_t = t if last else int(timesteps[index + 1])
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(self.final_alpha_cumprod)
        b_t, b_prev = np.float32(1) - a_t, np.float32(1) - a_prev
        c_skip, c_out = self.boundary_scalings(t)
        if self.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif self.prediction_type == "sample":
            x0 = model_output
        elif self.prediction_type == "v_prediction":
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        denoised = (c_out * x0 + c_skip * sample).astype(np.float32)
        if last:
            return denoised, denoised
        if noise is None:
            raise ValueError("noise is required for every step but the last")
        prev = np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * noise
        return prev.astype(np.float32), denoised

    def boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """c_skip, c_out of the consistency boundary condition (sigma_data = 0.5)."""
        sigma_data = 0.5
        scaled = t * self.timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return np.float32(c_skip), np.float32(c_out)


def guidance_embedding(guidance_scale: float, dim: int) -> np.ndarray:
    """LCM's w(t) embedding of (guidance_scale - 1), shape [1, dim] (replaces classifier-free guidance)."""
    w = np.float32((guidance_scale - 1.0) * 1000.0)
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / (half - 1)))
    emb = w * freq.astype(np.float32)
    out = np.concatenate([np.sin(emb), np.cos(emb)])
    if dim % 2:
        out = np.pad(out, (0, 1))
    return out[None, :].astype(np.float32)


def _betas(config: Mapping[str, Any], n: int) -> np.ndarray:
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        return (np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2).astype(np.float32)
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float32)
    raise ValueError(f"unsupported beta_schedule {schedule!r}")
