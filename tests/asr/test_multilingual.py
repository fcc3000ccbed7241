"""Whisper base multilingual (99 languages), a checkpoint no other test uses, prepared from its
CTranslate2 folder: what the card says, language detection, a forced language, translation.

espeak-ng's voices are hard for base (see FACTS): the clips here were picked where base hears
the language; faster-whisper on the same weights gives the same answers (test_fw_parity)."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from workers.api import FolderBundle, Media, Request
from workers.asr import packaged
from workers.asr.audio import decode

from .conftest import F32

pytestmark = pytest.mark.slow
GERMAN = "Guten Morgen. Ich habe heute keine Zeit."
DETECTED = {  # voice -> a sentence base recognises in that voice
    "de": "Wo ist der Bahnhof? Ich suche den Bahnhof.",
    "es": "Buenos días. Hoy no tengo tiempo porque tengo que trabajar.",
    "it": "Oggi il tempo è soleggiato e caldo, quindi andiamo a piedi al parco.",
}


def test_the_card_is_read_from_the_checkpoint(base_prepared):
    card = json.loads((base_prepared / "bundle.json").read_text())
    s = card["settings"]
    vocab = json.loads((base_prepared / "vocab.json").read_text())
    config = json.loads((packaged.base() / "config.json").read_text())
    assert card["name"] == "whisper-base" and card["source"]["layout"] == "ctranslate2"
    assert s["multilingual"] is True and len(s["languages"]) == 99 and len(vocab) == 51865
    for key, text in [("eot", "<|endoftext|>"), ("sot", "<|startoftranscript|>"),
                      ("nospeech", "<|nocaptions|>"), ("notimestamps", "<|notimestamps|>"),
                      ("translate", "<|translate|>"), ("transcribe", "<|transcribe|>")]:
        assert vocab[s["tokens"][key]] == text
    assert vocab[s["tokens"]["timestamp_begin"]] == "<|0.00|>" and vocab[-1] == "<|30.00|>"
    for lang, i in s["lang_to_id"].items():
        assert vocab[i] == f"<|{lang}|>"
    assert sorted(s["lang_to_id"].values()) == sorted(config["lang_ids"])


@pytest.fixture(scope="module")
def handler(base_prepared):
    import workers.asr

    return workers.asr.load([FolderBundle(base_prepared)], ov.Core(), F32)


def _run(handler, wav: bytes, **params) -> dict:
    return handler(Request("asr", params, media=(Media("audio/wav", wav),)), lambda _: None).result


@pytest.mark.parametrize("voice", sorted(DETECTED))
def test_language_is_detected_when_none_is_given(handler, speak, voice):
    result = _run(handler, speak(DETECTED[voice], voice, 140))
    assert result["model"] == "whisper-base"
    assert result["language"] == voice, result


def test_english_is_detected_and_transcribed(handler, speak):
    result = _run(handler, speak("Please turn off the lights in the kitchen."))
    assert result["language"] == "en"
    assert "lights" in result["text"].lower() and "kitchen" in result["text"].lower()


def test_a_forced_language_is_used_and_reported(handler, speak):
    wav = speak(GERMAN, "de", 140)
    detected = _run(handler, wav)
    forced = _run(handler, wav, language="fr")
    assert detected["language"] == "de" and "Guten Morgen" in detected["text"]
    assert forced["language"] == "fr" and forced["text"] != detected["text"]
    assert _run(handler, wav, language="de")["text"] == detected["text"]


def test_translate_gives_english_text(handler, speak):
    result = _run(handler, speak(GERMAN, "de", 140), task="translate")
    text = result["text"].lower()
    assert "good morning" in text and "time" in text, result
    assert "morgen" not in text


def test_unknown_language_is_a_bad_request(handler, speak):
    from edge.errors import BadRequest

    with pytest.raises(BadRequest, match="unknown language"):
        _run(handler, speak(GERMAN, "de", 140), language="klingon")


def test_silence_is_empty_in_a_multilingual_model(base_pipeline):
    result = base_pipeline(np.zeros(16000 * 3, np.float32))
    assert result.text == "" and result.segments == ()


def test_long_audio_keeps_the_detected_language(base_pipeline, speak):
    audio = decode(speak(" ".join([DETECTED["es"]] * 8), "es", 140))
    assert len(audio) > 16000 * 30  # more than one window
    result = base_pipeline(audio)
    assert result.language == "es" and len(result.segments) > 2


def test_the_packed_bundle_serves_through_edgectl_run(keyring_file, tmp_path, speak, capsys):
    """`edgectl prepare asr --from DIR` encrypts the user's model into the bundle dir, and
    `edgectl run` (the worker's code path) answers from that encrypted bundle."""
    from edgectl import cli
    from edgectl.localdaemon import write_config

    from .conftest import PREPARED

    config = write_config(tmp_path / "edge.toml", node="t", mqtt_port=1, redis_url="redis://x",
                          bundle_dir=tmp_path / "bundles", keyring_file=keyring_file,
                          tasks={"asr": {"devices": ["CPU"]}})
    assert cli.main(["--config", str(config), "prepare", "asr", "--from", str(packaged.base()),
                     "--cache", str(PREPARED)]) == 0
    assert "packed" in capsys.readouterr().out
    wav = tmp_path / "de.wav"
    wav.write_bytes(speak(GERMAN, "de", 140))
    assert cli.main(["--config", str(config), "run", "asr", str(wav),
                     "--param", "model=whisper-base", "--param", "task=translate"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == "ok", answer
    result = answer["result"]
    assert result["model"] == "whisper-base" and result["language"] == "de"
    assert "good morning" in result["text"].lower()
