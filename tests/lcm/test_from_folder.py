"""`edgectl prepare lcm --from FOLDER`: the user's own LCM checkpoint, converted and checked.

No real weights exist offline, so each test saves a small random pipeline the way its owner
would have it on disk and prepares that:

* (a) a diffusers LCM folder (`save_pretrained` of a LatentConsistencyModelPipeline), with two
  per-request LoRAs packed: one in peft/diffusers naming, the same one in kohya naming;
* (b) an SD1.5-layout folder (StableDiffusionPipeline, PNDM scheduler, a UNet without
  `time_cond_proj_dim`) plus an "LCM-LoRA" in kohya naming, fused at pack time;
* (c) an optimum-intel OpenVINO export of (a) (`main_export(task="text-to-image")`, optimum's
  defaults, as `optimum-cli export openvino` writes it), and an fp16 export of it serving the
  kohya LoRA per request (f16 weights: images within 6 levels, mean <= 1; measured 3 / 0.38).

References: diffusers on the same weights. (a), (c): LatentConsistencyModelPipeline, the
tolerance of test_parity.py (images to one 8-bit level on <= 0.5% of pixels, per-step denoised
latents to 1e-3). (b): StableDiffusionPipeline with `LCMScheduler.from_config` and the LoRA
loaded by diffusers' own kohya loader and fused, the LCM-LoRA recipe, at guidance 1 (no CFG)
and 1.5 (CFG); per-step latents to 2e-5 relative (measured 1.1e-5 / 1.4e-5), the image as above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.lcm.conftest import F32
from tests.lcm.test_parity import PROMPT, _assert_same, _reference_run

pytestmark = pytest.mark.slow

SEED = 3


def to_kohya(peft_file: Path, out: Path) -> None:
    """Rewrite a diffusers/peft LoRA file in kohya's naming (what sd-scripts would save)."""
    from safetensors.numpy import save_file

    from workers.lcm import lora

    parsed = lora.read_safetensors(peft_file.read_bytes())
    config = json.loads(parsed.metadata["lora_adapter_metadata"])
    alpha = float(config.get("unet.lora_alpha", config.get("lora_alpha")))
    tensors = {}
    for key, value in parsed.tensors.items():
        for peft, kohya in ((".lora_A.weight", ".lora_down.weight"),
                            (".lora_B.weight", ".lora_up.weight"),
                            (".lora.down.weight", ".lora_down.weight"),
                            (".lora.up.weight", ".lora_up.weight")):
            if key.endswith(peft):
                module = key[len("unet."):-len(peft)].replace(".", "_")
                tensors[f"lora_unet_{module}{kohya}"] = value
                tensors[f"lora_unet_{module}.alpha"] = np.array(alpha, np.float32)
    assert len(tensors) == len(parsed.tensors) * 3 // 2
    save_file(tensors, str(out))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    return tmp_path_factory.mktemp("own-lcm")


@pytest.fixture(scope="module")
def lcm_source(root) -> Path:
    """(a) on disk: a tiny LCM pipeline, its demo LoRA (peft naming) and the same in kohya."""
    from workers.lcm._build import build_pipeline, save_demo_lora

    src = root / "my-lcm-src"
    pipe = build_pipeline("tiny", SEED)
    pipe.save_pretrained(str(src))
    save_demo_lora(pipe, root / "loras" / "style.safetensors")
    to_kohya(root / "loras" / "style.safetensors", root / "loras" / "style_kohya.safetensors")
    return src


@pytest.fixture(scope="module")
def lcm_folder(root, lcm_source) -> Path:
    from workers.lcm.prepare import prepare_from

    loras = f"{root}/loras/style.safetensors,{root}/loras/style_kohya.safetensors"
    return prepare_from(lcm_source, root / "cache", name="my-lcm", version="2",
                        options={"loras": loras})


@pytest.fixture(scope="module")
def lcm_reference(lcm_source):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(lcm_source), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(folder: Path):
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    return LCMPipeline.load(FolderBundle(folder), ov.Core(), DeviceSettings("CPU", F32))


def _run(pipe, prompt, noise, **kw):
    steps = []
    result = pipe(prompt, noise=noise, on_step=lambda i, n, lat, den: steps.append(den), **kw)
    return result.pixels, steps


def test_diffusers_lcm_folder_matches_diffusers(lcm_folder, lcm_reference):
    from workers.api import FolderBundle

    bundle = FolderBundle(lcm_folder)
    assert (bundle.name, bundle.manifest["task"], bundle.manifest["version"]) == (
        "my-lcm", "lcm", "2")
    assert bundle.manifest["settings"]["loras"] == {
        "style": "lora_style.safetensors", "style_kohya": "lora_style_kohya.safetensors"}
    ours = _ours(lcm_folder)
    for steps, w, h in ((4, 64, 64), (2, 96, 64)):
        ref, ref_steps, noise = _reference_run(lcm_reference, PROMPT, steps=steps, width=w,
                                               height=h, seed=11, guidance=8.0)
        pixels, our_steps = _run(ours, PROMPT, noise, steps=steps, width=w, height=h)
        _assert_same(pixels, our_steps, ref, ref_steps)


def test_kohya_and_peft_files_merge_to_the_same_weights(lcm_folder):
    import openvino as ov

    from workers.lcm import lora

    unet = ov.Core().read_model(str(lcm_folder / "unet.xml"))
    merged = {}
    for name in ("style", "style_kohya"):
        data = (lcm_folder / f"lora_{name}.safetensors").read_bytes()
        model = lora.merge(unet, lora.lora_deltas(lora.read_safetensors(data)), 0.7)
        merged[name] = {op.get_friendly_name(): op.get_data().copy() for op in model.get_ops()
                        if op.get_type_name() == "Constant"}
    base = {op.get_friendly_name(): op.get_data() for op in unet.get_ops()
            if op.get_type_name() == "Constant"}
    changed = [k for k in base if base[k].shape == merged["style"][k].shape
               and not np.array_equal(base[k], merged["style"][k])]
    assert len(changed) == 32  # to_q/k/v/out.0 of the tiny UNet's 8 attention blocks
    assert merged["style"].keys() == merged["style_kohya"].keys()
    for k in merged["style"]:
        np.testing.assert_array_equal(merged["style"][k], merged["style_kohya"][k], err_msg=k)


def test_kohya_lora_per_request_matches_diffusers_fused_lora(root, lcm_folder, lcm_source):
    """The kohya file, picked per request (`lora=`), against diffusers loading the peft one."""
    from diffusers import LatentConsistencyModelPipeline

    fused = LatentConsistencyModelPipeline.from_pretrained(str(lcm_source), local_files_only=True)
    fused.set_progress_bar_config(disable=True)
    fused.load_lora_weights(str(root / "loras"), weight_name="style.safetensors",
                            adapter_name="style")
    fused.fuse_lora(lora_scale=0.7)
    fused.unload_lora_weights()
    ref, ref_steps, noise = _reference_run(fused, PROMPT, steps=4, width=64, height=64, seed=5,
                                           guidance=8.0)
    ours = _ours(lcm_folder)
    kohya, kohya_steps = _run(ours, PROMPT, noise, steps=4, width=64, height=64,
                              lora="style_kohya", lora_weight=0.7)
    peft, _ = _run(ours, PROMPT, noise, steps=4, width=64, height=64, lora="style",
                   lora_weight=0.7)
    _assert_same(kohya, kohya_steps, ref, ref_steps)
    np.testing.assert_array_equal(kohya, peft)
    plain, _ = _run(ours, PROMPT, noise, steps=4, width=64, height=64)
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() > 2  # the LoRA mattered


@pytest.fixture(scope="module")
def sd_source(root) -> tuple[Path, Path]:
    """(b) on disk: a tiny SD1.5-layout pipeline (no time_cond_proj_dim, PNDM scheduler) and a
    random LoRA on its attention in kohya naming (the "LCM-LoRA")."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from workers.lcm._build import ARCHS, build_pipeline, save_demo_lora

    lcm = build_pipeline("tiny", SEED)
    torch.manual_seed(SEED + 1)
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in ARCHS["tiny"]["unet"].items() if k != "time_cond_proj_dim"}
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **config)
    with torch.no_grad():
        unet.conv_out.weight.mul_(4.0)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1)
    sd = StableDiffusionPipeline(vae=lcm.vae, text_encoder=lcm.text_encoder,
                                 tokenizer=lcm.tokenizer, unet=unet, scheduler=scheduler,
                                 safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    src = root / "my-sd-src"
    sd.save_pretrained(str(src))
    save_demo_lora(sd, root / "lcm_lora" / "peft.safetensors", seed=SEED + 2)
    to_kohya(root / "lcm_lora" / "peft.safetensors", root / "lcm_lora" / "lcm-lora.safetensors")
    return src, root / "lcm_lora" / "lcm-lora.safetensors"


def _sd_reference_run(pipe, prompt, *, steps, size, seed, guidance):
    """StableDiffusionPipeline's image, per-step latents and torch noise draws (in order)."""
    import torch

    seen = []

    def on_step(p, i, t, kwargs):
        seen.append(kwargs["latents"].numpy().copy())
        return {}

    gen = torch.Generator().manual_seed(seed)
    image = pipe(prompt, num_inference_steps=steps, width=size, height=size, generator=gen,
                 guidance_scale=guidance, output_type="np", callback_on_step_end=on_step,
                 callback_on_step_end_tensor_inputs=["latents"]).images[0]
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn((1, 4, size // 8, size // 8), generator=gen).numpy()
             for _ in range(steps)]
    return np.round(image * 255).astype(np.uint8), seen, noise


def _assert_close(ours, ours_steps, ref, ref_steps):
    """(b)'s tolerance: per-step latents to 2e-5 of their magnitude (they reach ~100, so
    ~2e-3 absolute: the LoRA is fused in numpy f64 -> f32 where diffusers adds in torch f32,
    and CFG scales the difference of two predictions); the image as in test_parity.py."""
    rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours_steps, ref_steps,
                                                                          strict=True)]
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert max(rel) < 2e-5, rel
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, rel


def test_sd15_folder_with_kohya_lcm_lora_matches_diffusers_recipe(root, sd_source):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from workers.lcm.prepare import prepare_from

    src, lcm_lora = sd_source
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        prepare_from(src, root / "cache", name="plain-sd")  # no LCM-LoRA: refused
    folder = prepare_from(src, root / "cache", name="my-sd-lcm",
                          options={"lora": str(lcm_lora)})
    settings = json.loads((folder / "bundle.json").read_text())["settings"]
    assert settings["time_cond_proj_dim"] is None
    assert settings["scheduler"]["set_alpha_to_one"] is False  # read from the PNDM config

    ref_pipe = StableDiffusionPipeline.from_pretrained(str(src), local_files_only=True,
                                                       safety_checker=None)
    ref_pipe.scheduler = LCMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.load_lora_weights(str(lcm_lora.parent), weight_name=lcm_lora.name,
                               adapter_name="lcm")
    ref_pipe.fuse_lora()
    ref_pipe.unload_lora_weights()
    ref_pipe.set_progress_bar_config(disable=True)
    ours = _ours(folder)
    for steps, guidance in ((4, 1.0), (3, 1.5)):  # 1.0: no CFG; 1.5: CFG, two UNet passes
        assert ours.uses_cfg(guidance) == (guidance > 1)
        ref, ref_latents, noise = _sd_reference_run(ref_pipe, PROMPT, steps=steps, size=64,
                                                    seed=7, guidance=guidance)
        latents: list[np.ndarray] = []
        result = ours(PROMPT, steps=steps, width=64, height=64, guidance_scale=guidance,
                      noise=noise, on_step=lambda i, n, lat, den, seen=latents: seen.append(lat))
        _assert_close(result.pixels, latents, ref, ref_latents)


def test_openvino_export_folder_matches_diffusers(root, lcm_source, lcm_reference):
    from optimum.exporters.openvino import main_export

    from workers.lcm.prepare import prepare_from

    export = root / "my-lcm-ov"
    main_export(str(lcm_source), str(export), task="text-to-image", local_files_only=True)
    folder = prepare_from(export, root / "cache", name="my-lcm-ov")
    settings = json.loads((folder / "bundle.json").read_text())["settings"]
    assert settings["source_layout"] == "openvino"
    ours = _ours(folder)
    ref, ref_steps, noise = _reference_run(lcm_reference, PROMPT, steps=4, width=64, height=64,
                                           seed=11, guidance=8.0)
    pixels, our_steps = _run(ours, PROMPT, noise, steps=4, width=64, height=64)
    _assert_same(pixels, our_steps, ref, ref_steps)


def test_a_folder_of_another_kind_is_refused(tmp_path):
    from workers.lcm.prepare import prepare_from

    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers folder"):
        prepare_from(tmp_path, tmp_path / "cache")


def test_fp16_openvino_export_serves_kohya_lora_close_to_diffusers(root, lcm_source):
    """`optimum-cli export openvino --weight-format fp16`: f16 weights, a per-request kohya LoRA
    merged onto them. Tolerance (f16 weight rounding, measured here): images within
    FP16_LEVELS 8-bit levels of diffusers' f32 fused-LoRA image, mean within FP16_MEAN."""
    from diffusers import LatentConsistencyModelPipeline
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    from workers.lcm.prepare import prepare_from

    export = root / "my-lcm-ov16"
    main_export(str(lcm_source), str(export), task="text-to-image", local_files_only=True,
                ov_config=OVConfig(dtype="fp16"))
    folder = prepare_from(export, root / "cache", name="my-lcm-ov16",
                          options={"loras": str(root / "loras" / "style_kohya.safetensors")})
    fused = LatentConsistencyModelPipeline.from_pretrained(str(lcm_source), local_files_only=True)
    fused.set_progress_bar_config(disable=True)
    fused.load_lora_weights(str(root / "loras"), weight_name="style_kohya.safetensors",
                            adapter_name="style")
    fused.fuse_lora(lora_scale=0.7)
    fused.unload_lora_weights()
    ref, _, noise = _reference_run(fused, PROMPT, steps=4, width=64, height=64, seed=5,
                                   guidance=8.0)
    pixels, _ = _run(_ours(folder), PROMPT, noise, steps=4, width=64, height=64,
                     lora="style_kohya", lora_weight=0.7)
    diff = np.abs(pixels.astype(int) - ref.astype(int))
    assert diff.max() <= FP16_LEVELS and diff.mean() <= FP16_MEAN, (diff.max(), diff.mean())
    plain, _ = _run(_ours(folder), PROMPT, noise, steps=4, width=64, height=64)
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() > 2  # the LoRA mattered


# measured: max 3 levels, mean 0.38; about twice that is allowed
FP16_LEVELS, FP16_MEAN = 6, 1.0


def test_edgectl_prepare_from_packs_and_edgectl_run_serves_kohya_lora(root, lcm_folder,
                                                                       capsys):
    """The operator path: `prepare lcm --from` (same source and options: the prepared folder
    is reused) encrypts the bundle; `run lcm` decrypts it and picks the kohya LoRA by name."""
    import struct

    from edgectl.cli import main
    from edgectl.localdaemon import write_config
    from keys import Keyring

    ring = root / "ring.json"
    Keyring.generate().save(ring)
    config = write_config(root / "edge.toml", node="t", mqtt_port=1,
                          redis_url="redis://127.0.0.1:1/0", bundle_dir=root / "bundles",
                          keyring_file=ring, tasks={"lcm": {"devices": ["CPU"]}})
    loras = f"{root}/loras/style.safetensors,{root}/loras/style_kohya.safetensors"
    assert main(["--config", str(config), "prepare", "lcm", "--from", str(root / "my-lcm-src"),
                 "--name", "my-lcm", "--version", "2", "--cache", str(root / "cache"),
                 "--option", f"loras={loras}"]) == 0
    assert f"prepared {lcm_folder}" in capsys.readouterr().out
    images = []
    for extra in ([], ["--param", "lora=style_kohya"]):
        assert main(["--config", str(config), "run", "lcm", "a red fox", "--param",
                     "model=my-lcm", "--param", "seed=3", "--out", str(root / "out"),
                     *extra]) == 0
        answer = json.loads(capsys.readouterr().out)
        (png,) = answer["result"]["files"]
        data = Path(png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (64, 64)
        images.append(data)
    assert images[0] != images[1]  # the LoRA changed the image
