"""Build the superres prepared folders (build host: torch, diffusers).

    prepare(cache_dir) -> [cache_dir/"sr-fast-x4", cache_dir/"sr-ldm-x4-tiny"]
    prepare_from(Path("my-model.onnx"), cache_dir) -> cache_dir/"my-model"   (the user's own)

Each folder is written under a temporary name and renamed when complete, so an interrupted run
leaves nothing that looks finished; a complete folder is returned at once unless `force`.
Options (all strings): `steps` (fast-model training steps), `only` ("fast" or "quality").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from workers.prepared import building

FAST = "sr-fast-x4"
QUALITY = "sr-ldm-x4-tiny"
VERSION = "3"  # 3: the bicubic base moved into the graph (one input)


def prepare(cache_dir: Path, *, force: bool = False,
            options: Mapping[str, str] = {}) -> list[Path]:
    """Write the plaintext prepared folders and return their paths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a hub
    cache_dir = Path(cache_dir)
    only = options.get("only", "")
    out = []
    if only in ("", "fast"):
        out.append(_build(cache_dir / FAST, VERSION, force, lambda d: _prepare_fast(d, options)))
    if only in ("", "quality"):
        from workers.superres import ldm_build

        out.append(_build(cache_dir / QUALITY, ldm_build.VERSION, force, ldm_build.build_ldm))
    return out


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:
    """A user's own super-resolution model (IR or ONNX) -> a plaintext prepared folder
    (`generic_prepare.prepare_from`: the accepted forms and options)."""
    from workers.superres import generic_prepare

    return generic_prepare.prepare_from(source, cache_dir, name=name, version=version,
                                        force=force, options=options)


def _build(final: Path, version: str, force: bool, builder: Callable[[Path], dict]) -> Path:
    """Run `builder` into a temp folder, write bundle.json last, rename into place.

    A complete folder of `version` is reused; one an older recipe made is rebuilt.
    """
    if not force and _version(final) == version:
        return final
    with building(final) as tmp:
        manifest = builder(tmp)
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return final


def _version(folder: Path) -> str | None:
    try:
        return json.loads((folder / "bundle.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def _prepare_fast(folder: Path, options: Mapping[str, str]) -> dict:
    import openvino as ov
    import torch

    from workers.superres import train as tr

    started = time.perf_counter()
    data = tr.sample_dir()
    examples = [tr.make_example(data / name) for name in tr.TRAIN]
    cfg = tr.TrainConfig(steps=int(options.get("steps", tr.TrainConfig().steps)))
    net = tr.train(examples, cfg, log=lambda line: print(f"[superres] {line}", flush=True))
    model = _export(tr.Deployed(net), torch)
    ov.save_model(model, folder / "sr_fast_x4.xml", compress_to_fp16=False)
    settings: dict[str, Any] = {
        "xml": "sr_fast_x4.xml",
        "scale": 4,
        "inputs": ["lr: u8 NHWC RGB"],
        "base": "in-graph 4x Catmull-Rom bicubic, centres aligned, edges copied",
        "output": "u8 NHWC RGB at 4x",
        "params": sum(p.numel() for p in net.parameters()),
        "train": {"steps": cfg.steps, "batch": cfg.batch, "patch": cfg.patch, "seed": cfg.seed,
                  "width": cfg.width, "loss": "l1", "lr": cfg.lr,
                  "augment": "flips" + (" + transposes" if cfg.transpose else ""),
                  "images": list(tr.TRAIN), "degradation": "vips reduce 4x cubic"},
    }
    settings["held_out"] = _evaluate(folder, settings)
    settings["psnr_gain_db"] = round(
        sum(r["gain_db"] for r in settings["held_out"]) / len(settings["held_out"]), 3)
    settings["prepare_seconds"] = round(time.perf_counter() - started, 1)
    print(f"[superres] held-out PSNR(Y) gain over bicubic: {settings['psnr_gain_db']} dB",
          flush=True)
    return {"name": FAST, "task": "superres", "version": VERSION, "settings": settings}


def _export(deployed, torch):
    """torch -> OpenVINO with dynamic N/H/W and uint8 NHWC RGB in and out."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    with torch.no_grad():
        model = ov.convert_model(deployed.eval(), example_input=torch.rand(1, 3, 32, 32),
                                 input=[ov.PartialShape([-1, 3, -1, -1])])
    model.inputs[0].get_tensor().set_names({"lr"})
    model.outputs[0].get_tensor().set_names({"sr"})
    ppp = PrePostProcessor(model)
    ppp.input(0).tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input(0).preprocess().convert_element_type(ov.Type.f32).scale(255.0)
    ppp.input(0).model().set_layout(ov.Layout("NCHW"))
    # The graph already clamps and rounds to 0..255, so the u8 conversion is exact.
    ppp.output(0).tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.output(0).model().set_layout(ov.Layout("NCHW"))
    return ppp.build()


def _evaluate(folder: Path, settings: dict) -> list[dict]:
    """Held-out PSNR(Y) through the runtime pipeline itself (f32), against plain bicubic."""
    import openvino as ov

    from workers.api import DeviceSettings, FolderBundle
    from workers.superres import train as tr
    from workers.superres.fast import FastPipeline

    # Provisional manifest so the folder reads as a bundle; the final one overwrites it.
    (folder / "bundle.json").write_text(json.dumps({"name": FAST, "settings": settings}))
    bundle = FolderBundle(folder)
    device = DeviceSettings("CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                    "INFERENCE_NUM_THREADS": 2})
    pipeline = FastPipeline.load(bundle, ov.Core(), device)
    results = []
    for name in tr.HELD_OUT:
        ex = tr.make_example(tr.sample_dir() / name)
        [sr] = pipeline([ex.lr])
        base, model = tr.psnr_y(ex.bicubic, ex.hr), tr.psnr_y(sr, ex.hr)
        results.append({"image": name, "bicubic_db": round(base, 3), "model_db": round(model, 3),
                        "gain_db": round(model - base, 3)})
    return results
