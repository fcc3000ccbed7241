"""Whisper's logit rules and token bookkeeping: pure numpy, one window at a time.

`LogitRules.apply` edits the last position's scores in place the way transformers'
SuppressTokens / SuppressTokensAtBegin / WhisperTimeStampLogitsProcessor do, so greedy
decoding picks the same tokens as the references. `split_segments` turns one window's tokens
into timed segments and says how far the window's speech reached (the seek).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_NEG = np.float32(-np.inf)


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of speech: seconds from the clip start and its text."""

    start: float
    end: float
    text: str


class LogitRules:
    """Suppression and timestamp rules applied to one step's logits (in place)."""

    def __init__(self, settings: dict, vocab_size: int, *, timestamps: bool) -> None:
        tokens = settings["tokens"]
        self.eot = tokens["eot"]
        self.ts_begin = tokens["timestamp_begin"]
        self.timestamps = timestamps
        suppress = list(settings["suppress_tokens"]) + [tokens["notimestamps"]]
        if not timestamps:
            suppress = list(settings["suppress_tokens"]) + list(range(self.ts_begin, vocab_size))
        self.suppress = np.array(sorted(set(suppress)), np.int64)
        self.begin_suppress = np.array(settings["begin_suppress_tokens"], np.int64)
        self.last_initial = self.ts_begin + settings["max_initial_timestamp_index"]

    def apply(self, scores: np.ndarray, generated: Sequence[int]) -> None:
        """Mask `scores` (vocab,) given the tokens generated so far in this window."""
        scores[self.suppress] = _NEG
        if not generated:
            scores[self.begin_suppress] = _NEG
        if not self.timestamps:
            return
        ts = self.ts_begin
        if not generated:  # the first token is a timestamp, and an early one
            scores[:ts] = _NEG
            scores[self.last_initial + 1:] = _NEG
            return
        last_ts = generated[-1] >= ts
        prev_ts = len(generated) < 2 or generated[-2] >= ts
        if last_ts:
            if prev_ts:  # a pair closed a segment: text (or eot) must follow
                scores[ts:] = _NEG
            else:  # an open timestamp: close it with another timestamp or eot
                scores[:self.eot] = _NEG
        # timestamps never go back; after a closing pair they must move forward
        latest = next((t for t in reversed(generated) if t >= ts), None)
        if latest is not None:
            floor = latest if (last_ts and not prev_ts) else latest + 1
            scores[ts:floor] = _NEG
        # when timestamps together outweigh the best text token, emit a timestamp
        top = scores.max()
        probs = np.exp(scores - top)
        total = probs.sum()
        if probs[ts:].sum() > probs[:ts].max() and total > 0:
            scores[:ts] = _NEG


def split_segments(tokens: Sequence[int], ts_begin: int, window_frames: int,
                   offset: float, detok: Detokenizer, precision: float = 0.02
                   ) -> tuple[list[Segment], int]:
    """Segments of one window's tokens (eot excluded) and the frames to seek forward."""
    stamps = [t >= ts_begin for t in tokens]
    pairs = [i + 1 for i in range(len(tokens) - 1) if stamps[i] and stamps[i + 1]]
    single_ending = len(tokens) >= 2 and stamps[-1] and not stamps[-2]
    if not pairs:
        times = [t for t in tokens if t >= ts_begin]
        end = (times[-1] - ts_begin) * precision if times and times[-1] != ts_begin else None
        text = detok.text(tokens)
        end_s = offset + (end if end is not None else window_frames / 100.0)
        segments = [Segment(offset + _start(tokens, ts_begin, precision), end_s, text)] \
            if text.strip() else []
        return segments, window_frames
    cuts = pairs + ([len(tokens)] if single_ending else [])
    segments, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        text = detok.text(piece)
        if text.strip():
            segments.append(Segment(offset + (piece[0] - ts_begin) * precision,
                                    offset + (piece[-1] - ts_begin) * precision, text))
        last = cut
    if single_ending:
        return segments, window_frames
    return segments, (tokens[last - 1] - ts_begin) * 2  # 2 mel frames per 0.02 s step


def _start(tokens: Sequence[int], ts_begin: int, precision: float) -> float:
    return (tokens[0] - ts_begin) * precision if tokens and tokens[0] >= ts_begin else 0.0


class Detokenizer:
    """Byte-level BPE ids -> text from the bundle's `vocab.json` (no transformers at runtime)."""

    def __init__(self, vocab_json: bytes | bytearray, text_limit: int) -> None:
        # GPT-2's byte<->unicode table: printable bytes map to themselves, others to 256+n
        keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        chars = keep + [256 + n for n in range(256 - len(keep))]
        byte_of = dict(zip(map(chr, chars), keep + [b for b in range(256) if b not in keep],
                           strict=True))
        self._pieces = [bytes(byte_of.get(c, 32) for c in tok) if i < text_limit else b""
                        for i, tok in enumerate(json.loads(bytes(vocab_json)))]

    def text(self, ids: Sequence[int]) -> str:
        """UTF-8 text of the text tokens in `ids` (special and timestamp ids are skipped)."""
        pieces, n = self._pieces, len(self._pieces)
        return b"".join(pieces[i] for i in ids if 0 <= i < n).decode("utf-8", "replace")
