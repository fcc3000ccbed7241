"""Fixtures for the asr tests: a prepared Whisper folder, speech made by espeak-ng."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from workers.api import DeviceSettings, FolderBundle

PREPARED = Path.home() / ".cache/edge-daemon/prepared"
# f32 so that parity with torch/genai is about the algorithm, not bf16 rounding
F32 = DeviceSettings("CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})

SHORT = (
    "The weather today is sunny and warm.",
    "Please turn off the lights in the kitchen.",
    "My phone number is easy to remember.",
)
LONG = " ".join([
    "Good morning everyone, and welcome to the weekly project meeting.",
    "Today we will talk about the new sensors in the north building.",
    "The temperature readings were stable for most of the week.",
    "On Thursday the network went down for about two hours.",
    "The team replaced the old router and the problem went away.",
    "Next week we plan to install ten more devices on the second floor.",
    "Each device will send its data to the gateway every minute.",
    "We also need to update the software on the older cameras.",
    "Please send your questions to the support team before Friday.",
    "The budget for the next quarter has been approved by the board.",
    "We will hire two more engineers to help with the installation.",
    "Thank you all for your hard work, and see you next week.",
] * 2)


@pytest.fixture(scope="session")
def prepared() -> Path:
    from workers.asr.prepare import prepare

    (folder,) = prepare(PREPARED)
    return folder


@pytest.fixture(scope="session")
def base_prepared() -> Path:
    """Whisper base multilingual (CT2, from its PyPI packages) prepared through the CLI path,
    `edgectl prepare asr --from DIR --no-pack`; reused across runs while its source is unchanged."""
    from edgectl import cli
    from workers.asr import packaged

    source = packaged.base()  # joins the two model.bin parts once, under ~/.cache
    code = cli.main(["prepare", "asr", "--from", str(source), "--no-pack",
                     "--cache", str(PREPARED)])
    assert code == 0
    return PREPARED / "whisper-base"


@pytest.fixture(scope="session")
def base_pipeline(base_prepared: Path):
    from workers.asr.pipeline import WhisperPipeline

    return WhisperPipeline.load(FolderBundle(base_prepared), ov.Core(), F32)


@pytest.fixture(scope="session")
def pipeline(prepared: Path):
    from workers.asr.pipeline import WhisperPipeline

    return WhisperPipeline.load(FolderBundle(prepared), ov.Core(), F32)


@pytest.fixture(scope="session")
def speak(tmp_path_factory):
    """speak(text, voice="en-us", speed=175) -> WAV bytes from espeak-ng (22.05 kHz mono s16)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install -y espeak-ng")
    folder = tmp_path_factory.mktemp("speech")
    cache: dict[str, bytes] = {}

    def make(text: str, voice: str = "en-us", speed: int = 175) -> bytes:
        key = f"{voice}/{speed}/{text}"
        if key not in cache:
            path = folder / f"{len(cache)}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text],
                           check=True)
            cache[key] = path.read_bytes()
        return cache[key]

    return make


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance over the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, 1):
        prev, row = row, np.empty_like(row)
        row[0] = i
        for j, h in enumerate(hyp, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (r != h))
    return float(row[-1]) / max(1, len(ref))
