"""Prepare an `lcm` bundle from the user's own checkpoint folder.

Build host only (torch, diffusers, optimum-intel, openvino-tokenizers). Accepted layouts:

* a diffusers LCM folder (SimianLuo/LCM_Dreamshaper_v7's layout: model_index.json, unet/ with
  `time_cond_proj_dim`, vae/, text_encoder/, tokenizer/, scheduler/): exported with
  optimum-intel in fp32, exactly as the built-in tiny model is (`prepare._export_irs`);
* a diffusers SD1.5-layout folder (a UNet without `time_cond_proj_dim`) plus an LCM-LoRA
  (`lora=PATH`, peft or kohya naming): exported the same way, the LoRA fused into the UNet IR
  at pack time (the "LCM-LoRA" recipe; `lora_weight`, default 1);
* an optimum-intel OpenVINO export folder (`openvino_model.xml` in unet/, vae_decoder/,
  text_encoder/; tokenizer/ and scheduler/ beside them): the IRs are copied as they are.

In every case the CLIP tokenizer IR is converted from the folder's own tokenizer/, the scheduler
is the folder's scheduler config as diffusers' `LCMScheduler.from_config` reads it, and sizes
and token ids come from the component configs. `loras=PATH[,PATH...]` packs LoRAs that jobs
select per request (`lora=<file stem>`). The folder is loaded with `LCMPipeline` and run once
(and once per packed LoRA) before it is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.prepared import building

RECIPE = "1"
_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def layout_of(source: Path) -> str:
    """"openvino" (optimum-intel export) or "diffusers"; `ValueError` for anything else."""
    source = Path(source)
    if all((source / part / "openvino_model.xml").is_file() for part in _COMPONENTS):
        return "openvino"
    if (source / "model_index.json").is_file() and all(
            (source / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder")):
        return "diffusers"
    raise ValueError(f"{source}: neither a diffusers folder (model_index.json, unet/, vae/, "
                     "text_encoder/, tokenizer/, scheduler/) nor an optimum-intel OpenVINO export "
                     "(unet/, vae_decoder/, text_encoder/ with openvino_model.xml)")


def _config(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return doc


def _stamp(source: Path, files: list[Path], options: Mapping[str, str], version: str) -> str:
    """What the prepared folder was made from: every file's path, size and mtime, the options."""
    sha = hashlib.sha256(json.dumps([RECIPE, version, sorted(options.items())]).encode())
    for path in sorted(p for p in Path(source).rglob("*") if p.is_file()) + files:
        info = path.stat()
        sha.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return sha.hexdigest()


def _lora_paths(options: Mapping[str, str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in (options.get("loras") or "").split(","):
        if not item.strip():
            continue
        path = Path(item.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"option loras: {path}: no such file")
        if not _LORA_NAME.fullmatch(path.stem) or path.stem in out:
            raise ValueError(f"option loras: {path.stem!r} is not a usable, distinct LoRA name")
        out[path.stem] = path
    return out


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:  # noqa: B006
    """Turn the user's LCM checkpoint folder into `cache_dir/<name>/`, checked by a run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = Path(source)
    layout = layout_of(source)
    name = name or source.resolve().name
    fused = Path(options["lora"]).expanduser() if options.get("lora") else None
    if fused is not None and not fused.is_file():
        raise ValueError(f"option lora: {fused}: no such file")
    loras = _lora_paths(options)
    final = Path(cache_dir) / name
    stamp = _stamp(source, [p for p in (fused, *loras.values()) if p is not None], options,
                   version)
    if not force and _current(final, stamp):
        return final
    with building(final) as tmp:
        unet_config = _write_irs(source, layout, tmp)
        if fused is not None:
            _fuse_lora(tmp / "unet.xml", fused, float(options.get("lora_weight", "1")))
        elif not unet_config.get("time_cond_proj_dim") and options.get("distilled") != "true":
            raise ValueError(f"{source}: the UNet has no time_cond_proj_dim (not LCM-distilled): "
                             "give an LCM-LoRA with --option lora=PATH (or --option "
                             "distilled=true if one is fused in already)")
        tokenizer = _write_tokenizer(source, tmp)
        for stem, path in loras.items():
            shutil.copyfile(path, tmp / f"lora_{stem}.safetensors")
        settings = _settings(source, layout, unet_config, tokenizer,
                             {stem: f"lora_{stem}.safetensors" for stem in loras})
        settings["source_stamp"] = stamp
        settings["lcm_lora"] = fused.name if fused is not None else None
        manifest = {"name": name, "task": "lcm", "version": version,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings": settings}
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        check(tmp)
    return final


def _current(folder: Path, stamp: str) -> bool:
    path = folder / "bundle.json"
    if not path.is_file():
        return False
    return _config(path).get("settings", {}).get("source_stamp") == stamp


def _write_irs(source: Path, layout: str, out: Path) -> dict[str, Any]:
    """text_encoder/unet/vae_decoder .xml/.bin into `out`; returns the UNet's config."""
    if layout == "openvino":
        for part in _COMPONENTS:
            for ext in ("xml", "bin"):
                shutil.copyfile(source / part / f"openvino_model.{ext}", out / f"{part}.{ext}")
        return _config(source / "unet" / "config.json")
    from workers.lcm.prepare import _export_irs

    work = out / ".export"
    try:
        _export_irs(source, work / "export", work / "bundle")
        for path in (work / "bundle").iterdir():
            path.rename(out / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _config(source / "unet" / "config.json")


def _fuse_lora(unet_xml: Path, lora_path: Path, weight: float) -> None:
    """Merge an (LCM-)LoRA into the UNet IR's weights and save it back uncompressed."""
    import openvino as ov

    from workers.lcm import lora

    core = ov.Core()
    model = core.read_model(str(unet_xml))
    deltas = lora.lora_deltas(lora.read_safetensors(lora_path.read_bytes()))
    merged = lora.merge(model, deltas, weight)
    fused = unet_xml.with_name("unet.fused.xml")
    ov.save_model(merged, str(fused), compress_to_fp16=False)
    del model, merged
    fused.rename(unet_xml)
    fused.with_suffix(".bin").rename(unet_xml.with_suffix(".bin"))


def _clip_tokenizer(source: Path) -> Any:
    from transformers import CLIPTokenizer

    folder = source / "tokenizer"
    if not folder.is_dir():
        raise ValueError(f"{source}: no tokenizer/ folder (CLIP vocab.json + merges.txt, or "
                         "tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _write_tokenizer(source: Path, out: Path) -> Any:
    """The folder's CLIP tokenizer as an IR without truncation (the pipeline truncates)."""
    import openvino as ov
    import openvino_tokenizers

    tok = _clip_tokenizer(source)
    model = openvino_tokenizers.convert_tokenizer(tok, with_detokenizer=False)
    ov.save_model(model, str(out / "tokenizer.xml"), compress_to_fp16=False)
    return tok


def lcm_scheduler_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler config as diffusers' `LCMScheduler.from_config` reads it (the LCM-LoRA recipe
    swaps an SD1.5 folder's PNDM/DDIM scheduler for this one)."""
    from diffusers import LCMScheduler

    return {k: v for k, v in dict(LCMScheduler.from_config(dict(config)).config).items()
            if not k.startswith("_")}


def _settings(source: Path, layout: str, unet: Mapping[str, Any], tok: Any,
              loras: Mapping[str, str]) -> dict[str, Any]:
    vae = _config(source / ("vae_decoder" if layout == "openvino" else "vae") / "config.json")
    text = _config(source / "text_encoder" / "config.json")
    scheduler = lcm_scheduler_config(_config(source / "scheduler" / "scheduler_config.json"))
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    unet_scale = 2 ** (len(unet["block_out_channels"]) - 1)
    max_tokens = int(min(text.get("max_position_embeddings", 77), tok.model_max_length))
    size = int(unet.get("sample_size", 64)) * vae_scale
    return {
        "scheduler": scheduler,
        "latent_channels": int(unet["in_channels"]),
        "vae_scale_factor": vae_scale,
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        # the exported UNet upsamples by fixed factors: latents must divide evenly
        "size_multiple": max(8, vae_scale * unet_scale),
        "default_width": size,
        "default_height": size,
        "time_cond_proj_dim": unet.get("time_cond_proj_dim"),
        "max_tokens": max_tokens,
        "bos_token_id": int(tok.bos_token_id),
        "eos_token_id": int(tok.eos_token_id),
        "pad_token_id": int(tok.pad_token_id if tok.pad_token_id is not None
                            else tok.eos_token_id),
        "files": {"tokenizer": "tokenizer.xml", **{p: f"{p}.xml" for p in _COMPONENTS}},
        "loras": dict(loras),
        "unet_precision": "fp32" if layout == "diffusers" else "as exported",
        "int8": [],
        "source_layout": layout,
    }


def check(folder: Path) -> None:
    """Load the folder with `LCMPipeline` and make one small image (and one per LoRA)."""
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm.pipeline import LCMPipeline

    pipe = LCMPipeline.load(FolderBundle(folder), ov.Core(), DeviceSettings("CPU"))
    multiple = int(pipe.settings["size_multiple"])
    side = -(-64 // multiple) * multiple  # the smallest size a job may ask for
    for lora in (None, *pipe.lora_names):
        if not _finite_run(pipe, side, lora):
            raise ValueError(f"{folder.name}: the check run gave non-finite latents "
                             f"(lora={lora!r})")


def _finite_run(pipe: Any, side: int, lora: str | None) -> bool:
    """One step at side x side: were the denoised latents finite?"""
    import numpy as np

    seen: list[Any] = []
    pipe("a test image", steps=1, width=side, height=side, lora=lora,
         on_step=lambda i, n, lat, den: seen.append(den))
    return len(seen) == 1 and bool(np.isfinite(seen[0]).all())
