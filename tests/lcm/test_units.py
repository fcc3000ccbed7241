"""Fast checks of the numpy pieces: scheduler maths, safetensors parsing, runtime imports."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from workers.lcm import lora
from workers.lcm.scheduler import LCMScheduler, guidance_embedding
from workers.lcm._build import SCHEDULER_CONFIG


@pytest.mark.parametrize("steps", range(1, 9))
def test_timesteps_match_diffusers(steps):
    from diffusers import LCMScheduler as Reference

    ref = Reference(**SCHEDULER_CONFIG)
    ref.set_timesteps(steps)
    assert LCMScheduler.from_config(SCHEDULER_CONFIG).timesteps(steps).tolist() == \
        ref.timesteps.tolist()


def test_step_matches_diffusers():
    import torch
    from diffusers import LCMScheduler as Reference

    ref = Reference(**SCHEDULER_CONFIG)
    ref.set_timesteps(4)
    ours = LCMScheduler.from_config(SCHEDULER_CONFIG)
    timesteps = ours.timesteps(4)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    for i, t in enumerate(timesteps):
        eps = rng.standard_normal(sample.shape, dtype=np.float32)
        gen = torch.Generator().manual_seed(i)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(i)).numpy()
        expected, expected_x0 = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(sample),
                                         generator=gen, return_dict=False)
        got, got_x0 = ours.step(eps, timesteps, i, sample, noise)
        np.testing.assert_allclose(got_x0, expected_x0.numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-4)
        sample = got


def test_guidance_embedding_matches_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor([7.0]), embedding_dim=32).numpy()
    # sin/cos of arguments up to 7000 in f32: the two libms differ in the last bits
    np.testing.assert_allclose(guidance_embedding(8.0, 32), ref, atol=5e-4)


def _safetensors(tensors: dict[str, np.ndarray], dtypes: dict[str, str], meta=None) -> bytes:
    header, body = {}, b""
    for name, arr in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(arr.shape),
                        "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if meta:
        header["__metadata__"] = meta
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


def test_safetensors_reader_matches_the_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    data = {"a": torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)),
            "b": torch.from_numpy(rng.standard_normal((2, 2, 1, 1)).astype(np.float16)),
            "c": torch.from_numpy(rng.standard_normal((4,)).astype(np.float32)).to(torch.bfloat16)}
    save_file(data, tmp_path / "x.safetensors", metadata={"k": "v"})
    parsed = lora.read_safetensors((tmp_path / "x.safetensors").read_bytes())
    assert parsed.metadata == {"k": "v"}
    for name, tensor in data.items():
        np.testing.assert_array_equal(parsed.tensors[name], tensor.float().numpy())


@pytest.mark.parametrize("blob", [b"", b"\xff" * 8, struct.pack("<Q", 4) + b"{no}",
                                  _safetensors({"x": np.zeros(4, np.float32)}, {"x": "F32"})[:-4]])
def test_broken_safetensors_are_refused(blob):
    with pytest.raises(lora.LoraError):
        lora.read_safetensors(blob)


def test_lora_scale_uses_alpha_from_metadata_and_rslora():
    a = np.ones((2, 3), np.float32)
    b = np.ones((4, 2), np.float32)
    tensors = {"unet.m.lora_A.weight": a, "unet.m.lora_B.weight": b}
    dtypes = dict.fromkeys(tensors, "F32")
    for meta, scale in ((None, 1.0), ({"unet.lora_alpha": 8, "unet.r": 2}, 4.0),
                        ({"unet.lora_alpha": 8, "unet.use_rslora": True}, 8 / 2**0.5)):
        extra = {"lora_adapter_metadata": json.dumps(meta)} if meta else None
        parsed = lora.read_safetensors(_safetensors(tensors, dtypes, extra))
        (delta,) = lora.lora_deltas(parsed).values()
        np.testing.assert_allclose(delta, np.full((4, 3), 2 * scale, np.float32), rtol=1e-6)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, workers.lcm, workers.lcm.pipeline, workers.lcm.lora, "
            "workers.lcm.scheduler, workers.lcm._image; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'PIL') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kohya_names_give_the_module_path_merge_finds():
    import openvino as ov
    from openvino import opset13 as ops

    a = np.ones((2, 3), np.float32)
    b = np.ones((4, 2), np.float32)
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    tensors = {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b,
               f"{base}.alpha": np.array(1.0, np.float32)}
    parsed = lora.read_safetensors(_safetensors(tensors, dict.fromkeys(tensors, "F32")))
    deltas = lora.lora_deltas(parsed)
    assert list(deltas) == ["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"]
    np.testing.assert_allclose(deltas[next(iter(deltas))], np.full((4, 3), 1.0, np.float32))
    # a model whose weight Constant carries the dotted module path, as optimum names it
    x = ops.parameter([1, 3], np.float32, name="x")
    weight = ops.constant(np.zeros((4, 3), np.float32))
    weight.set_friendly_name("self.model.down_blocks.0.attentions.0.transformer_blocks.0."
                             "attn1.to_out.0.weight")
    model = ov.Model([ops.matmul(x, weight, False, True)], [x])
    merged = lora.merge(model, deltas, 0.5)
    (const,) = [op for op in merged.get_ops() if op.get_type_name() == "Constant"
                and op.get_friendly_name().endswith("to_out.0.weight")]
    np.testing.assert_allclose(const.get_data(), np.full((4, 3), 0.5, np.float32))


def test_text_encoder_lora_is_refused_not_ignored():
    a = np.ones((2, 3), np.float32)
    tensors = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": a.T.copy()}
    parsed = lora.read_safetensors(_safetensors(tensors, dict.fromkeys(tensors, "F32")))
    with pytest.raises(lora.LoraError, match="text encoder"):
        lora.lora_deltas(parsed)


def test_lora_merges_into_fp16_compressed_weights():
    """fp16 exports hold `<name>_compressed` (f16) -> Convert `<name>`: the merge reads the f16
    weight, adds the delta in f32 and feeds the layer an f32 Constant."""
    import openvino as ov
    from openvino import opset13 as ops

    name = "self.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    compressed = ops.constant(base.astype(np.float16))
    compressed.set_friendly_name(name + "_compressed")
    weight = ops.convert(compressed, "f32")
    weight.set_friendly_name(name)
    x = ops.parameter([1, 3], np.float32, name="x")
    model = ov.Model([ops.matmul(x, weight, False, True)], [x])
    delta = np.full((4, 3), 1e-3, np.float32)
    merged = lora.merge(model, {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": delta},
                        2.0)
    (const,) = [op for op in merged.get_ops() if op.get_friendly_name() == name]
    assert const.get_type_name() == "Constant" and const.get_data().dtype == np.float32
    np.testing.assert_array_equal(const.get_data(),
                                  base.astype(np.float16).astype(np.float32) + 2e-3 * 1)
    assert not [op for op in merged.get_ops() if op.get_type_name() == "Convert"]


@pytest.mark.parametrize("extra", ["lora_unet_mid_block_attentions_0_proj_in.dora_scale",
                                   "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"])
def test_lora_files_with_tensors_the_merge_cannot_apply_are_refused(extra):
    a = np.ones((2, 3), np.float32)
    tensors = {"lora_unet_conv_in.lora_down.weight": a,
               "lora_unet_conv_in.lora_up.weight": a.T.copy(), extra: a}
    parsed = lora.read_safetensors(_safetensors(tensors, dict.fromkeys(tensors, "F32")))
    with pytest.raises(lora.LoraError, match="does not apply"):
        lora.lora_deltas(parsed)
