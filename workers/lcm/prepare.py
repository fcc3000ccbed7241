"""Prepare the `lcm` bundle folder: random-weight LCM pipeline -> OpenVINO IRs + tokenizer + LoRA.

Build host only (torch, diffusers, optimum-intel, openvino-tokenizers). Writes

    cache_dir/<name>/            the plaintext bundle folder (what `edgectl` encrypts)
        bundle.json              name, task, version, settings (scheduler, sizes, files, loras)
        tokenizer.xml/.bin       CLIP tokenizer IR (openvino-tokenizers), no truncation/padding
        text_encoder.xml/.bin    CLIP text encoder  (optimum-intel export, fp32)
        unet.xml/.bin            UNet with timestep_cond (w embedding)
        vae_decoder.xml/.bin     VAE decoder
        lora_<name>.safetensors  LoRAs in diffusers/peft naming
    cache_dir/_reference/<name>/ the diffusers pipeline the IRs came from (parity tests, bench)

Options: `arch` ("tiny" default, "sd15" = SD1.5 architecture for benchmarks), `seed` ("0"),
`unet` ("fp32" default, "int8" = NNCF-quantized UNet and VAE decoder, see
`workers.lcm._quantize`; settings["int8"] lists the INT8 components).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# 2: INT8 bundles quantize the VAE decoder too; settings["int8"] names the INT8 components
BUNDLE_VERSION = "2"
_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
_INT8_COMPONENTS = ("unet", "vae_decoder")


def prepare(cache_dir: Path, *, force: bool = False, options: Mapping[str, str] = {}) -> list[Path]:
    """Write the prepared `lcm` folder(s) under `cache_dir`; return their paths (idempotent)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arch = options.get("arch", "tiny")
    seed = int(options.get("seed", "0"))
    unet_kind = options.get("unet", "fp32")
    if unet_kind not in ("fp32", "int8"):
        raise ValueError(f"option unet must be fp32 or int8, not {unet_kind!r}")
    name = options.get("name") or _default_name(arch, unet_kind)
    cache_dir = Path(cache_dir)
    folder = cache_dir / name
    if _is_current(folder, _version(arch, seed)) and not force:
        return [folder]
    reference = reference_dir(cache_dir, f"lcm-{arch}-seed{seed}")
    _ensure_reference(reference, arch, seed, force)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{name}.") as tmp:
        work = Path(tmp)
        _export_irs(reference, work / "export", work / "bundle")
        _write_tokenizer(work / "bundle")
        # LoRA merges need f32 weight Constants; the INT8 UNet's are compressed to int8
        loras = _copy_loras(reference, work / "bundle") if unet_kind == "fp32" else {}
        _write_manifest(work / "bundle", name, reference, loras, arch, seed, unet_kind)
        if unet_kind == "int8":
            from workers.lcm._quantize import quantize

            quantize(work / "bundle", _INT8_COMPONENTS)  # calibrates on the complete fp32 folder
        if folder.exists():
            shutil.rmtree(folder)
        (work / "bundle").rename(folder)  # complete folders only ever appear whole
    return [folder]


def reference_dir(cache_dir: Path, name: str = "lcm-tiny-seed0") -> Path:
    """Where the diffusers pipeline behind a prepared folder lives (not part of any bundle)."""
    return Path(cache_dir) / "_reference" / name


def _version(arch: str, seed: int) -> str:
    return f"{BUNDLE_VERSION}+{arch}.seed{seed}"


def _is_current(folder: Path, version: str) -> bool:
    """A complete folder written by this recipe (a folder from an older recipe is rebuilt)."""
    if not (folder / "bundle.json").is_file():
        return False
    return json.loads((folder / "bundle.json").read_text()).get("version") == version


def _default_name(arch: str, unet_kind: str) -> str:
    return f"lcm-{arch}" + ("-int8" if unet_kind == "int8" else "")


def _ensure_reference(path: Path, arch: str, seed: int, force: bool) -> None:
    """Build and save the random-weight diffusers pipeline (+ a demo LoRA) once."""
    if (path / "model_index.json").is_file() and not force:
        return
    from workers.lcm._build import build_pipeline, save_demo_lora

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = build_pipeline(arch, seed)
    pipe.save_pretrained(str(tmp))
    save_demo_lora(pipe, tmp / "loras" / "demo.safetensors")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _export_irs(reference: Path, export: Path, bundle: Path) -> None:
    """optimum-intel export in fp32 (no fp16/int8 weight compression: parity needs exact weights)."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(str(reference), str(export), task="text-to-image", local_files_only=True,
                ov_config=OVConfig(dtype="fp32"))
    bundle.mkdir(parents=True)
    for part in _COMPONENTS:
        for ext in ("xml", "bin"):
            shutil.move(export / part / f"openvino_model.{ext}", bundle / f"{part}.{ext}")


def _write_tokenizer(bundle: Path) -> None:
    """CLIP tokenizer IR without truncation: the pipeline truncates so it can report it."""
    import openvino as ov
    import openvino_tokenizers

    from workers.lcm._build import clip_tokenizer

    model = openvino_tokenizers.convert_tokenizer(clip_tokenizer(), with_detokenizer=False)
    ov.save_model(model, str(bundle / "tokenizer.xml"), compress_to_fp16=False)


def _copy_loras(reference: Path, bundle: Path) -> dict[str, str]:
    out = {}
    for path in sorted((reference / "loras").glob("*.safetensors")):
        # flat file names: bundles hold a flat list of files
        out[path.stem] = f"lora_{path.stem}.safetensors"
        shutil.copyfile(path, bundle / out[path.stem])
    return out


def _write_manifest(bundle: Path, name: str, reference: Path, loras: dict[str, str],
                    arch: str, seed: int, unet_kind: str) -> None:
    unet = _config(reference / "unet")
    vae = _config(reference / "vae")
    scheduler = {k: v for k, v in _config(reference / "scheduler" / "scheduler_config.json").items()
                 if not k.startswith("_")}
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    unet_scale = 2 ** (len(unet["block_out_channels"]) - 1)
    from workers.lcm._build import ARCHS

    settings: dict[str, Any] = {
        "scheduler": scheduler,
        "latent_channels": unet["in_channels"],
        "vae_scale_factor": vae_scale,
        "scaling_factor": vae["scaling_factor"],
        # the exported UNet upsamples by fixed factors: latents must divide evenly
        "size_multiple": max(8, vae_scale * unet_scale),
        "default_width": ARCHS[arch]["size"],
        "default_height": ARCHS[arch]["size"],
        "time_cond_proj_dim": unet["time_cond_proj_dim"],
        "max_tokens": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "files": {"tokenizer": "tokenizer.xml", **{p: f"{p}.xml" for p in _COMPONENTS}},
        "loras": loras,
        "unet_precision": unet_kind,
        "int8": list(_INT8_COMPONENTS) if unet_kind == "int8" else [],
    }
    manifest = {"name": name, "task": "lcm", "version": _version(arch, seed),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": settings}
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _config(path: Path) -> dict[str, Any]:
    path = path / "config.json" if path.is_dir() else path
    return json.loads(path.read_text())


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:  # noqa: B006
    """The user's own LCM checkpoint folder -> a prepared folder (see `_from_folder`)."""
    from workers.lcm._from_folder import prepare_from as from_folder

    return from_folder(source, cache_dir, name=name, version=version, force=force,
                       options=options)
