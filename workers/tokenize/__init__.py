"""The tokenize and detokenize tasks: texts to token ids and back, with openvino-tokenizers.

Both tasks use the bundles of task "tokenize" (one per tokenizer, keyed by model name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge.errors import BadRequest, ModelUnavailable
from workers.api import BundleLike, DeviceSettings, Progress, Request, Response
from workers.tokenize.pipeline import TokenizerPipeline

__all__ = ["TokenizeHandler", "TokenizerPipeline", "load"]


def load(bundles: Sequence[BundleLike], core: Any, device: DeviceSettings) -> TokenizeHandler:
    """Compile every tokenizer bundle once; the handler serves both tasks."""
    return TokenizeHandler({b.name: TokenizerPipeline.load(b, core, device) for b in bundles})


class TokenizeHandler:
    """Answers `tokenize` and `detokenize` requests, mirroring the single or list form."""

    def __init__(self, pipelines: dict[str, TokenizerPipeline]) -> None:
        self.pipelines = pipelines

    def __call__(self, request: Request, progress: Progress) -> Response:
        """One job: all its texts (or id lists) go through one inference."""
        if request.task == "tokenize":
            return self._tokenize(request)
        if request.task == "detokenize":
            return self._detokenize(request)
        raise BadRequest(f"task {request.task!r} is not served by the tokenizer")

    def _pipeline(self, request: Request) -> TokenizerPipeline:
        # the worker names the model (workers.model_store resolves the default); alone, the
        # handler falls back to its first tokenizer
        name = request.params.get("model") or next(iter(self.pipelines), None)
        if name not in self.pipelines:
            if not self.pipelines:
                raise ModelUnavailable("no tokenizer is loaded on this worker")
            known = ", ".join(sorted(self.pipelines))
            raise BadRequest(f"unknown model {name!r}; known: {known}")
        return self.pipelines[name]

    def _tokenize(self, request: Request) -> Response:
        pipeline = self._pipeline(request)
        if request.text is None:
            raise BadRequest("tokenize needs 'text'")
        texts = [request.text] if isinstance(request.text, str) else list(request.text)
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("'text' must be a string or a list of strings")
        add = bool(request.params.get("add_special_tokens", True))
        ids = pipeline.encode(texts, add_special_tokens=add)
        single = isinstance(request.text, str) and not request.batch
        return Response({"model": pipeline.name, "ids": ids[0] if single else ids})

    def _detokenize(self, request: Request) -> Response:
        pipeline = self._pipeline(request)
        if request.ids is None:
            raise BadRequest("detokenize needs 'ids'")
        rows, single = _id_rows(request.ids, request.batch)
        bad = pipeline.check_ids(rows)
        if bad is not None:
            raise BadRequest(
                f"token id {bad} is out of range for model {pipeline.name!r} "
                f"(0..{pipeline.vocab_size - 1})")
        skip = bool(request.params.get("skip_special_tokens", False))
        texts = pipeline.decode(rows, skip_special_tokens=skip)
        return Response({"model": pipeline.name, "text": texts[0] if single else texts})


def _id_rows(ids: Any, batch: bool) -> tuple[list[list[int]], bool]:
    """Id lists and whether the client sent one flat list (answered with one text)."""
    items = list(ids)
    nested = [isinstance(i, (list, tuple)) for i in items]
    if items and all(nested):
        rows = [list(r) for r in items]
        single = False
    elif not any(nested):
        rows = [items]
        single = True
    else:
        raise BadRequest("'ids' must be a list of ints or a list of lists of ints")
    if batch and single and not items:
        rows, single = [], False  # an empty list of id lists
    for row in rows:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
            raise BadRequest("token ids must be integers")
    return rows, single
