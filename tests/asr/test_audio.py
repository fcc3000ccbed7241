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


# -- hostile headers: every cost is checked before it is paid (README, "Hostile input")


def header(rate: int = RATE, channels: int = 1, bits: int = 16, tag: int = 1,
           data: bytes = b"\0" * 64, data_size: int | None = None, riff_size: int | None = None,
           before_data: bytes = b"") -> bytes:
    """A WAV built by hand so that every field may lie."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF,
                      block & 0xFFFF, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    chunks += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    size = 4 + len(chunks) if riff_size is None else riff_size
    return b"RIFF" + struct.pack("<I", size) + b"WAVE" + chunks


@pytest.mark.parametrize("rate", [1_600_033, 16_000_000, 999, 384_001, 0])
def test_a_wav_claiming_an_absurd_rate_is_unsupported_media_naming_the_range(rate):
    bomb = header(rate=rate)
    assert len(bomb) < 200
    with pytest.raises(UnsupportedMedia, match=f"sample rate {rate} Hz is outside the "
                                               "supported 1000-384000 Hz"):
        decode(bomb)


@pytest.mark.parametrize("channels", [0, 65, 65535])
def test_a_wav_claiming_no_or_too_many_channels_is_unsupported_media(channels):
    with pytest.raises(UnsupportedMedia, match=f"{channels} audio channels is outside the "
                                               "supported 1-64"):
        decode(header(channels=channels))


@pytest.mark.parametrize("bits", [0, 7, 64])
def test_a_pcm_wav_with_an_unknown_bit_depth_is_unsupported_media(bits):
    with pytest.raises(UnsupportedMedia, match=f"1/{bits}-bit is not supported"):
        decode(header(bits=bits))


def test_a_data_chunk_claiming_more_than_the_file_holds_decodes_what_is_there():
    samples = np.round(TONE * 32767).astype("<i2").tobytes()
    out = decode(header(data=samples, data_size=0xFFFFFFF0))
    assert out.shape == TONE.shape and np.abs(out - TONE).max() < 1e-4


def test_a_riff_size_lie_is_ignored():
    samples = np.round(TONE * 32767).astype("<i2").tobytes()
    for size in (0, 12, 0xFFFFFFFF):
        out = decode(header(data=samples, riff_size=size))
        assert out.shape == TONE.shape


@pytest.mark.parametrize("chunk", [b"fact", b"LIST"])
def test_a_chunk_claiming_four_gigabytes_before_the_data_is_refused(chunk):
    huge = chunk + struct.pack("<I", 0xFFFFFFF0) + b"\0" * 16
    with pytest.raises(UnsupportedMedia, match="no data chunk"):
        decode(header(before_data=huge))


def test_a_wav_with_thousands_of_chunks_is_refused_at_the_bound():
    many = (b"junk" + struct.pack("<I", 0)) * 5000
    with pytest.raises(UnsupportedMedia, match="more than 64 chunks"):
        decode(header(before_data=many))


def test_truncated_wavs_are_unsupported_media():
    whole = header(data=b"\1\0" * 100)
    with pytest.raises(UnsupportedMedia, match="fmt chunk is truncated"):
        decode(whole[:30])  # inside the fmt chunk
    with pytest.raises(UnsupportedMedia, match="no data chunk"):
        decode(whole[:40])  # fmt complete, data chunk header cut
    with pytest.raises(BadRequest, match="empty"):
        decode(whole[:45])  # data header, less than one frame


@pytest.mark.parametrize("fmt,match", [
    (PcmFormat(1_600_033, "s16le"), "1000-384000 Hz"),
    (PcmFormat(16_000_000, "f64le", 64), "1000-384000 Hz"),
    (PcmFormat(16000, "s16le", 0), "1-64"),
    (PcmFormat(16000, "s16le", 65535), "1-64"),
    (PcmFormat(16000, "s12le"), "'s12le' is not supported"),
])
def test_raw_pcm_with_extreme_params_is_unsupported_media(fmt, match):
    with pytest.raises(UnsupportedMedia, match=match):
        decode(b"\0" * 1024, raw=fmt)


def test_an_l16_content_type_is_held_to_the_same_bounds():
    with pytest.raises(UnsupportedMedia, match="1000-384000 Hz"):
        decode(b"\0" * 64, raw=pcm_format("audio/L16;rate=1600033", {}))
    with pytest.raises(UnsupportedMedia, match="1-64"):
        decode(b"\0" * 64, raw=pcm_format("audio/L16;rate=16000;channels=900", {}))
    with pytest.raises(BadRequest, match="rate must be an integer"):
        pcm_format("audio/L16;rate=fast", {})


def test_audio_past_the_memory_budget_is_refused_naming_the_budget():
    ten_minutes = np.zeros(RATE * 600, "<i2").tobytes()  # 19 MB of s16 -> 38 MB of float32
    with pytest.raises(PayloadTooLarge, match=r"over the per-job budget of 16 MiB "
                                              r"\(\[limits\] job_memory\)"):
        decode(ten_minutes, raw=PcmFormat(RATE, "s16le"), budget_bytes=16 << 20)


@pytest.mark.parametrize("rate,name,channels", [
    (44100, "s16le", 2), (48000, "s24le", 2), (8000, "u8", 1), (RATE, "f64le", 1),
    (383_999, "s16le", 1),  # coprime with 16 kHz: the interpolated filter table
    (384_000, "s32le", 64),
])
def test_decoding_allocates_no_more_than_the_declared_cost(rate, name, channels):
    import tracemalloc

    from workers.asr.audio import _width, open_clip

    frames = min(rate * 20, 2_000_000 // channels)
    data = np.random.default_rng(0).integers(0, 255, frames * channels * _width(name),
                                             dtype=np.uint8).tobytes()
    clip = open_clip(data, raw=PcmFormat(rate, name, channels))
    tracemalloc.start()
    try:
        out = clip.decode(RATE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == clip.frames_at(RATE)
    assert peak <= clip.cost(RATE), (peak, clip.cost(RATE))


def test_a_rate_coprime_with_16k_resamples_accurately_in_bounded_memory():
    import tracemalloc

    rate = 383_999  # up = 16000 phases: the exact bank would be 12M taps (~500 MB to build)
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    tracemalloc.start()
    try:
        out = resample(x, rate, RATE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / RATE)
    assert len(out) == RATE and np.abs(out - ref)[200:-200].max() < 2e-3


def test_the_asr_handler_checks_rate_and_budget_before_decoding(pipeline):
    from workers.api import Media, Request, no_progress
    from workers.asr import AsrHandler

    def ask(handler, data):
        return handler(Request("asr", {}, media=(Media("audio/wav", data),)), no_progress)

    roomy = AsrHandler({"m": pipeline}, job_memory=1 << 30)
    with pytest.raises(UnsupportedMedia, match="1600033 Hz is outside the supported"):
        ask(roomy, header(rate=1_600_033))
    minute = header(data=np.zeros(RATE * 60, "<i2").tobytes())
    tight = AsrHandler({"m": pipeline}, job_memory=16 << 20)
    with pytest.raises(PayloadTooLarge, match=r"transcribing 60 s of 1-channel 16000 Hz audio"
                                              r" needs \d+ MiB .* budget of 16 MiB"):
        ask(tight, minute)
    assert ask(roomy, minute).result["text"] == ""  # digital silence is no speech


def test_the_pipeline_allocates_no_more_than_its_declared_working_memory(pipeline):
    import tracemalloc

    audio = np.zeros(RATE * 95, np.float32)  # four windows, silent: no inference needed
    tracemalloc.start()
    try:
        pipeline(audio)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= pipeline.working_bytes(len(audio)), (peak, pipeline.working_bytes(len(audio)))
