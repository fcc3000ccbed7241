"""Audio bytes -> 16 kHz mono float32: WAV (PCM 8/16/24/32-bit, float 32/64) and raw PCM.

Pure numpy + stdlib. The WAV reader walks RIFF chunks itself because the stdlib `wave` module
(3.11) refuses IEEE-float and WAVE_FORMAT_EXTENSIBLE files, which real recorders write.

Costs are known before they are paid: `open_clip` reads the header only and refuses a rate,
channel count or encoding outside what is supported (`unsupported_media`); `Clip.cost` is the
most `Clip.decode` allocates, so a caller checks it against the job's budget first. Decoding
works in blocks: the only full-length arrays are the mono signal and the resampled one.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.constants import AUDIO_MAX_CHANNELS, AUDIO_RATE_RANGE
from edge.errors import BadRequest, PayloadTooLarge, UnsupportedMedia
from workers import budget

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
# raw format name -> (numpy dtype or "s24", offset to centre unsigned data, full scale)
_RAW: dict[str, tuple[np.dtype[Any] | str, float, float]] = {
    "u8": (np.dtype(np.uint8), 128.0, 128.0), "s8": (np.dtype(np.int8), 0.0, 128.0),
    "s16le": (np.dtype("<i2"), 0.0, 32768.0), "s16be": (np.dtype(">i2"), 0.0, 32768.0),
    "s24le": ("s24", 0.0, 8388608.0), "s32le": (np.dtype("<i4"), 0.0, 2147483648.0),
    "f32le": (np.dtype("<f4"), 0.0, 1.0), "f64le": (np.dtype("<f8"), 0.0, 1.0),
}
MAX_WAV_CHUNKS = 64  # RIFF chunks before the data chunk (real files have a handful)
BLOCK_SAMPLES = 1 << 18  # raw samples converted to float at once
BANK_ELEMENTS = 1 << 22  # resampler filter coefficients kept at most (16 MiB of float32)
BLOCK_ELEMENTS = 1 << 19  # output samples x filter taps computed at once
# bytes of block-sized temporaries: conversion (s24: 20 B a sample) and resampling (index,
# gathered samples, gathered or interpolated filters: <= 40 B an element); bank building
WORKSPACE = BLOCK_SAMPLES * 24 + BLOCK_ELEMENTS * 40 + (1 << 18) * 48


@dataclass(frozen=True, slots=True)
class PcmFormat:
    """How raw sample bytes are laid out."""

    sample_rate: int
    format: str  # a key of _RAW
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Clip:
    """Audio as its header declares it: the layout and the (undecoded) whole frames."""

    format: PcmFormat
    payload: memoryview

    @property
    def frames(self) -> int:
        return len(self.payload) // (_width(self.format.format) * self.format.channels)

    @property
    def seconds(self) -> float:
        return self.frames / self.format.sample_rate

    def frames_at(self, rate: int) -> int:
        """How many samples the clip has once resampled to `rate`."""
        up, down, _, _ = _ratio(self.format.sample_rate, rate)
        return self.frames * up // down

    def cost(self, rate: int) -> int:
        """The most bytes `decode(rate)` allocates: the mono signal, the resampler's padded
        copy, filter bank and output, and block-sized temporaries."""
        mono = self.frames * 4
        if self.format.sample_rate == rate:
            return mono + WORKSPACE
        _, _, _, half = _ratio(self.format.sample_rate, rate)
        bank = BANK_ELEMENTS * 4 + 2 * half * 4
        return mono + (self.frames + 2 * half + 1) * 4 + self.frames_at(rate) * 4 + bank \
            + WORKSPACE

    def decode(self, rate: int) -> np.ndarray:
        """Mono float32 at `rate` (check `cost` first: this allocates it)."""
        return resample(_to_mono(self), self.format.sample_rate, rate)


def open_clip(data: bytes, *, raw: PcmFormat | None = None) -> Clip:
    """The clip's layout from its WAV header (or `raw`), refused if outside what is supported.

    Nothing is decoded: a rate outside `AUDIO_RATE_RANGE`, a channel count outside
    1-`AUDIO_MAX_CHANNELS` or an unknown encoding is `unsupported_media`, no frames `bad_request`.
    """
    if not data:
        raise BadRequest("audio is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        fmt, payload = _parse_wav(data)
    elif raw is not None:
        fmt, payload = raw, memoryview(data)
    else:
        raise UnsupportedMedia("not a WAV file; for raw PCM give sample_rate and format")
    _check_format(fmt)
    width = _width(fmt.format) * fmt.channels
    frames = len(payload) // width
    if frames == 0:
        raise BadRequest("audio is empty")
    return Clip(fmt, payload[:frames * width])


def decode(data: bytes, *, raw: PcmFormat | None = None, rate: int = 16000,
           max_seconds: float = math.inf, budget_bytes: float = math.inf) -> np.ndarray:
    """Decode WAV or raw PCM bytes to mono float32 at `rate`, refusing what is too long or
    would need more than `budget_bytes`, before decoding."""
    clip = open_clip(data, raw=raw)
    check_duration(clip, max_seconds)
    if clip.cost(rate) > budget_bytes:
        budget.check(clip.cost(rate), int(budget_bytes), f"decoding {describe(clip)}")
    return clip.decode(rate)


def check_duration(clip: Clip, max_seconds: float) -> None:
    """`payload_too_large` for a clip longer than `max_seconds`."""
    if clip.seconds > max_seconds:
        raise PayloadTooLarge(f"audio is {clip.seconds:.0f} s long; "
                              f"the limit is {max_seconds:.0f} s")


def describe(clip: Clip) -> str:
    """`12 s of 2-channel 44100 Hz audio`, for messages."""
    f = clip.format
    return f"{clip.seconds:.0f} s of {f.channels}-channel {f.sample_rate} Hz audio"


def pcm_format(content_type: str, params: dict) -> PcmFormat | None:
    """The raw PCM layout given by params or an `audio/L16;rate=...` content type, if any."""
    kind, _, rest = content_type.partition(";")
    options = dict(p.strip().partition("=")[::2] for p in rest.split(";") if "=" in p)
    if kind.strip().lower() == "audio/l16":  # RFC 2586: big-endian 16-bit
        rate = params.get("sample_rate") or options.get("rate")
        if not rate:
            raise BadRequest("audio/L16 needs a rate (content type or sample_rate param)")
        channels = params.get("channels") or options.get("channels") or 1
        return PcmFormat(_int(rate, "rate"), "s16be", _int(channels, "channels"))
    if "sample_rate" in params or "format" in params:
        if "sample_rate" not in params:
            raise BadRequest("raw PCM needs the sample_rate param")
        return PcmFormat(params["sample_rate"], params.get("format", "s16le"),
                         params.get("channels", 1))
    return None


def _int(value: object, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise BadRequest(f"audio/L16 {name} must be an integer, not {str(value)[:20]!r}") from None


def _check_format(fmt: PcmFormat) -> None:
    low, high = AUDIO_RATE_RANGE
    if not low <= fmt.sample_rate <= high:
        raise UnsupportedMedia(f"sample rate {fmt.sample_rate} Hz is outside the supported "
                               f"{low}-{high} Hz")
    if not 1 <= fmt.channels <= AUDIO_MAX_CHANNELS:
        raise UnsupportedMedia(f"{fmt.channels} audio channels is outside the supported "
                               f"1-{AUDIO_MAX_CHANNELS}")
    if fmt.format not in _RAW:
        raise UnsupportedMedia(f"raw PCM format {fmt.format!r} is not supported")


def _parse_wav(data: bytes) -> tuple[PcmFormat, memoryview]:
    view, pos, fmt = memoryview(data), 12, None
    for _ in range(MAX_WAV_CHUNKS + 1):
        if pos + 8 > len(data):
            break
        chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = view[pos + 8:pos + 8 + size]  # streaming writers put 0/0xFFFFFFFF: clamp
        if chunk == b"fmt ":
            fmt = _parse_fmt(bytes(body[:40]))  # the longest fmt body we read (extensible)
        elif chunk == b"data":
            if fmt is None:
                raise UnsupportedMedia("WAV data chunk comes before its fmt chunk")
            if size == 0:  # unknown size (a stream): take the rest of the file
                body = view[pos + 8:]
            return fmt, body
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    else:
        raise UnsupportedMedia(f"WAV file has more than {MAX_WAV_CHUNKS} chunks before its data")
    raise UnsupportedMedia("WAV file has no data chunk (truncated?)")


def _parse_fmt(body: bytes) -> PcmFormat:
    if len(body) < 16:
        raise UnsupportedMedia("WAV fmt chunk is truncated")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the subformat GUID
    _check_format(PcmFormat(rate, "u8", channels))  # rate and channels before the encoding
    names = {(_PCM, 8): "u8", (_PCM, 16): "s16le", (_PCM, 24): "s24le", (_PCM, 32): "s32le",
             (_FLOAT, 32): "f32le", (_FLOAT, 64): "f64le"}
    if (tag, bits) not in names:
        raise UnsupportedMedia(f"WAV encoding {tag}/{bits}-bit is not supported "
                               "(PCM 8/16/24/32-bit or float 32/64)")
    return PcmFormat(rate, names[(tag, bits)], channels)


def _width(name: str) -> int:
    dtype = _RAW[name][0]
    return 3 if dtype == "s24" else np.dtype(dtype).itemsize


def _to_mono(clip: Clip) -> np.ndarray:
    """The clip as mono float32, converted BLOCK_SAMPLES raw samples at a time."""
    fmt, frames = clip.format, clip.frames
    width = _width(fmt.format) * fmt.channels
    mono = np.empty(frames, np.float32)
    step = max(1, BLOCK_SAMPLES // fmt.channels)
    for start in range(0, frames, step):
        stop = min(start + step, frames)
        samples = _to_float(clip.payload[start * width:stop * width], fmt.format)
        samples = samples.reshape(stop - start, fmt.channels)
        if fmt.channels > 1:
            samples.mean(axis=1, dtype=np.float32, out=mono[start:stop])
        else:
            mono[start:stop] = samples[:, 0]
    return mono


def _to_float(raw: memoryview, name: str) -> np.ndarray:
    dtype, offset, scale = _RAW[name]
    if dtype == "s24":  # sign-extend 3-byte little-endian samples via the top of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8
        return ints.astype(np.float32) / np.float32(scale)
    with np.errstate(over="ignore", invalid="ignore"):  # f64 past f32's range: clipped below
        out = np.frombuffer(raw, dtype).astype(np.float32)
    if offset:
        out -= np.float32(offset)
    if scale != 1.0:
        out /= np.float32(scale)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0)


def _ratio(src: int, dst: int, zero_crossings: int = 16) -> tuple[int, int, float, int]:
    """(up, down, cutoff, half): the reduced ratio, the low-pass cutoff (of the input
    Nyquist: anti-alias when going down) and the filter's half length in input samples."""
    g = math.gcd(src, dst)
    cutoff = min(1.0, dst / src)
    return dst // g, src // g, cutoff, int(math.ceil(zero_crossings / cutoff))


def resample(x: np.ndarray, src: int, dst: int, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling by a Hann-windowed sinc; memory O(len(x)) whatever the ratio.

    The ratio is reduced by the gcd; when its `up` distinct fractional positions times the
    filter length fit in BANK_ELEMENTS, each gets a precomputed filter (exact). Otherwise (a
    rate coprime with `dst`) the filter is tabulated at as many evenly spaced positions as fit
    and interpolated linearly between the two nearest (error ~1e-6 of full scale). Output is
    produced in blocks of BLOCK_ELEMENTS filter taps.
    """
    if src == dst:
        return x
    up, down, cutoff, half = _ratio(src, dst, zero_crossings)
    taps = np.arange(-half + 1, half + 1)  # input offsets from floor(t)
    exact = up * len(taps) <= BANK_ELEMENTS
    if exact:
        bank = _bank(np.arange(up) * down % up / up, taps, cutoff, half)
    else:
        phases = max(2, BANK_ELEMENTS // len(taps) - 1)
        bank = _bank(np.arange(phases + 1) / phases, taps, cutoff, half)
    n_out = int(len(x) * up // down)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])
    out = np.empty(n_out, np.float32)
    block = max(1, BLOCK_ELEMENTS // len(taps))
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out))
        base = n * down // up  # floor of the input position
        idx = base[:, None] + (taps + half)[None, :]
        if exact:
            weights = bank[n % up]
        else:
            pos = (n * down % up) * (phases / up)
            k = np.minimum(pos.astype(np.int64), phases - 1)
            w = (pos - k).astype(np.float32)[:, None]
            weights = bank[k] * (1 - w) + bank[k + 1] * w
        out[start:start + len(n)] = np.einsum("ij,ij->i", padded[idx], weights)
    return out


def _bank(frac: np.ndarray, taps: np.ndarray, cutoff: float, half: int) -> np.ndarray:
    """Normalised windowed-sinc filters (float32), one row per fractional input position,
    computed a few rows at a time so that the float64 temporaries stay small."""
    bank = np.empty((len(frac), len(taps)), np.float32)
    rows = max(1, (1 << 18) // len(taps))
    for start in range(0, len(frac), rows):
        tau = frac[start:start + rows, None] - taps[None, :]
        part = cutoff * np.sinc(cutoff * tau) * (0.5 + 0.5 * np.cos(np.pi * tau / (half + 1)))
        bank[start:start + rows] = part / part.sum(axis=1, keepdims=True)
    return bank
