"""`edgectl prepare superres --from PATH`: a user's IR or ONNX model -> a prepared folder.

    folder = prepare_from(Path("sisr-1032/"), cache_dir, name=None, version="1")

Accepted: an OpenVINO IR (`.xml` with its `.bin` beside it) or an ONNX file, given as the
file or as a folder holding exactly one of them (`model=FILE` picks one among several). The
model is inspected once (`inspect`) and its interface written into the bundle's settings
(`generic.Interface`); then the prepared folder is loaded and run once, as a worker would,
before it is returned. Options (all strings, each overriding what inspection found):

* `input_range` / `output_range`: `1` (0..1) or `255` (0..255) — what white is in the
  model's numbers. Defaults: 255 for u8 inputs and for the OMZ two-input form, else 1; the
  output range is detected from a probe run (an SR model's output has its input's mean).
* `channels`: `rgb` or `bgr` (default rgb; bgr for the OMZ two-input form).
* `layout` / `output_layout`: `NCHW` or `NHWC`, when the channel axis (size 3) is ambiguous.
* `scale`: the factor, when the shapes cannot tell it (a dynamic two-input model).
* `tile` (256): low-res tile of a dynamic model; `margin` (16): overlap context per side.
* `multiple` (1): a dynamic model that needs its input's height and width divisible by N
  (window attention, strided encoders) gets every tile edge-padded up to a multiple of N.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edge.errors import BadRequest
from workers.prepared import building
from workers.superres import generic
from workers.superres.generic import MARGIN, TILE, Interface

XML = "model.xml"
PROBE = 48  # low-res probe size for dynamic models (scale and output range)
F32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}


def prepare_from(source: Path, cache_dir: Path, *, name: str | None = None, version: str = "1",
                 force: bool = False, options: Mapping[str, str] = {}) -> Path:
    """Write (or reuse) the plaintext prepared folder for the model at `source`."""
    path = find_model(Path(source), options.get("model"))
    name = _safe_name(name or (path.parent.name if Path(source).is_dir() else path.stem))
    digest = _digest(path)
    final = Path(cache_dir) / name
    if not force and _reusable(final, version, digest, options):
        return final
    core = ov.Core()
    try:
        model = core.read_model(path)  # ONNX too: OpenVINO's frontend converts it
    except RuntimeError as exc:
        raise BadRequest(f"{path}: OpenVINO cannot read this model: {exc}") from None
    spec = inspect(model, options, core)
    settings: dict[str, Any] = {
        "mode": "fast",
        **spec.to_settings(),
        "source": path.name,
        "source_sha256": digest,
        "options": dict(options),
    }
    with building(final) as tmp:
        ov.save_model(model, tmp / XML, compress_to_fp16=False)  # the user's weights, as is
        manifest = {"name": name, "task": "superres", "version": version, "settings": settings}
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _validate(tmp, spec)
    return final


def find_model(source: Path, choice: str | None = None) -> Path:
    """The model file: `source` itself, or the one IR / ONNX file in the folder `source`."""
    if source.is_dir():
        if choice:
            source = source / choice
        else:
            found = sorted(source.glob("*.xml")) or sorted(source.glob("*.onnx"))
            if not found:
                raise BadRequest(f"{source}: no model found (expected an OpenVINO IR .xml + "
                                 ".bin or an .onnx file)")
            if len(found) > 1:
                raise BadRequest(f"{source}: several models ({', '.join(p.name for p in found)})"
                                 ": pick one with --option model=FILE")
            source = found[0]
    if not source.is_file():
        raise BadRequest(f"{source}: no such model file")
    if source.suffix == ".xml" and not source.with_suffix(".bin").is_file():
        raise BadRequest(f"{source}: the IR's weights {source.with_suffix('.bin').name} are "
                         "missing beside it")
    if source.suffix not in (".xml", ".onnx"):
        raise BadRequest(f"{source}: not an OpenVINO IR (.xml) or ONNX (.onnx) file")
    return source


def inspect(model: ov.Model, options: Mapping[str, str] = {},
            core: ov.Core | None = None) -> Interface:
    """Which interface the model has, from its inputs and outputs (and `options`)."""
    if len(model.inputs) not in (1, 2):
        raise BadRequest(f"a super-resolution model has 1 or 2 inputs; this one has "
                         f"{len(model.inputs)}")
    two = len(model.inputs) == 2
    lr, bic = _lr_and_bicubic(model) if two else (0, None)
    layout = _layout(model.inputs[lr].get_partial_shape(), options.get("layout"), "input")
    # None: the output's shape is too dynamic to tell; the probe run's concrete shape will
    out_layout = _find_layout(model.outputs[0].get_partial_shape(),
                              options.get("output_layout", options.get("layout")))
    in_type = model.inputs[lr].get_element_type().get_type_name()
    out_type = model.outputs[0].get_element_type().get_type_name()
    hw = _hw(model.inputs[lr].get_partial_shape(), layout)
    native = (hw[0], hw[1])
    default_range = 255.0 if in_type == "u8" or two else 1.0
    multiple = _int(options.get("multiple"), 1, "multiple", 1)
    tile = max(_int(options.get("tile"), TILE, "tile", 8), multiple)
    spec = Interface(
        xml=XML, interface="lr+bicubic" if two else "single", scale=0, layout=layout,
        output_layout=out_layout or layout, input_type=in_type, output_type=out_type,
        input_range=_range(options["input_range"]) if "input_range" in options else default_range,
        output_range=0.0,  # found below
        channels=_choice(options.get("channels", "bgr" if two else "rgb"), ("rgb", "bgr"),
                         "channels"),
        lr_index=lr, bicubic_index=bic, native=native,
        tile=tile - tile % multiple, margin=_int(options.get("margin"), MARGIN, "margin", 0),
        multiple=multiple)
    scale = _static_scale(model, spec) if out_layout else 0
    if options.get("scale"):
        given = _int(options["scale"], 0, "scale", 1)
        if scale and given != scale:
            raise BadRequest(f"scale={given} but the model's shapes say {scale}")
        scale = given
    # a dynamic two-input model cannot show its factor: 4, the OMZ 1032 form, unless told
    out = _probe(model, spec, scale or 4, core or ov.Core())
    if out_layout is None:
        spec = replace(spec, output_layout=_layout(ov.PartialShape(list(out.shape)), None,
                                                   "output"))
    found = _probe_scale(out, spec)
    if scale and found != scale:
        raise BadRequest(f"the model made {found}x from a probe image, not {scale}x")
    if options.get("output_range") is not None:
        output_range = _range(options["output_range"])
    elif out_type == "u8":
        output_range = 255.0
    else:
        output_range = _detect_output_range(out, spec)
    return Interface(**{**spec.to_settings(), "native": native, "scale": found,
                        "output_range": output_range})


def _lr_and_bicubic(model: ov.Model) -> tuple[int, int]:
    """Indices of the low-res and the bicubic input: the smaller static one is the low-res
    image; when shapes cannot tell, the first input is (the OMZ order)."""
    shapes = [port.get_partial_shape() for port in model.inputs]
    if all(s.is_static for s in shapes):
        areas = [np.prod([d.get_length() for d in s]) for s in shapes]
        if areas[1] < areas[0]:
            return 1, 0
    return 0, 1


def _layout(shape: ov.PartialShape, given: str | None, what: str) -> str:
    """NCHW or NHWC, from which axis has 3 channels, or a clear error."""
    if not given and (shape.rank.is_dynamic or shape.rank.get_length() != 4):
        raise BadRequest(f"the model's {what} is {shape}: a super-resolution model takes and "
                         "gives 4-D images (NCHW or NHWC)")
    found = _find_layout(shape, given)
    if found is None:
        raise BadRequest(f"cannot tell the model's {what} layout from {shape} (3 channels "
                         "expected): pass --option layout=NCHW or NHWC")
    return found


def _find_layout(shape: ov.PartialShape, given: str | None) -> str | None:
    """`_layout`, or None when the shape does not tell."""
    if given:
        return _choice(given.upper(), ("NCHW", "NHWC"), "layout")
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return None

    def is3(d: ov.Dimension) -> bool:
        return d.is_static and d.get_length() == 3

    if is3(shape[1]) and not is3(shape[3]):
        return "NCHW"
    if is3(shape[3]) and not is3(shape[1]):
        return "NHWC"
    return None


def _hw(shape: ov.PartialShape, layout: str) -> tuple[int | None, int | None]:
    h, w = (shape[layout.index(a)] for a in "HW")
    return (h.get_length() if h.is_static else None, w.get_length() if w.is_static else None)


def _static_scale(model: ov.Model, spec: Interface) -> int:
    """The factor from static shapes (output over low-res input), 0 when they cannot tell."""
    h_in, w_in = spec.native
    h_out, w_out = _hw(model.outputs[0].get_partial_shape(), spec.output_layout)
    if None in (h_in, w_in, h_out, w_out):
        return 0
    assert h_in and w_in and h_out and w_out  # narrowed for mypy
    if h_out % h_in or w_out % w_in or h_out // h_in != w_out // w_in:
        raise BadRequest(f"output {h_out}x{w_out} is not an integer multiple of the input "
                         f"{h_in}x{w_in}")
    return h_out // h_in


def _probe_scale(out: np.ndarray, spec: Interface) -> int:
    """The factor a probe run showed (output size over the probe's low-res size)."""
    h, w = _probe_size(spec)
    h_out, w_out = (out.shape[spec.output_layout.index(a)] for a in "HW")
    if h_out % h or w_out % w or h_out // h != w_out // w or h_out < h:
        raise BadRequest(f"the model made {h_out}x{w_out} from a {h}x{w} probe image: not an "
                         "integer upscale")
    return h_out // h


def _probe(model: ov.Model, spec: Interface, scale: int, core: ov.Core) -> np.ndarray:
    """One run of the bare model on a smooth probe image, in the model's own numbers."""
    h, w = _probe_size(spec)
    probe = _probe_image(h, w)
    dtype = model.inputs[spec.lr_index].get_element_type().to_dtype()
    inputs = {spec.lr_index: _as_model_input(probe, spec, dtype)}
    if spec.bicubic_index is not None:
        from workers.superres import imageio

        inputs[spec.bicubic_index] = _as_model_input(imageio.upscale_array(probe, scale), spec,
                                                     dtype)
    shaped = model.clone()
    shaped.reshape({i: list(x.shape) for i, x in inputs.items()})
    try:
        compiled = core.compile_model(shaped, "CPU", F32)
        return np.asarray(compiled(inputs)[0])
    except RuntimeError as exc:
        raise BadRequest(f"the model does not run on a {h}x{w} probe image: {exc}") from None


def _probe_size(spec: Interface) -> tuple[int, int]:
    """The probe image's low-res size: native along static axes, else PROBE rounded up to the
    model's `multiple`."""
    dynamic = -(-PROBE // spec.multiple) * spec.multiple
    return (spec.native[0] or dynamic, spec.native[1] or dynamic)


def _probe_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 70 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], -1)
    return rgb.round().astype(np.uint8)


def _as_model_input(rgb: np.ndarray, spec: Interface, dtype: np.dtype) -> np.ndarray:
    """What the PrePostProcessor makes of an RGB uint8 image, computed in numpy."""
    x = rgb[..., ::-1] if spec.channels == "bgr" else rgb
    if spec.input_type == "u8":
        x = x.astype(np.uint8)
    else:
        x = (x.astype(np.float32) / np.float32(255.0 / spec.input_range)).astype(dtype)
    x = x[None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if spec.layout == "NCHW" else x)


def _detect_output_range(out: np.ndarray, spec: Interface) -> float:
    """A super-resolution output keeps its input's mean: the ratio of the two tells the
    output's range (1, 255), relative to the input's."""
    level = float(np.mean(_probe_image(*_probe_size(spec))))
    ratio = float(np.mean(out)) / (level * spec.input_range / 255.0)
    for candidate in (spec.input_range, 1.0, 255.0):
        if 0.5 < ratio * spec.input_range / candidate < 2.0:
            return candidate
    return spec.input_range  # no resemblance (an untrained model?): assume the input's range


def _validate(folder: Path, spec: Interface) -> None:
    """Load the folder as a worker would and upscale an image larger than a tile and one
    smaller."""
    from workers.api import DeviceSettings, FolderBundle

    pipeline = generic.GenericPipeline.load(FolderBundle(folder), ov.Core(),
                                            DeviceSettings("CPU", F32))
    th, tw = spec.tile_shape
    # one image larger than a tile, one smaller (an odd size along dynamic axes)
    for h, w in ((th + th // 2 + 1, tw + 3), (th // 2 + 1, tw // 2 + 1)):
        try:
            [out] = pipeline([_probe_image(h, w)])
        except RuntimeError as exc:
            raise BadRequest(f"the prepared model failed on a {h}x{w} test image (a model "
                             f"that needs sizes divisible by N: --option multiple=N): {exc}"
                             ) from None
        if out.shape != (h * spec.scale, w * spec.scale, 3):
            raise BadRequest(f"the prepared model gave {out.shape} for a {h}x{w} image, not "
                             f"{spec.scale}x")


def _range(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    return value if value in (1.0, 255.0) else _bad(f"a range is 1 or 255, not {text!r}")


def _choice(text: str, choices: tuple[str, ...], what: str) -> str:
    if text.lower() in [c.lower() for c in choices]:
        return next(c for c in choices if c.lower() == text.lower())
    return _bad(f"{what} must be one of {', '.join(choices)}, not {text!r}")


def _int(text: str | None, default: int, what: str, low: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    return value if value >= low else _bad(f"{what} must be an integer >= {low}, not {text!r}")


def _bad(message: str) -> Any:
    raise BadRequest(message)


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return safe or "superres-model"


def _digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    if path.suffix == ".xml":
        h.update(path.with_suffix(".bin").read_bytes())
    return h.hexdigest()


def _reusable(folder: Path, version: str, digest: str, options: Mapping[str, str]) -> bool:
    try:
        manifest = json.loads((folder / "bundle.json").read_text())
    except (OSError, ValueError):
        return False
    settings = manifest.get("settings", {})
    return (manifest.get("version") == version and settings.get("source_sha256") == digest
            and settings.get("options") == dict(options))
