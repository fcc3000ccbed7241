"""Audio decoding: every WAV flavour and raw PCM land as the same 16 kHz mono signal."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge.errors import BadRequest, PayloadTooLarge, UnsupportedMedia
from workers.asr.audio import PcmFormat, decode, pcm_format, resample

RATE = 16000
TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)


def wav(samples: np.ndarray, rate: int, tag: int, bits: int, channels: int = 1,
        extensible: bool = False) -> bytes:
    data = samples.tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block,
                      block, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + b"\0" * 14
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", 3) + b"abc\0"  # odd chunk: padded to even
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def s24(x: np.ndarray) -> np.ndarray:
    ints = np.round(x * (2 ** 23 - 1)).astype("<i4")
    return ints.view(np.uint8).reshape(-1, 4)[:, :3].copy()


ENCODINGS = {
    "u8": (lambda x: np.round(x * 127 + 128).astype(np.uint8), 1, 8, 1e-2),
    "s16": (lambda x: np.round(x * 32767).astype("<i2"), 1, 16, 1e-4),
    "s24": (s24, 1, 24, 1e-6),
    "s32": (lambda x: np.round(x * (2 ** 31 - 1)).astype("<i4"), 1, 32, 1e-6),
    "f32": (lambda x: x.astype("<f4"), 3, 32, 1e-7),
    "f64": (lambda x: x.astype("<f8"), 3, 64, 1e-7),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("extensible", [False, True])
def test_wav_encodings_decode_to_the_same_signal(encoding, extensible):
    encode, tag, bits, tol = ENCODINGS[encoding]
    out = decode(wav(encode(TONE), RATE, tag, bits, extensible=extensible))
    assert out.dtype == np.float32 and out.shape == TONE.shape
    assert np.abs(out - TONE).max() < tol


def test_stereo_is_mixed_to_mono():
    stereo = np.stack([TONE, -TONE * 0 + TONE], axis=1)
    out = decode(wav(np.round(stereo * 32767).astype("<i2"), RATE, 1, 16, channels=2))
    assert np.abs(out - TONE).max() < 1e-4


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_is_resampled_to_16k(rate):
    t = np.arange(rate * 2) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = decode(wav(np.round(x * 32767).astype("<i2"), rate, 1, 16))
    assert len(out) == 2 * RATE
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / RATE)
    assert np.abs(out - ref)[200:-200].max() < 2e-3


def test_downsampling_removes_what_16k_cannot_hold():
    rate = 48000
    x = np.sin(2 * np.pi * 12000 * np.arange(rate) / rate).astype(np.float32)  # above 8 kHz
    assert np.abs(resample(x, rate, RATE))[100:-100].max() < 0.02


def test_raw_pcm_needs_and_uses_its_params():
    raw = np.round(TONE * 32767).astype("<i2").tobytes()
    fmt = pcm_format("audio/pcm", {"sample_rate": RATE, "format": "s16le"})
    assert np.abs(decode(raw, raw=fmt) - TONE).max() < 1e-4
    l16 = pcm_format("audio/L16;rate=16000;channels=1", {})
    big = np.round(TONE * 32767).astype(">i2").tobytes()
    assert np.abs(decode(big, raw=l16) - TONE).max() < 1e-4
    with pytest.raises(UnsupportedMedia):
        decode(raw)  # no header, no params


def test_bad_inputs_get_client_errors():
    with pytest.raises(BadRequest):
        decode(b"")
    with pytest.raises(BadRequest):
        decode(wav(np.zeros(0, "<i2"), RATE, 1, 16))
    with pytest.raises(UnsupportedMedia):
        decode(b"<html>not audio</html>")
    with pytest.raises(UnsupportedMedia):
        decode(wav(np.zeros(10, "<i2"), RATE, 2, 16))  # ADPCM tag
    with pytest.raises(PayloadTooLarge):
        decode(wav(np.zeros(RATE * 3, "<i2"), RATE, 1, 16), max_seconds=2)
    with pytest.raises(BadRequest):
        pcm_format("audio/pcm", {"format": "s16le"})
    assert decode(np.zeros(10, "<i2").tobytes(), raw=PcmFormat(RATE, "s16le")).shape == (10,)
