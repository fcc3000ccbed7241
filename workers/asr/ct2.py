"""Read a CTranslate2 Whisper `model.bin` and rename its weights to Hugging Face's names.

Build host only (prepare). The CT2 binary format (version 6): a header, then for every
variable a NUL-terminated name, its shape, a dtype id and the raw bytes; then aliases
(tied weights). Whisper in CT2 fuses projections that Hugging Face keeps apart:

* self-attention `linear_0` is Q/K/V stacked on the output axis (3 * d_model rows);
* cross-attention `linear_0` is Q and `linear_1` is K/V stacked;
* `proj_out` is an alias of the token embeddings.

Hugging Face's K projections have no bias: CT2 stores zeros there, which `to_hf` checks.
`build_hf` writes the whole Hugging Face folder (weights, tokenizer, configs) from a CT2 one.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# CT2's DataType enum
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


@dataclass(frozen=True, slots=True)
class Ct2Model:
    """The variables of a CT2 model, by name (aliases resolved), and its spec name."""

    spec: str
    variables: Mapping[str, np.ndarray]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        size = self.unpack("H")
        raw = self.data[self.pos:self.pos + size]
        self.pos += size
        return raw.rstrip(b"\0").decode("utf-8")  # names are NUL-padded

    def array(self, shape: list[int], dtype: int, nbytes: int) -> np.ndarray:
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported CT2 dtype id {dtype}")
        raw = np.frombuffer(self.data, np.uint8, nbytes, self.pos)
        self.pos += nbytes
        return raw.view(_DTYPES[dtype]).reshape(shape)


def read_ct2(path: Path) -> Ct2Model:
    """Parse a CT2 `model.bin` (binary format 6) into arrays (views on the file bytes)."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.unpack("I")
    if version != 6:
        raise ValueError(f"CT2 binary version {version} is not supported (want 6)")
    spec = reader.string()
    reader.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype = reader.unpack("B")
        variables[name] = reader.array(shape, dtype, reader.unpack("I"))
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    return Ct2Model(spec, variables)


def layer_count(model: Ct2Model, side: str) -> int:
    """How many transformer layers the encoder or decoder has."""
    parts = (name.split("/") for name in model.variables)
    return len({p[1] for p in parts if p[0] == side and p[1].removeprefix("layer_").isdigit()})


def _linear(out: dict, v: Mapping, src: str, dst: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = v[f"{src}/weight"]
    if bias:
        out[f"{dst}.bias"] = v[f"{src}/bias"]


def _norm(out: dict, v: Mapping, src: str, dst: str) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def _split(out: dict, v: Mapping, src: str, dsts: list[str], d_model: int) -> None:
    """Unfuse stacked projections; the K part has no bias in HF (CT2 stores zeros)."""
    weight, bias = v[f"{src}/weight"], v[f"{src}/bias"]
    if weight.shape[0] != d_model * len(dsts):
        raise ValueError(f"{src}: {weight.shape[0]} rows, want {d_model} x {len(dsts)}")
    for i, dst in enumerate(dsts):
        rows = slice(i * d_model, (i + 1) * d_model)
        out[f"{dst}.weight"] = weight[rows]
        if dst.endswith("k_proj"):
            if np.any(bias[rows] != 0):
                raise ValueError(f"{src}: K bias is not zero; mapping would lose it")
        else:
            out[f"{dst}.bias"] = bias[rows]


def _ffn(out: dict, v: Mapping, src: str, dst: str) -> None:
    _norm(out, v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    _linear(out, v, f"{src}/ffn/linear_0", f"{dst}.fc1")
    _linear(out, v, f"{src}/ffn/linear_1", f"{dst}.fc2")


def to_hf(model: Ct2Model) -> dict[str, np.ndarray]:
    """Hugging Face `WhisperForConditionalGeneration` state dict (fp32 arrays)."""
    v = model.variables
    d_model = v["encoder/layer_norm/gamma"].shape[0]
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, v, f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    for i in range(layer_count(model, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        attn = f"{src}/self_attention"
        _norm(out, v, f"{attn}/layer_norm", f"{dst}.self_attn_layer_norm")
        _split(out, v, f"{attn}/linear_0",
               [f"{dst}.self_attn.{p}_proj" for p in "qkv"], d_model)
        _linear(out, v, f"{attn}/linear_1", f"{dst}.self_attn.out_proj")
        _ffn(out, v, src, dst)
    _norm(out, v, "encoder/layer_norm", "model.encoder.layer_norm")

    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    for i in range(layer_count(model, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        attn, cross = f"{src}/self_attention", f"{src}/attention"
        _norm(out, v, f"{attn}/layer_norm", f"{dst}.self_attn_layer_norm")
        _split(out, v, f"{attn}/linear_0",
               [f"{dst}.self_attn.{p}_proj" for p in "qkv"], d_model)
        _linear(out, v, f"{attn}/linear_1", f"{dst}.self_attn.out_proj")
        _norm(out, v, f"{cross}/layer_norm", f"{dst}.encoder_attn_layer_norm")
        _linear(out, v, f"{cross}/linear_0", f"{dst}.encoder_attn.q_proj")
        _split(out, v, f"{cross}/linear_1",
               [f"{dst}.encoder_attn.{p}_proj" for p in "kv"], d_model)
        _linear(out, v, f"{cross}/linear_2", f"{dst}.encoder_attn.out_proj")
        _ffn(out, v, src, dst)
    _norm(out, v, "decoder/layer_norm", "model.decoder.layer_norm")
    return {name: np.asarray(a, dtype=np.float32) for name, a in out.items()}


def config_values(model: Ct2Model) -> dict[str, int]:
    """The `WhisperConfig` sizes implied by the weights (checked against the config)."""
    v = model.variables
    vocab, d_model = v["decoder/embeddings/weight"].shape
    return {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
        "encoder_layers": layer_count(model, "encoder"),
        "decoder_layers": layer_count(model, "decoder"),
        "encoder_attention_heads": int(v["encoder/num_heads"]),
        "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
    }


def build_hf(src: Path, out: Path) -> None:
    """A Hugging Face Whisper checkpoint (+ tokenizer, feature extractor, generation config)
    from a CT2 folder; every special id, language and suppress list read from the folder."""
    import json

    import torch
    import transformers

    from workers.asr.checkpoint import CheckpointError, is_multilingual, special_ids

    try:
        model = read_ct2(src / "model.bin")
    except (ValueError, struct.error) as exc:
        raise CheckpointError(f"{src / 'model.bin'}: not a CTranslate2 model ({exc})") from None
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{src / 'model.bin'} is a CTranslate2 {model.spec}, not Whisper")
    weight = model.variables["decoder/embeddings/weight"]
    if weight.dtype.kind != "f" or any(n.endswith("weight_scale") for n in model.variables):
        raise CheckpointError(f"{src / 'model.bin'} holds quantized weights ({weight.dtype}); "
                              "give a float16 or float32 conversion (ct2-transformers-converter "
                              "--quantization float16) or the Hugging Face folder")
    card = json.loads((src / "config.json").read_text())
    for key in ("suppress_ids", "suppress_ids_begin"):
        if key not in card:
            raise CheckpointError(f"{src / 'config.json'} lacks {key!r} (CTranslate2's Whisper "
                                  "converter writes it)")
    sizes = config_values(model)
    tokenizer, vocab = hf_tokenizer(src, sizes["vocab_size"])
    ids = special_ids(vocab, {})
    multilingual = is_multilingual(sizes["vocab_size"], {})
    lang_to_id = {vocab[i]: i for i in card.get("lang_ids", [])} if multilingual else {}
    # transformers 5 configs are dataclasses made by huggingface_hub's @strict at runtime, which
    # type checkers do not see: mypy knows only PreTrainedConfig's fields
    config = transformers.WhisperConfig(  # type: ignore[call-arg]  # see above
        **sizes,  # type: ignore[arg-type]  # see above: matched against the base's fields
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=card["suppress_ids"],
        begin_suppress_tokens=card["suppress_ids_begin"], tie_word_embeddings=True)
    hf = transformers.WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(v) for k, v in to_hf(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:
        raise CheckpointError(f"CT2 mapping: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config = generation_config(
        ids, card["suppress_ids"], card["suppress_ids_begin"], card.get("alignment_heads"),
        multilingual=multilingual, lang_to_id=lang_to_id)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (src / "preprocessor_config.json").is_file():  # large-v3 folders carry theirs (128 mels)
        import shutil

        shutil.copy(src / "preprocessor_config.json", out / "preprocessor_config.json")
    else:
        transformers.WhisperFeatureExtractor(
            feature_size=sizes["num_mel_bins"]).save_pretrained(out)


def hf_tokenizer(src: Path, vocab_size: int) -> tuple[Any, list[str]]:
    """The folder's tokenizer.json completed to `vocab_size` tokens, and its id -> token list.

    CT2 folders' tokenizer.json usually lacks the timestamp tokens; they are added from the
    folder's vocabulary (vocabulary.txt / .json lists every id), else generated after
    `<|notimestamps|>` (`<|0.00|>`, `<|0.02|>`, ...).
    """
    import json

    import tokenizers
    from transformers import WhisperTokenizer  # the fast one (WhisperTokenizerFast: an alias)

    from workers.asr.checkpoint import SPECIAL, CheckpointError, timestamp_tokens

    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    have = tok.get_vocab_size(with_added_tokens=True)
    listed: list[str] | None = None
    if (src / "vocabulary.json").is_file():
        listed = json.loads((src / "vocabulary.json").read_text("utf-8"))
    elif (src / "vocabulary.txt").is_file():
        listed = (src / "vocabulary.txt").read_text("utf-8").split("\n")[:vocab_size]
    if listed is not None and len(listed) != vocab_size:
        raise CheckpointError(f"{src}: the vocabulary lists {len(listed)} tokens, the weights "
                              f"have {vocab_size}")
    if tok.id_to_token(have - 1) != SPECIAL["notimestamps"][0] and have < vocab_size:
        raise CheckpointError(f"{src / 'tokenizer.json'} has {have} tokens, the weights "
                              f"{vocab_size}, and does not end with <|notimestamps|>")
    tail = listed[have:] if listed is not None else timestamp_tokens(vocab_size - have)
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in tail])
    vocab = [tok.id_to_token(i) for i in range(vocab_size)]
    if listed is not None and vocab != listed:
        bad = next(i for i, (a, b) in enumerate(zip(vocab, listed, strict=True)) if a != b)
        raise CheckpointError(f"{src}: tokenizer.json and the vocabulary disagree at id {bad} "
                              f"({vocab[bad]!r} vs {listed[bad]!r})")
    eot = SPECIAL["eot"][0]
    return WhisperTokenizer(tokenizer_object=tok, unk_token=eot, bos_token=eot, eos_token=eot,
                            pad_token=eot), vocab


def generation_config(ids: Mapping[str, int], suppress: list[int], begin_suppress: list[int],
                      alignment_heads: Any, *, multilingual: bool,
                      lang_to_id: Mapping[str, int]) -> Any:
    """The generation config transformers and openvino.genai read for Whisper."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], suppress_tokens=list(suppress),
        begin_suppress_tokens=list(begin_suppress), max_length=448,
        no_timestamps_token_id=ids["notimestamps"], prev_sot_token_id=ids["startofprev"],
        max_initial_timestamp_index=50, is_multilingual=multilingual,
        lang_to_id=dict(lang_to_id), task_to_id={"translate": ids["translate"],
                                                 "transcribe": ids["transcribe"]},
        alignment_heads=alignment_heads, return_timestamps=False)
