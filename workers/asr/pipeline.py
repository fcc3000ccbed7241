"""Whisper speech recognition on plain `ov.Core`: encoder + stateful decoder, greedy.

    pipeline = WhisperPipeline.load(bundle, core, device)
    transcript = pipeline(audio_16k_mono, language=None, initial_prompt=None)
    transcripts = pipeline.transcribe([ClipRequest(audio_a), ClipRequest(audio_b)])

Long audio follows Whisper's sequential algorithm: one log-mel over the whole clip, 30 s
windows, and each next window starts at the last timestamp the model closed (the seek).
The decoder runs as openvino.genai runs it: the graph computes logits for the last position
only (a Slice before the vocabulary projection), every request runs through
`start_async` + `wait` (the plugin's pinned stream thread, no copies of the outputs), and one
(rows, 1) token tensor is rewritten in place per step. Several clips run as one batch: the
encoder takes the current window of each in one call, the decoder steps their rows together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset8 as ops

from edge.errors import BadRequest
from workers.api import BundleLike, DeviceSettings, read_ir
from workers.asr.decoding import Detokenizer, LogitRules, Segment, split_segments
from workers.asr.features import log_mel

NO_SPEECH_THRESHOLD = 0.6  # OpenAI Whisper's defaults for skipping a silent window
LOGPROB_THRESHOLD = -1.0
SILENCE_RMS = 1e-3  # -60 dBFS: a window this quiet is silence, whatever the model says
MEL_BLOCK = 3000  # STFT frames computed at once (`features.log_mel`'s default block)
_DEFAULT_DEVICE = DeviceSettings()  # CPU, no properties; frozen, so one shared default is safe


@dataclass(frozen=True, slots=True)
class Transcript:
    """What a clip says: the whole text, its timed segments, its language and length (s)."""

    text: str
    segments: tuple[Segment, ...]
    language: str
    duration: float


@dataclass(frozen=True, slots=True)
class ClipRequest:
    """One clip to transcribe (16 kHz mono float32) and how: the params of an asr job."""

    audio: np.ndarray
    language: str | None = None
    task: str = "transcribe"
    initial_prompt: str | None = None
    timestamps: bool = True
    progress: Callable[[Mapping[str, Any]], None] | None = None


class _Clip:
    """One clip on its way through its 30 s windows: where it is (the seek), what it found."""

    def __init__(self, request: ClipRequest, mel: np.ndarray, rules: LogitRules,
                 lang: str | None, prev: list[int], settings: Mapping[str, Any]) -> None:
        self.request, self.audio, self.mel, self.rules = request, request.audio, mel, rules
        self.lang, self.prev, self.settings = lang, prev, settings
        frames = settings["window_seconds"] * settings["sample_rate"] // settings["hop_length"]
        self.content = len(self.audio) // settings["hop_length"]
        self.windows = max(1, -(-self.content // frames))
        self.seek = self.index = self.size = 0
        self.segments: list[Segment] = []
        self.text_ids: list[int] = []

    @property
    def going(self) -> bool:
        return self.seek < self.content or self.index == 0

    def advance(self, tokens: list[int], ids: Mapping[str, int], detok: Detokenizer) -> None:
        """Take the tokens of the current window (eot excluded) and seek past them."""
        s = self.settings
        offset = self.seek * s["hop_length"] / s["sample_rate"]
        if self.request.timestamps:
            found, step = split_segments(tokens, ids["timestamp_begin"], self.size, offset,
                                         detok, s["time_precision"])
        else:
            text = detok.text(tokens)
            found = [Segment(offset, offset + self.size / 100.0, text)] if text.strip() else []
            step = self.size
        self.segments.extend(found)
        self.text_ids.extend(t for t in tokens if t < ids["eot"])
        self.seek += max(step, 1)
        self.index += 1
        self.prev = []  # the initial prompt conditions the first window only (as transformers)
        if self.request.progress is not None:
            self.request.progress({"window": self.index,
                                   "windows": max(self.windows, self.index)})

    def transcript(self, detok: Detokenizer) -> Transcript:
        duration = len(self.audio) / self.settings["sample_rate"]
        clipped = tuple(_clip(seg, duration) for seg in self.segments)
        return Transcript(detok.text(self.text_ids).strip(), clipped, self.lang or "en",
                          duration)


class WhisperPipeline:
    """A Whisper model compiled for one device, reusable for any number of clips."""

    def __init__(self, name: str, settings: Mapping[str, Any], encoder: ov.CompiledModel,
                 decoder: ov.CompiledModel, detok: Detokenizer,
                 tokenizer: ov.CompiledModel | None) -> None:
        self.name = name
        self.settings = dict(settings)
        self._tokens = settings["tokens"]
        self._encoder = encoder.create_infer_request()
        self._decoder = decoder.create_infer_request()
        self._detok = detok
        self._tokenizer = tokenizer
        self._vocab = decoder.output("logits").get_partial_shape()[-1].get_length()
        self._frames = settings["window_seconds"] * settings["sample_rate"] // settings[
            "hop_length"]
        self._max_len = settings["max_target_positions"]
        # input tensors shared with numpy buffers we overwrite in place each step
        self._token = np.zeros((1, 1), np.int64)
        self._token_tensor = ov.Tensor(self._token, shared_memory=True)
        self._features = np.zeros((1, settings["n_mels"], self._frames), np.float32)
        self._encoder.set_input_tensor(ov.Tensor(self._features, shared_memory=True))
        self._decoder.set_tensor("beam_idx", ov.Tensor(np.zeros(1, np.int32)))
        self._scores = np.empty(self._vocab, np.float32)
        # a batch row's sizes (`held_bytes`): encoder positions and width, decoder states
        self._positions, self._width = (d.get_length() for d in
                                        encoder.output(0).get_partial_shape()[1:])
        self._states = len(self._decoder.query_state())
        self._hidden = np.empty((0, self._positions, self._width), np.float32)  # `_hold`

    @classmethod
    def load(cls, bundle: BundleLike, core: ov.Core,
             device: DeviceSettings = _DEFAULT_DEVICE) -> WhisperPipeline:
        """Read the IRs from the (decrypted-in-memory) bundle and compile them."""
        settings = bundle.manifest["settings"]
        files = settings["files"]
        props = dict(device.properties)
        encoder = core.compile_model(read_ir(core, bundle, files["encoder"]), device.name, props)
        decoder_model = read_ir(core, bundle, files["decoder"])
        _logits_of_last_position(decoder_model)
        decoder = core.compile_model(decoder_model, device.name, props)
        detok = Detokenizer(bundle.read(files["vocab"]), settings["tokens"]["eot"])
        tokenizer = None
        if files.get("tokenizer"):
            import openvino_tokenizers

            # the ops live in an extension library; a Core loads it once, on request
            core.add_extension(str(openvino_tokenizers._ext_path))
            tokenizer = core.compile_model(read_ir(core, bundle, files["tokenizer"]), "CPU")
        return cls(bundle.name, settings, encoder, decoder, detok, tokenizer)

    def working_bytes(self, samples: int) -> int:
        """The most `__call__` allocates for a clip of `samples`: the log-mel's two padded
        float32 copies of the clip and its output (twice: the log's clamp), one STFT block
        (measured: ~34 bytes per frame sample in float64 spectra), one window's silence check."""
        s = self.settings
        padded = samples + (self._frames + 2) * s["hop_length"] + 2 * s["n_fft"]
        mel = (padded // s["hop_length"] + 1) * s["n_mels"] * 4
        stft = MEL_BLOCK * s["n_fft"] * 40
        return padded * 4 * 2 + mel * 2 + stft + self._frames * s["hop_length"] * 8

    def held_bytes(self, samples: int) -> int:
        """What a clip of `samples` holds while it is transcribed with others (`transcribe`):
        its signal and log-mel, and its row of the batch: the encoder's window and output (and
        the decoder's copy), the decoder's cross- and self-attention states at full context, its
        logits (float32)."""
        s = self.settings
        padded = samples + (self._frames + 2) * s["hop_length"] + 2 * s["n_fft"]
        mel = (padded // s["hop_length"] + 1) * s["n_mels"] * 4
        states = self._states // 2 * (self._positions + self._max_len) * self._width
        return samples * 4 + mel + 4 * (s["n_mels"] * self._frames
                                        + 2 * self._positions * self._width
                                        + states + self._vocab)

    def __call__(self, audio: np.ndarray, *, language: str | None = None,
                 task: str = "transcribe", initial_prompt: str | None = None,
                 timestamps: bool = True,
                 progress: Callable[[Mapping[str, Any]], None] | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 `audio`."""
        return self.transcribe([ClipRequest(audio, language, task, initial_prompt, timestamps,
                                            progress)])[0]

    def transcribe(self, requests: Sequence[ClipRequest]) -> list[Transcript]:
        """Transcribe several clips as one: each round runs the next window of every clip not
        done through one encoder call (batch dimension) and steps their decoders together.

        Each clip gets exactly what it gets alone: the rows of a batch never mix (measured on
        the CPU plugin, f32 and bf16: bit-equal encoder outputs and logits for batches of 1-6,
        the same transcripts for 16; tests/asr/test_batch.py, bench/asr_batch.py).
        """
        clips = [self._start(r) for r in requests]
        while going := [c for c in clips if c.going]:
            self._round(going)
        return [c.transcript(self._detok) for c in clips]

    def _start(self, r: ClipRequest) -> _Clip:
        s = self.settings
        mel = log_mel(r.audio, n_mels=s["n_mels"], n_fft=s["n_fft"], hop=s["hop_length"],
                      rate=s["sample_rate"], pad_to=self._frames * s["hop_length"],
                      block=MEL_BLOCK)
        return _Clip(r, mel, LogitRules(s, self._vocab, timestamps=r.timestamps),
                     self.language(r.language), self._prompt_ids(r.initial_prompt), s)

    def _round(self, clips: list[_Clip]) -> None:
        """One window of each clip: the loud ones encoded in one call and decoded together."""
        hop = self.settings["hop_length"]
        for c in clips:
            c.size = min(self._frames, c.content - c.seek) if c.content > c.seek else self._frames
        # digital silence: nothing to decode, nothing to hallucinate
        loud = [c for c in clips
                if _rms(c.audio[c.seek * hop:(c.seek + c.size) * hop]) >= SILENCE_RMS]
        found: dict[int, list[int]] = {}
        if loud:
            self._encode([c.mel[:, c.seek:c.seek + self._frames] for c in loud])
            self._hold()
            if any(c.lang is None for c in loud):
                for c, lang in zip(loud, self._detect_language(len(loud)), strict=True):
                    c.lang = c.lang or lang
            prompts = [self._prefix(c.prev, c.lang, c.request.task, c.request.timestamps)
                       for c in loud]
            # rows whose prompts differ in layout (an initial prompt, no timestamps) step apart
            groups: dict[tuple[int, int], list[int]] = {}
            for row, prompt in enumerate(prompts):
                key = (len(prompt), prompt.index(self._tokens["sot"]))
                groups.setdefault(key, []).append(row)
            for rows in groups.values():
                if len(groups) > 1:
                    self._hold(rows)
                tokens = self._decode([prompts[r] for r in rows], [loud[r].rules for r in rows])
                found.update((id(loud[r]), t) for r, t in zip(rows, tokens, strict=True))
        for c in clips:
            c.advance(found.get(id(c), []), self._tokens, self._detok)

    def _encode(self, windows: list[np.ndarray]) -> None:
        """Run the encoder over `windows` (one row each, zero-padded to 30 s)."""
        if self._features.shape[0] != len(windows):
            self._features = np.zeros((len(windows), *self._features.shape[1:]), np.float32)
            self._encoder.set_input_tensor(ov.Tensor(self._features, shared_memory=True))
        for row, window in zip(self._features, windows, strict=True):
            row[:, :window.shape[1]] = window
            row[:, window.shape[1]:] = 0.0
        _run(self._encoder)

    def _hold(self, rows: Sequence[int] | None = None) -> None:
        """Give the decoder the encoder's output (`rows` of it; None: all) in the one buffer
        it reads, whose first rows are always the ones bound.

        One buffer that only grows, never a new tensor of a shape the decoder has seen: with
        bf16 inference the CPU plugin (2026.4) keeps reading the memory of the tensor it had
        for that shape when its state is initialised, so a new tensor of the same shape would
        leave the cross-attention on stale (or freed) memory. Measured here; f32 is not
        affected. The copy costs ~0.2 ms a row.
        """
        states = self._encoder.get_output_tensor(0).data
        if rows is not None:
            states = states[rows]
        n = len(states)
        if len(self._hidden) < n:
            self._hidden = np.empty((n, *states.shape[1:]), np.float32)
        np.copyto(self._hidden[:n], states)
        self._decoder.set_tensor("encoder_hidden_states",
                                 ov.Tensor(self._hidden[:n], shared_memory=True))

    def _reset(self, rows: int) -> None:
        """A fresh decoder state for `rows` sequences (those of the encoder states bound)."""
        self._decoder.reset_state()
        if self._token.shape[0] != rows:
            self._token = np.zeros((rows, 1), np.int64)
            self._token_tensor = ov.Tensor(self._token, shared_memory=True)
            self._decoder.set_tensor("beam_idx", ov.Tensor(np.arange(rows, dtype=np.int32)))

    def _decode(self, prompts: list[list[int]], rules: list[LogitRules]) -> list[list[int]]:
        """Greedy tokens after each row's prompt (prompts of one layout) until eot or the
        context is full (eot excluded)."""
        n, scores, eot = len(prompts), self._scores, self._tokens["eot"]
        self._reset(n)
        # the graph gives the last position's logits only: feed the prompt up to <|sot|>
        # (whose logits give the no-speech probability), then the rest of it
        sot = prompts[0].index(self._tokens["sot"]) + 1
        logits = self._step([p[:sot] for p in prompts])
        no_speech = [_softmax_at(logits.data[i, -1], self._tokens["nospeech"]) for i in range(n)]
        if sot < len(prompts[0]):
            logits = self._step([p[sot:] for p in prompts])
        outs: list[list[int]] = [[] for _ in range(n)]
        budget = self._max_len - len(prompts[0])
        # Whisper's silence gate needs the mean log-probability; pay for it only when the
        # no-speech probability already says "maybe silence" (rare on speech)
        track = [p > NO_SPEECH_THRESHOLD for p in no_speech]
        logprob = [0.0] * n
        live = list(range(n))
        while live and len(outs[live[0]]) < budget:  # the live rows have the same length
            data, going = logits.data, []
            for i in live:
                np.copyto(scores, data[i, -1])
                rules[i].apply(scores, outs[i])
                token = int(scores.argmax())
                if track[i]:
                    logprob[i] += _log_softmax_at(scores, token)
                if token != eot:
                    outs[i].append(token)
                    self._token[i, 0] = token
                    going.append(i)
            live = going
            if live and len(outs[live[0]]) < budget:
                # a finished row keeps stepping, its logits unread: the decoder's
                # cross-attention states cannot drop a row (beam_idx reorders only the past)
                logits = self._step(None)
        return [[] if track[i] and logprob[i] / (len(out) + 1) < LOGPROB_THRESHOLD else out
                for i, out in enumerate(outs)]  # silence or noise: Whisper would hallucinate

    def _step(self, ids: list[list[int]] | None) -> ov.Tensor:
        """Feed `ids` (a list of ids per row; None: the token tensor) to the decoder (its state
        holds the past); the last position's logits."""
        req = self._decoder
        if ids is None:
            req.set_tensor("input_ids", self._token_tensor)
        else:
            req.set_tensor("input_ids", ov.Tensor(np.array(ids, np.int64)))
        _run(req)
        return req.get_tensor("logits")

    def _prefix(self, prev: list[int], lang: str | None, task: str, timestamps: bool) -> list[int]:
        t = self._tokens
        prompt = [t["startofprev"], *prev] if prev else []
        prompt.append(t["sot"])
        if self.settings["multilingual"]:
            prompt += [self.settings["lang_to_id"][lang], t[task]]
        if not timestamps:
            prompt.append(t["notimestamps"])
        return prompt

    def language(self, language: str | None) -> str | None:
        """The language a request asks for, checked (`bad_request`); None: detect it."""
        s = self.settings
        if not s["multilingual"]:
            if language not in (None, "en", "english"):
                raise BadRequest(f"model {self.name} is English-only; language must be en")
            return "en"
        if language is not None and language not in s["lang_to_id"]:
            raise BadRequest(f"unknown language {language!r} for model {self.name}")
        return language  # None: detected from the first window

    def _detect_language(self, rows: int) -> list[str]:
        """The most likely language of each row of the encoder states bound."""
        self._reset(rows)
        logits = self._step([[self._tokens["sot"]]] * rows).data
        names = list(self.settings["lang_to_id"])
        ids = np.array([self.settings["lang_to_id"][n] for n in names])
        return [names[int(logits[i, -1][ids].argmax())] for i in range(rows)]

    def _prompt_ids(self, text: str | None) -> list[int]:
        if not text or not text.strip() or self._tokenizer is None:
            return []
        out = self._tokenizer([" " + text.strip()])
        ids = [int(i) for i in out["input_ids"][0] if i < self._tokens["eot"]]
        return ids[-(self._max_len // 2 - 1):]  # Whisper keeps half the context for the prompt


def _run(request: ov.InferRequest) -> None:
    # start_async runs on the plugin's own (pinned) stream thread, as openvino.genai does;
    # a synchronous infer() runs on the calling thread and copies every output to numpy
    request.start_async()
    request.wait()


def _logits_of_last_position(decoder: ov.Model) -> None:
    """Slice the hidden states before the vocabulary projection (openvino.genai does too).

    A prompt of n tokens then costs one projection instead of n: the 51864-wide MatMul is
    the decoder's largest.
    """
    node = decoder.output("logits").get_node().input_value(0).get_node()
    if node.get_type_name() == "Add":  # a projection with a bias
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul" or node.input_value(0).get_partial_shape().rank != 3:
        return  # an unfamiliar graph: keep every position, still correct, slower on prompts
    one = lambda v: ops.constant(np.array([v], np.int64))  # noqa: E731
    last = ops.slice(node.input_value(0), one(-1), one(-2), one(-1), one(1))
    node.input(0).replace_source_output(last.output(0))
    decoder.validate_nodes_and_infer_types()


def _clip(seg: Segment, duration: float) -> Segment:
    """Keep a segment inside the clip (the model may stamp past the end of speech)."""
    start = min(max(seg.start, 0.0), duration)
    end = min(max(seg.end, start), duration)
    return Segment(round(start, 2), round(end, 2), seg.text.strip())


def _softmax_at(logits: np.ndarray, index: int) -> float:
    top = logits.max()
    return float(np.exp(logits[index] - top) / np.exp(logits - top).sum())


def _log_softmax_at(scores: np.ndarray, index: int) -> float:
    top = scores.max()
    return float(scores[index] - top - np.log(np.exp(scores - top).sum()))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
