"""LoRA for the UNet: read safetensors without torch, merge deltas onto the IR's Constants.

Key names are diffusers/peft (`unet.<module>.lora_A.weight` / `.lora_B.weight`, as
`save_lora_weights` writes them), the older diffusers `.lora.down.weight` / `.lora.up.weight`,
or kohya's (`lora_unet_<module with "_" for ".">.lora_down.weight` / `.lora_up.weight` /
`.alpha`, as sd-scripts and the LCM-LoRA release write them; kohya names diffusers' modules, so
`merge` finds the IR Constant whose module path, dots made underscores, is that name).
Text-encoder LoRA (`lora_te*_`, `text_encoder.`) is refused: only the UNet is adapted.
Weights may be f32 Constants or fp16-compressed ones (f16 Constant -> Convert).
alpha comes from `<module>.alpha` tensors (kohya-style), else from the peft config diffusers
stores in the `lora_adapter_metadata` JSON (`unet.lora_alpha`, `unet.alpha_pattern`,
`unet.use_rslora`), else alpha = r (scale 1). The rank is the A tensor's first dimension.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))
KOHYA_UNET = "lora_unet_"
_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(frozen=True, slots=True)
class SafeTensors:
    """The tensors and `__metadata__` strings of a safetensors file."""

    tensors: Mapping[str, np.ndarray]
    metadata: Mapping[str, str]


def read_safetensors(data: bytes | bytearray | memoryview) -> SafeTensors:
    """Parse safetensors bytes: u64 header length, JSON header, raw little-endian tensors."""
    view = memoryview(data)
    if len(view) < 8:
        raise LoraError("safetensors file is truncated")
    (size,) = struct.unpack("<Q", view[:8])
    if size > len(view) - 8:
        raise LoraError("safetensors header is past the end of the file")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"safetensors header is not JSON: {exc}") from None
    body = view[8 + size :]
    meta = header.pop("__metadata__", None) or {}
    return SafeTensors({k: _tensor(k, v, body) for k, v in header.items()}, meta)


def _tensor(name: str, info: Mapping[str, Any], body: memoryview) -> np.ndarray:
    kind = info.get("dtype")
    dtype = _DTYPES.get(kind) if isinstance(kind, str) else None  # a list would be unhashable
    if dtype is None:
        raise LoraError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not 0 <= start <= end <= len(body) or end - start != np.dtype(dtype).itemsize * int(
            np.prod(shape, dtype=np.int64)):
        raise LoraError(f"tensor {name!r}: bad data offsets")
    arr = np.frombuffer(body[start:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if info["dtype"] == "BF16":  # bf16 is the top half of an f32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()


def lora_deltas(lora: SafeTensors, prefix: str = "unet.") -> dict[str, np.ndarray]:
    """`module path -> (alpha / r) * B @ A` in the module's weight layout, at scale 1."""
    config = _adapter_config(lora.metadata, prefix)
    suffixes = tuple(suffix for pair in _PAIRS for suffix in pair) + (".alpha",)
    unknown = sorted(k for k in lora.tensors if not k.endswith(suffixes))
    if unknown:  # LyCORIS (LoHa/LoKr), DoRA scales, full diffs: refused, never half-applied
        raise LoraError(f"LoRA tensor {unknown[0]!r} is of a kind this merge does not apply "
                        "(only LoRA down/up pairs and alpha)")
    out = {}
    for key, down in lora.tensors.items():
        for a_suffix, b_suffix in _PAIRS:
            if not key.endswith(a_suffix):
                continue
            base = key[: -len(a_suffix)]
            up = lora.tensors.get(base + b_suffix)
            if up is None:
                raise LoraError(f"LoRA tensor {key!r} has no matching up/B tensor")
            if base.startswith(_TEXT_ENCODER):
                raise LoraError(f"LoRA tensor {key!r} adapts the text encoder; only UNet "
                                "LoRAs are supported")
            module = base
            for known in (prefix, KOHYA_UNET):
                if base.startswith(known):
                    module = base[len(known):]
            rank = down.shape[0]
            scale = _scale(lora.tensors.get(base + ".alpha"), config, module, rank)
            out[module] = np.float32(scale) * _product(up, down)
    if not out:
        raise LoraError("no LoRA A/B tensor pairs found")
    return out


def _product(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """B @ A for Linear ([out,r]@[r,in]) and Conv ([out,r,1,1] and [r,in,kh,kw])."""
    b = up.reshape(up.shape[0], -1).astype(np.float64)
    a = down.reshape(down.shape[0], -1).astype(np.float64)
    delta = (b @ a).astype(np.float32)
    return delta.reshape((up.shape[0],) + down.shape[1:]) if down.ndim == 4 else delta


def _adapter_config(meta: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The peft LoraConfig saved beside the tensors, with diffusers' `unet.` key prefix removed."""
    raw = meta.get("lora_adapter_metadata") or meta.get("unet_lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = dict(json.loads(raw))
    except (json.JSONDecodeError, TypeError, ValueError):
        raise LoraError("LoRA adapter metadata is not JSON") from None
    if any(k.startswith(prefix) for k in config):
        config = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    if config.get("use_dora"):
        raise LoraError("DoRA adapters are not supported")
    return config


def _scale(tensor: np.ndarray | None, config: Mapping[str, Any], module: str, rank: int) -> float:
    """alpha / r (peft), alpha / sqrt(r) with rsLoRA; alpha = r when nothing says otherwise."""
    alpha: float = float(rank)
    if tensor is not None:
        alpha = float(np.asarray(tensor).reshape(-1)[0])
    elif "lora_alpha" in config:
        alpha = float(config["lora_alpha"])
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = float(value)
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def merge(model: Any, deltas: Mapping[str, np.ndarray], weight: float) -> Any:
    """A clone of `model` with `weight * delta` added to each targeted weight Constant."""
    import openvino as ov
    from openvino import opset13 as ops

    clone = model.clone()
    constants = _weights(clone)
    for module, delta in deltas.items():
        node = _find_constant(constants, module)
        base = _weight_data(node)
        if base.shape != delta.shape:
            raise LoraError(f"LoRA for {module!r} has shape {delta.shape}, model has {base.shape}")
        if base.dtype != np.float32:
            raise LoraError(f"LoRA merge needs f32 or f16 weights; {module!r} is {base.dtype}")
        # an f16 weight (Constant f16 -> Convert) becomes an f32 Constant: merged, then rounded
        # to f16 again, a small LoRA delta would be lost in the weight's rounding
        merged = ops.constant((base + np.float32(weight) * delta).astype(np.float32))
        merged.set_friendly_name(node.get_friendly_name())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(merged.output(0))
    clone.validate_nodes_and_infer_types()
    assert isinstance(clone, ov.Model)
    return clone


def _weights(model: Any) -> dict[str, Any]:
    """Weight nodes by name: f32 Constants, and the Converts that decompress f16 Constants
    (fp16 exports: `<name>_compressed` (f16) -> Convert named `<name>`, as the f32 one was)."""
    out = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "Constant":
            out[op.get_friendly_name()] = op
        elif kind == "Convert":
            source = op.input_value(0).get_node()
            if (source.get_type_name() == "Constant"
                    and source.get_output_element_type(0).get_type_name() == "f16"):
                out[op.get_friendly_name()] = op
    return out


def _weight_data(node: Any) -> np.ndarray:
    if node.get_type_name() == "Convert":
        return np.asarray(node.input_value(0).get_node().get_data(), dtype=np.float32)
    return np.asarray(node.get_data())


def _find_constant(constants: Mapping[str, Any], module: str) -> Any:
    # optimum's export names weights `self.model.<module>.weight`; plain convert_model `self.<module>`
    for name in (f"self.model.{module}.weight", f"self.{module}.weight", f"{module}.weight"):
        if name in constants:
            return constants[name]
    hits = [n for n in constants if n.endswith(f".{module}.weight")]
    if len(hits) == 1:
        return constants[hits[0]]
    if "." not in module:  # kohya: the module path with "_" for "."
        hits = [n for n in constants if _underscored(n) == module]
        if len(hits) == 1:
            return constants[hits[0]]
    raise LoraError(f"LoRA targets {module!r}, which this model does not have")


def _underscored(constant: str) -> str | None:
    """`self.model.down_blocks.0.attn1.to_q.weight` -> `down_blocks_0_attn1_to_q` (kohya's name)."""
    if not constant.endswith(".weight"):
        return None
    path = constant[: -len(".weight")]
    for head in ("self.model.", "self."):
        if path.startswith(head):
            path = path[len(head):]
            break
    return path.replace(".", "_")
