"""The INT8 bundle transcribes like the fp one: corpus WER within one point."""

from __future__ import annotations

import openvino as ov
import pytest

from workers.api import DeviceSettings, FolderBundle
from workers.asr.audio import decode
from workers.asr.pipeline import WhisperPipeline

from .conftest import LONG, PREPARED, SHORT, words, wer

pytestmark = pytest.mark.slow
SERVED = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2})  # as the worker runs it (bf16)


@pytest.fixture(scope="module")
def folders():
    from workers.asr.prepare import prepare

    return prepare(PREPARED, options={"int8": "1"})  # cached: ~20 s only when missing


def corpus_wer(pipe: WhisperPipeline, clips: list[tuple[str, bytes]]) -> float:
    """Word errors over all clips / reference words over all clips."""
    errors = sum(wer(text, pipe(decode(wav)).text) * len(words(text)) for text, wav in clips)
    return errors / sum(len(words(text)) for text, _ in clips)


def test_int8_bundle_is_within_one_wer_point_of_fp(folders, speak):
    fp_folder, int8_folder = folders
    clips = [(text, speak(text)) for text in SHORT + (LONG,)]
    core = ov.Core()
    int8 = WhisperPipeline.load(FolderBundle(int8_folder), core, SERVED)
    assert int8.name == "whisper-tiny.en-int8"
    assert int8.settings["weight_format"] == "int8-ptq"
    fp = WhisperPipeline.load(FolderBundle(fp_folder), core, SERVED)
    assert corpus_wer(int8, clips) <= corpus_wer(fp, clips) + 0.01
