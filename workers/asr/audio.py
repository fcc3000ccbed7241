"""Audio bytes -> 16 kHz mono float32: WAV (PCM 8/16/24/32-bit, float 32/64) and raw PCM.

Pure numpy + stdlib. The WAV reader walks RIFF chunks itself because the stdlib `wave` module
(3.11) refuses IEEE-float and WAVE_FORMAT_EXTENSIBLE files, which real recorders write.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from edge.errors import BadRequest, PayloadTooLarge, UnsupportedMedia

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
# raw format name -> (numpy dtype or "s24", offset to centre unsigned data, full scale)
_RAW = {
    "u8": (np.uint8, 128.0, 128.0), "s8": (np.int8, 0.0, 128.0),
    "s16le": (np.dtype("<i2"), 0.0, 32768.0), "s16be": (np.dtype(">i2"), 0.0, 32768.0),
    "s24le": ("s24", 0.0, 8388608.0), "s32le": (np.dtype("<i4"), 0.0, 2147483648.0),
    "f32le": (np.dtype("<f4"), 0.0, 1.0), "f64le": (np.dtype("<f8"), 0.0, 1.0),
}


@dataclass(frozen=True, slots=True)
class PcmFormat:
    """How raw sample bytes are laid out."""

    sample_rate: int
    format: str  # a key of _RAW
    channels: int = 1


def decode(data: bytes, *, raw: PcmFormat | None = None, rate: int = 16000,
           max_seconds: float = math.inf) -> np.ndarray:
    """Decode WAV or raw PCM bytes to mono float32 at `rate`, refusing what is too long."""
    if not data:
        raise BadRequest("audio is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        fmt, payload = _parse_wav(data)
    elif raw is not None:
        fmt, payload = raw, memoryview(data)
    else:
        raise UnsupportedMedia("not a WAV file; for raw PCM give sample_rate and format")
    width = _width(fmt.format) * fmt.channels
    frames = len(payload) // width
    if frames == 0:
        raise BadRequest("audio is empty")
    if frames / fmt.sample_rate > max_seconds:
        raise PayloadTooLarge(f"audio is {frames / fmt.sample_rate:.0f} s long; "
                              f"the limit is {max_seconds:.0f} s")
    samples = _to_float(payload[:frames * width], fmt.format).reshape(frames, fmt.channels)
    mono = samples.mean(axis=1, dtype=np.float32) if fmt.channels > 1 else samples[:, 0]
    return resample(np.ascontiguousarray(mono, dtype=np.float32), fmt.sample_rate, rate)


def pcm_format(content_type: str, params: dict) -> PcmFormat | None:
    """The raw PCM layout given by params or an `audio/L16;rate=...` content type, if any."""
    kind, _, rest = content_type.partition(";")
    options = dict(p.strip().partition("=")[::2] for p in rest.split(";") if "=" in p)
    if kind.strip().lower() == "audio/l16":  # RFC 2586: big-endian 16-bit
        rate = params.get("sample_rate") or options.get("rate")
        if not rate:
            raise BadRequest("audio/L16 needs a rate (content type or sample_rate param)")
        return PcmFormat(int(rate), "s16be", int(params.get("channels")
                                                 or options.get("channels") or 1))
    if "sample_rate" in params or "format" in params:
        if "sample_rate" not in params:
            raise BadRequest("raw PCM needs the sample_rate param")
        return PcmFormat(params["sample_rate"], params.get("format", "s16le"),
                         params.get("channels", 1))
    return None


def _parse_wav(data: bytes) -> tuple[PcmFormat, memoryview]:
    view, pos, fmt = memoryview(data), 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = view[pos + 8:pos + 8 + size]  # streaming writers put 0/0xFFFFFFFF: clamp
        if chunk == b"fmt ":
            fmt = _parse_fmt(bytes(body))
        elif chunk == b"data":
            if fmt is None:
                raise UnsupportedMedia("WAV data chunk comes before its fmt chunk")
            if size == 0:  # unknown size (a stream): take the rest of the file
                body = view[pos + 8:]
            return fmt, body
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    raise UnsupportedMedia("WAV file has no data chunk")


def _parse_fmt(body: bytes) -> PcmFormat:
    if len(body) < 16:
        raise UnsupportedMedia("WAV fmt chunk is truncated")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the subformat GUID
    if channels == 0 or rate == 0:
        raise UnsupportedMedia("WAV header has zero channels or sample rate")
    names = {(_PCM, 8): "u8", (_PCM, 16): "s16le", (_PCM, 24): "s24le", (_PCM, 32): "s32le",
             (_FLOAT, 32): "f32le", (_FLOAT, 64): "f64le"}
    if (tag, bits) not in names:
        raise UnsupportedMedia(f"WAV encoding {tag}/{bits}-bit is not supported "
                               "(PCM 8/16/24/32-bit or float 32/64)")
    return PcmFormat(rate, names[(tag, bits)], channels)


def _width(name: str) -> int:
    dtype = _RAW[name][0]
    return 3 if dtype == "s24" else np.dtype(dtype).itemsize


def _to_float(raw: memoryview, name: str) -> np.ndarray:
    dtype, offset, scale = _RAW[name]
    if dtype == "s24":  # sign-extend 3-byte little-endian samples via the top of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8
        return ints.astype(np.float32) / np.float32(scale)
    out = np.frombuffer(raw, dtype).astype(np.float32)
    if offset:
        out -= np.float32(offset)
    if scale != 1.0:
        out /= np.float32(scale)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0)


def resample(x: np.ndarray, src: int, dst: int, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling by a Hann-windowed sinc, one filter per output phase.

    The ratio is reduced by the gcd, so the `up` distinct fractional positions each get a
    precomputed filter; output is produced in blocks to bound memory on long audio.
    """
    if src == dst:
        return x
    g = math.gcd(src, dst)
    up, down = dst // g, src // g
    cutoff = min(1.0, dst / src)  # of the input Nyquist: anti-alias when going down
    half = int(math.ceil(zero_crossings / cutoff))
    taps = np.arange(-half + 1, half + 1)  # input offsets from floor(t)
    frac = np.arange(up) * down % up / up  # fractional input position of each phase
    tau = frac[:, None] - taps[None, :]
    bank = cutoff * np.sinc(cutoff * tau) * (0.5 + 0.5 * np.cos(np.pi * tau / (half + 1)))
    bank = (bank / bank.sum(axis=1, keepdims=True)).astype(np.float32)
    n_out = int(len(x) * up // down)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])
    out = np.empty(n_out, np.float32)
    block = max(1, (1 << 21) // len(taps))
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out))
        base = n * down // up  # floor of the input position
        idx = base[:, None] + (taps + half)[None, :]
        out[start:start + len(n)] = np.einsum("ij,ij->i", padded[idx], bank[n % up])
    return out
