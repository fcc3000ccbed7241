"""Latent Consistency Model text-to-image on ov.Core, from (decrypted-in-memory) bundle bytes.

    pipe = LCMPipeline.load(bundle, core, device)
    result = pipe("a lighthouse at dusk", steps=4, seed=7)   # result.pixels: uint8 [H, W, 3]

Flow: CLIP tokenizer IR -> text encoder -> `steps` UNet calls with the numpy LCM scheduler ->
VAE decoder. Randomness: `numpy.random.Generator(PCG64(seed))`, `standard_normal(float32)`;
the first draw is the initial latents [1, C, h, w], then one draw of the same shape per step
except the last (the LCM re-noising). Callers may pass `noise` instead (parity tests pass
torch's draws). An empty prompt is allowed: like diffusers it encodes `[BOS, EOS]` + padding,
which gives an unconditioned image.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov

from workers.api import BundleLike, DeviceSettings, read_ir
from workers.lcm import lora as _lora
from workers.lcm.scheduler import LCMScheduler, guidance_embedding

# (step index, steps, latents after the step, denoised x0 estimate)
StepHook = Callable[[int, int, np.ndarray, np.ndarray], None]
_SPECIAL_LITERALS = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True, slots=True)
class LCMResult:
    """One generated image and what the client should know about how it was made."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    truncated: bool  # the prompt was cut at the text encoder's 77 tokens
    tokens: int  # prompt tokens before truncation, BOS/EOS included


class LRU:
    """A small bounded cache of compiled models keyed by shape (and LoRA)."""

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value for key, made (and the oldest dropped) on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class LCMPipeline:
    """Text -> image with a Latent Consistency Model bundle."""

    def __init__(self, settings: Mapping[str, Any], core: ov.Core, device: DeviceSettings,
                 tokenizer: ov.CompiledModel, text_encoder: ov.CompiledModel, unet: ov.Model,
                 vae: ov.Model, loras: Mapping[str, bytes], cache_size: int = 4) -> None:
        self.settings = settings
        self.scheduler = LCMScheduler.from_config(settings["scheduler"])
        self._core, self._device = core, device
        self._tokenizer, self._text_encoder = tokenizer, text_encoder
        self._unet, self._vae = unet, vae
        self._loras = loras
        self._deltas = LRU(2)  # parsed LoRA deltas (f32 arrays as big as the LoRA'd layers)
        self._unets = LRU(cache_size)  # (h, w, lora, weight) -> compiled UNet
        self._vaes = LRU(cache_size)  # (h, w) -> compiled VAE decoder

    @classmethod
    def load(cls, bundle: BundleLike, core: ov.Core, device: DeviceSettings,
             cache_size: int = 4) -> LCMPipeline:
        """Read every component from the bundle (in memory) and compile what has a fixed shape."""
        import openvino_tokenizers

        # importing registers the ops only for Cores made afterwards: add them to this one
        core.add_extension(str(openvino_tokenizers._ext_path))
        settings = bundle.manifest["settings"]
        files = settings["files"]
        tokenizer = core.compile_model(read_ir(core, bundle, files["tokenizer"]), "CPU")
        text = read_ir(core, bundle, files["text_encoder"])
        text.reshape({text.inputs[0]: [1, settings["max_tokens"]]})
        text_encoder = core.compile_model(text, device.name, dict(device.properties))
        unet = read_ir(core, bundle, files["unet"])
        vae = read_ir(core, bundle, files["vae_decoder"])
        loras = {name: bytes(bundle.read(file)) for name, file in settings.get("loras", {}).items()}
        return cls(settings, core, device, tokenizer, text_encoder, unet, vae, loras, cache_size)

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The LoRAs packed in the bundle."""
        return tuple(self._loras)

    def __call__(self, prompt: str, *, steps: int = 4, seed: int = 0, guidance_scale: float = 8.0,
                 width: int | None = None, height: int | None = None, lora: str | None = None,
                 lora_weight: float = 1.0, noise: Sequence[np.ndarray] | None = None,
                 on_step: StepHook | None = None) -> LCMResult:
        """Generate one image. Sizes must be checked by the caller (`check_size`)."""
        width = width or int(self.settings["default_width"])
        height = height or int(self.settings["default_height"])
        ids, tokens = self.tokenize(prompt)
        embeds = self._text_encoder(ids)[0]
        uncond = (self._text_encoder(self.tokenize("")[0])[0]
                  if self.uses_cfg(guidance_scale) else None)
        denoised = self.denoise(embeds, steps=steps, seed=seed, guidance_scale=guidance_scale,
                                width=width, height=height, lora=lora, lora_weight=lora_weight,
                                noise=noise, on_step=on_step, uncond_embeds=uncond)
        pixels = self.decode(denoised)
        return LCMResult(pixels, tokens > self.settings["max_tokens"], tokens)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether a step runs the UNet twice (classifier-free guidance).

        An LCM-distilled UNet takes the guidance scale as an embedding (`timestep_cond`) and
        never needs CFG. A plain SD UNet with an LCM-LoRA fused in has no such input: like
        diffusers' StableDiffusionPipeline with an LCMScheduler, it runs CFG when the scale is
        above 1 (LCM-LoRA wants 1 = off, or up to 2).
        """
        return not self.settings.get("time_cond_proj_dim") and guidance_scale > 1.0

    def tokenize(self, prompt: str) -> tuple[np.ndarray, int]:
        """CLIP ids [1, 77] (truncated like HF: first 76 tokens + EOS, EOS-padded), token count."""
        text = unicodedata.normalize("NFC", prompt or "").lower()
        for literal in _SPECIAL_LITERALS:  # HF maps these to special ids, OV would split them
            text = text.replace(literal, " ")
        ids = self._tokenizer([text])["input_ids"][0].astype(np.int64)
        limit, eos = int(self.settings["max_tokens"]), int(self.settings["eos_token_id"])
        count = len(ids)
        if count > limit:
            ids = np.concatenate([ids[: limit - 1], [eos]])
        padded = np.full((1, limit), int(self.settings["pad_token_id"]), dtype=np.int64)
        padded[0, : len(ids)] = ids
        return padded, count

    def denoise(self, embeds: np.ndarray, *, steps: int, seed: int, guidance_scale: float,
                width: int, height: int, lora: str | None = None, lora_weight: float = 1.0,
                noise: Sequence[np.ndarray] | None = None,
                on_step: StepHook | None = None,
                uncond_embeds: np.ndarray | None = None) -> np.ndarray:
        """The LCM multistep loop; returns the final denoised latents [1, C, h, w].

        `uncond_embeds` (the empty prompt's) turns on classifier-free guidance (see `uses_cfg`).
        """
        scale = int(self.settings["vae_scale_factor"])
        shape = (1, int(self.settings["latent_channels"]), height // scale, width // scale)
        draws = _noise_source(shape, seed, noise)
        timesteps = self.scheduler.timesteps(steps)
        unet = self._compiled_unet(height, width, lora, lora_weight).create_infer_request()
        cond_dim = self.settings.get("time_cond_proj_dim")
        extra = ({"timestep_cond": guidance_embedding(guidance_scale, int(cond_dim))}
                 if cond_dim else {})
        latents = next(draws)  # init_noise_sigma is 1 for LCM
        denoised = latents
        for i, t in enumerate(timesteps):
            inputs = {"sample": latents, "timestep": np.array([t], dtype=np.int64), **extra}
            pred = next(iter(unet.infer({**inputs, "encoder_hidden_states": embeds}).values()))
            if uncond_embeds is not None:
                pred_u = next(iter(unet.infer(
                    {**inputs, "encoder_hidden_states": uncond_embeds}).values()))
                pred = pred_u + np.float32(guidance_scale) * (pred - pred_u)
            step_noise = next(draws) if i < len(timesteps) - 1 else None
            latents, denoised = self.scheduler.step(pred, timesteps, i, latents, step_noise)
            if on_step is not None:
                on_step(i, len(timesteps), latents, denoised)
        return denoised

    def decode(self, denoised: np.ndarray) -> np.ndarray:
        """VAE decode to uint8 [H, W, 3] (diffusers' postprocess: [-1,1] -> round(x*255))."""
        _, _, h, w = denoised.shape
        vae = self._vaes.get((h, w), lambda: self._compile(self._vae, [1, denoised.shape[1], h, w]))
        image = vae(denoised / np.float32(self.settings["scaling_factor"]))[0][0]
        image = np.clip(image * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
        return np.round(image.transpose(1, 2, 0) * 255.0).astype(np.uint8)

    def _compiled_unet(self, height: int, width: int, lora: str | None,
                       weight: float) -> ov.CompiledModel:
        scale = int(self.settings["vae_scale_factor"])
        shape = [1, int(self.settings["latent_channels"]), height // scale, width // scale]
        key = (height, width, lora, float(weight) if lora else None)

        def make() -> ov.CompiledModel:
            model = self._unet
            if lora is not None:
                model = _lora.merge(model, self._lora_deltas(lora), weight)
            return self._compile(model, shape)

        return self._unets.get(key, make)

    def _lora_deltas(self, name: str) -> Mapping[str, np.ndarray]:
        if name not in self._loras:
            raise KeyError(name)
        return self._deltas.get(name, lambda: _lora.lora_deltas(
            _lora.read_safetensors(self._loras[name])))

    def _compile(self, model: ov.Model, sample_shape: list[int]) -> ov.CompiledModel:
        """Static shapes compile faster code; reshape a clone so the base model stays dynamic."""
        model = model.clone()
        shapes = {}
        for port in model.inputs:
            pshape = port.get_partial_shape()
            if port.any_name in ("sample", "latent_sample"):
                shapes[port] = sample_shape
            elif pshape.rank.is_static:
                shapes[port] = [1 if d.is_dynamic else d.get_length() for d in pshape]
        model.reshape(shapes)
        return self._core.compile_model(model, self._device.name, dict(self._device.properties))


def _noise_source(shape: tuple[int, ...], seed: int,
                  given: Sequence[np.ndarray] | None) -> Any:
    """Yield the initial latents, then per-step noise (given arrays, or PCG64 draws)."""
    if given is not None:
        for arr in given:
            yield np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        raise ValueError("not enough noise arrays for the requested steps")
    rng = np.random.Generator(np.random.PCG64(seed))
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)
