"""Special tokens, languages and timestamps are read from the vocabulary, whatever its shape."""

from __future__ import annotations

import pytest

from workers.asr import checkpoint
from workers.asr.checkpoint import CheckpointError

LANGS_V2 = ["en", "zh", "de", "es", "ru"] + [f"q{chr(97 + i // 26)}{chr(97 + i % 26)}"
                                             for i in range(94)]  # 99 codes


def vocab(first_eot: int, langs: list[str], nospeech: str, stamps: int = 1501) -> list[str]:
    """A Whisper-shaped vocabulary: text tokens, specials, languages, tasks, timestamps."""
    out = [f"t{i}" for i in range(first_eot)]
    out += ["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in langs]
    out += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", nospeech,
            "<|notimestamps|>"]
    return out + checkpoint.timestamp_tokens(stamps)


def test_large_v3_shape_uses_nospeech_and_its_hundredth_language():
    v = vocab(50257, LANGS_V2[:99] + ["yue"], "<|nospeech|>")
    assert len(v) == 51866
    ids = checkpoint.special_ids(v, {"decoder_start_token_id": 50258,
                                     "no_timestamps_token_id": 50364})
    assert ids["nospeech"] == 50363 and ids["notimestamps"] == 50364
    assert checkpoint.timestamps(v, ids["notimestamps"]) == (50365, 1501, 0.02)
    langs = checkpoint.languages(v, ids, None)
    assert len(langs) == 100 and langs["yue"] == 50358 and langs["en"] == 50259
    assert checkpoint.is_multilingual(len(v), {}) is True


def test_english_only_shape_uses_nocaptions_and_is_not_multilingual():
    v = vocab(50256, LANGS_V2[:99], "<|nocaptions|>")
    assert len(v) == 51864
    ids = checkpoint.special_ids(v, {})
    assert (ids["eot"], ids["sot"], ids["nospeech"]) == (50256, 50257, 50361)
    assert checkpoint.timestamps(v, ids["notimestamps"])[0] == 50363
    assert checkpoint.is_multilingual(len(v), {}) is False
    assert checkpoint.is_multilingual(len(v), {"is_multilingual": True}) is True


def test_a_generation_config_that_disagrees_with_the_vocabulary_is_refused():
    v = vocab(50257, LANGS_V2[:99], "<|nocaptions|>")
    with pytest.raises(CheckpointError, match="decoder_start_token_id"):
        checkpoint.special_ids(v, {"decoder_start_token_id": 50257})
    with pytest.raises(CheckpointError, match="task_to_id"):
        checkpoint.special_ids(v, {"task_to_id": {"translate": 1, "transcribe": 50359}})
    with pytest.raises(CheckpointError, match="language <|de|>"):
        checkpoint.languages(v, checkpoint.special_ids(v, {}), {"<|de|>": 50259})


def test_a_vocabulary_without_its_special_tokens_or_timestamps_is_refused():
    v = vocab(50257, LANGS_V2[:99], "<|nocaptions|>")
    with pytest.raises(CheckpointError, match="nospeech|nocaptions"):
        checkpoint.special_ids([t for t in v if t != "<|nocaptions|>"], {})
    ids = checkpoint.special_ids(v, {})
    with pytest.raises(CheckpointError, match="timestamp tokens"):
        checkpoint.timestamps(v[:ids["notimestamps"] + 1], ids["notimestamps"])
    with pytest.raises(CheckpointError, match="not a timestamp"):
        checkpoint.timestamps(v + ["<|extra|>"], ids["notimestamps"])
