"""Whisper speech recognition on plain `ov.Core`: encoder + stateful decoder, greedy.

    pipeline = WhisperPipeline.load(bundle, core, device)
    transcript = pipeline(audio_16k_mono, language=None, initial_prompt=None)

Long audio follows Whisper's sequential algorithm: one log-mel over the whole clip, 30 s
windows, and each next window starts at the last timestamp the model closed (the seek).
The decoder runs as openvino.genai runs it: the graph computes logits for the last position
only (a Slice before the vocabulary projection), every request runs through
`start_async` + `wait` (the plugin's pinned stream thread, no copies of the outputs), the
encoder's output tensor is the decoder's input and one (1, 1) token tensor is rewritten in
place per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

    def __call__(self, audio: np.ndarray, *, language: str | None = None,
                 task: str = "transcribe", initial_prompt: str | None = None,
                 timestamps: bool = True,
                 progress: Callable[[Mapping[str, Any]], None] | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 `audio`."""
        s = self.settings
        duration = len(audio) / s["sample_rate"]
        content = len(audio) // s["hop_length"]
        mel = log_mel(audio, n_mels=s["n_mels"], n_fft=s["n_fft"], hop=s["hop_length"],
                      rate=s["sample_rate"], pad_to=self._frames * s["hop_length"],
                      block=MEL_BLOCK)
        rules = LogitRules(s, self._vocab, timestamps=timestamps)
        windows = max(1, -(-content // self._frames))
        lang, prev = self._language(language), self._prompt_ids(initial_prompt)
        segments: list[Segment] = []
        text_ids: list[int] = []
        seek, index = 0, 0
        while seek < content or index == 0:
            size = min(self._frames, content - seek) if content > seek else self._frames
            hop = s["hop_length"]
            if _rms(audio[seek * hop:(seek + size) * hop]) < SILENCE_RMS:
                tokens = []  # digital silence: nothing to decode, nothing to hallucinate
            else:
                self._encode(mel[:, seek:seek + self._frames])
                if lang is None:
                    lang = self._detect_language()
                tokens = self._decode(self._prefix(prev, lang, task, timestamps), rules)
            offset = seek * s["hop_length"] / s["sample_rate"]
            if timestamps:
                found, step = split_segments(tokens, self._tokens["timestamp_begin"], size,
                                             offset, self._detok, s["time_precision"])
            else:
                text = self._detok.text(tokens)
                found = [Segment(offset, offset + size / 100.0, text)] if text.strip() else []
                step = size
            segments.extend(found)
            text_ids.extend(t for t in tokens if t < self._tokens["eot"])
            seek += max(step, 1)
            index += 1
            prev = []  # the initial prompt conditions the first window only (as transformers)
            if progress is not None:
                progress({"window": index, "windows": max(windows, index)})
        clipped = tuple(_clip(seg, duration) for seg in segments)
        return Transcript(self._detok.text(text_ids).strip(), clipped, lang or "en", duration)

    def _encode(self, window: np.ndarray) -> None:
        self._features[0, :, :window.shape[1]] = window
        self._features[0, :, window.shape[1]:] = 0.0
        _run(self._encoder)
        # the decoder reads the encoder's output tensor directly: no copy
        self._decoder.set_tensor("encoder_hidden_states", self._encoder.get_output_tensor(0))

    def _decode(self, prompt: list[int], rules: LogitRules) -> list[int]:
        """Greedy tokens after `prompt` until eot or the context is full (eot excluded)."""
        req, scores, eot = self._decoder, self._scores, self._tokens["eot"]
        req.reset_state()
        # the graph gives the last position's logits only: feed the prompt up to <|sot|>
        # (whose logits give the no-speech probability), then the rest of it
        sot = prompt.index(self._tokens["sot"]) + 1
        logits = self._step(prompt[:sot])
        self.no_speech = _softmax_at(logits.data[0, -1], self._tokens["nospeech"])
        if sot < len(prompt):
            logits = self._step(prompt[sot:])
        out: list[int] = []
        budget = self._max_len - len(prompt)
        # Whisper's silence gate needs the mean log-probability; pay for it only when the
        # no-speech probability already says "maybe silence" (rare on speech)
        track = self.no_speech > NO_SPEECH_THRESHOLD
        logprob = 0.0
        while len(out) < budget:
            np.copyto(scores, logits.data[0, -1])
            rules.apply(scores, out)
            token = int(scores.argmax())
            if track:
                logprob += _log_softmax_at(scores, token)
            if token == eot:
                break
            out.append(token)
            logits = self._step([token])
        if track and logprob / (len(out) + 1) < LOGPROB_THRESHOLD:
            return []  # silence or noise: Whisper would hallucinate ("you") here
        return out

    def _step(self, ids: list[int]) -> ov.Tensor:
        """Feed `ids` to the decoder (its state holds the past); the last position's logits."""
        req = self._decoder
        if len(ids) == 1:
            self._token[0, 0] = ids[0]
            req.set_tensor("input_ids", self._token_tensor)
        else:
            req.set_tensor("input_ids", ov.Tensor(np.array([ids], np.int64)))
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

    def _language(self, language: str | None) -> str | None:
        s = self.settings
        if not s["multilingual"]:
            if language not in (None, "en", "english"):
                raise BadRequest(f"model {self.name} is English-only; language must be en")
            return "en"
        if language is not None and language not in s["lang_to_id"]:
            raise BadRequest(f"unknown language {language!r} for model {self.name}")
        return language  # None: detected from the first window

    def _detect_language(self) -> str:
        self._decoder.reset_state()
        logits = self._step([self._tokens["sot"]]).data[0, -1]
        names = list(self.settings["lang_to_id"])
        ids = np.array([self.settings["lang_to_id"][n] for n in names])
        return names[int(logits[ids].argmax())]

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
