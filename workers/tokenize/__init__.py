"""The tokenize and detokenize tasks: texts to token ids and back, with openvino-tokenizers.

Both tasks use the bundles of task "tokenize" (one per tokenizer, keyed by model name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge.errors import BadRequest, EdgeError, ModelUnavailable
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
        out = self.batch([request])[0]
        if isinstance(out, EdgeError):
            raise out
        return out

    def batch(self, requests: Sequence[Request]) -> list[Response | EdgeError]:
        """Several jobs (workers/batching.py): the texts (or id lists) of all of them that
        share a tokenizer and its setting go through one inference; a bad request gets its
        own error and does not touch the others."""
        out: list[Response | EdgeError | None] = [None] * len(requests)
        # (pipeline, task, flag) -> [(request index, rows, single)]
        groups: dict[tuple[str, str, bool], list[tuple[int, list[Any], bool]]] = {}
        for i, request in enumerate(requests):
            try:
                groups.setdefault(self._batch_key(request), []).append(
                    (i, *self._rows(request)))
            except EdgeError as exc:
                out[i] = exc
        for (name, task, flag), members in groups.items():
            pipeline = self.pipelines[name]
            rows = [row for _, r, _ in members for row in r]
            if task == "tokenize":
                results: list[Any] = pipeline.encode(rows, add_special_tokens=flag)
                field = "ids"
            else:
                results = pipeline.decode(rows, skip_special_tokens=flag)
                field = "text"
            at = 0
            for i, r, single in members:
                mine, at = results[at:at + len(r)], at + len(r)
                out[i] = Response({"model": name, field: mine[0] if single else mine})
        return [o for o in out if o is not None]

    def _batch_key(self, request: Request) -> tuple[str, str, bool]:
        if request.task not in ("tokenize", "detokenize"):
            raise BadRequest(f"task {request.task!r} is not served by the tokenizer")
        pipeline = self._pipeline(request)
        if request.task == "tokenize":
            return pipeline.name, "tokenize", bool(request.params.get("add_special_tokens", True))
        return pipeline.name, "detokenize", bool(request.params.get("skip_special_tokens", False))

    def _rows(self, request: Request) -> tuple[list[Any], bool]:
        """The rows one request adds to a batch and whether it is answered with one item."""
        pipeline = self._pipeline(request)
        if request.task == "tokenize":
            if request.text is None:
                raise BadRequest("tokenize needs 'text'")
            texts = [request.text] if isinstance(request.text, str) else list(request.text)
            if not all(isinstance(t, str) for t in texts):
                raise BadRequest("'text' must be a string or a list of strings")
            return texts, isinstance(request.text, str) and not request.batch
        if request.ids is None:
            raise BadRequest("detokenize needs 'ids'")
        rows, single = _id_rows(request.ids, request.batch)
        bad = pipeline.check_ids(rows)
        if bad is not None:
            raise BadRequest(
                f"token id {bad} is out of range for model {pipeline.name!r} "
                f"(0..{pipeline.vocab_size - 1})")
        return rows, single

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
