"""Whisper's log-mel spectrogram in numpy, matching transformers' WhisperFeatureExtractor.

Slaney mel filters, periodic Hann window, centred reflect-padded STFT, power spectrum,
log10 clamped 8 decades under the maximum, then (x + 4) / 4. Long audio is computed in one
pass over the whole clip (plus one window of silence) with a single maximum, as
openvino.genai does, and then sliced into 30 s windows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt


def _hz_to_mel(f: npt.ArrayLike) -> np.ndarray:
    f = np.asarray(f, np.float64)
    mel = 3.0 * f / 200.0
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = 400, rate: int = 16000) -> np.ndarray:
    """Slaney-normalised triangular filters, shape (n_mels, n_fft // 2 + 1), float32."""
    fft_freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mels + 2)
    edges = _mel_to_hz(mels)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    bank *= 2.0 / (edges[2:n_mels + 2] - edges[:n_mels])
    return np.ascontiguousarray(bank.T, dtype=np.float32)


@lru_cache(maxsize=4)
def _bands(n_mels: int, n_fft: int, rate: int) -> tuple[tuple[int, np.ndarray], ...]:
    """Each filter's first FFT bin and its non-zero weights (a triangle spans <= 14 bins)."""
    out = []
    for row in mel_filters(n_mels, n_fft, rate):
        nz = np.flatnonzero(row)
        lo = int(nz[0]) if len(nz) else 0
        out.append((lo, row[lo:int(nz[-1]) + 1] if len(nz) else row[:0]))
    return tuple(out)


def log_mel(audio: np.ndarray, *, n_mels: int = 80, n_fft: int = 400, hop: int = 160,
            rate: int = 16000, pad_to: int = 0, block: int = 3000) -> np.ndarray:
    """Normalised log-mel (n_mels, frames) of `audio` zero-padded by `pad_to` samples.

    Frames = (len(audio) + pad_to) // hop: the last centred frame is dropped, as Whisper does.
    """
    audio = np.asarray(audio, np.float32)
    n_frames = (len(audio) + pad_to) // hop
    # frames whose window lies wholly in the zero padding are exactly silence (1e-10 before
    # the log): fill them instead of running the STFT over up to 30 s of zeros
    live = min(n_frames, len(audio) // hop + n_fft // hop + 2)
    tail = min(pad_to, (live + 1) * hop + n_fft)
    signal = np.concatenate([audio, np.zeros(tail, np.float32)])
    padded = np.pad(signal, n_fft // 2, mode="reflect")
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    bands = _bands(n_mels, n_fft, rate)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    out = np.full((n_mels, n_frames), 1e-10, np.float32)
    for start in range(0, live, block):  # blocks bound the STFT's memory on long audio
        stop = min(start + block, live)
        spec = np.fft.rfft(frames[start:stop] * window, axis=1)
        power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
        for row, (lo, weights) in zip(out, bands, strict=True):
            # einsum, not `@`: a BLAS call would leave OpenBLAS threads spinning on the
            # cores the encoder is about to use (measured: encoder 2.4x slower on 2 cores)
            row[start:stop] = np.einsum("fk,k->f", power[:, lo:lo + len(weights)], weights)
    np.log10(np.maximum(out, 1e-10), out=out)
    np.maximum(out, out.max() - 8.0, out=out)
    out += 4.0
    out /= 4.0
    return out
