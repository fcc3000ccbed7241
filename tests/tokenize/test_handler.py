"""The tokenize / detokenize handler as the worker calls it."""

from __future__ import annotations

import json

import pytest

from edge.errors import BadRequest
from workers.api import Request, no_progress


def run(handler, task, **kwargs):
    return handler(Request(task=task, **kwargs), no_progress).result


def test_single_text_gives_one_id_list_with_the_default_model(handler):
    result = run(handler, "tokenize", text="hello world")
    assert result == {"model": "all-minilm-l6-v2", "ids": [101, 7592, 2088, 102]}


def test_list_of_texts_gives_a_list_of_id_lists_without_padding(handler):
    result = run(handler, "tokenize", text=("hello world", "a"), batch=True,
                 params={"model": "all-minilm-l6-v2"})
    assert result["ids"] == [[101, 7592, 2088, 102], [101, 1037, 102]]


def test_a_one_item_list_is_answered_as_a_list(handler):
    result = run(handler, "tokenize", text=("hello",), batch=True)
    assert result["ids"] == [[101, 7592, 102]]


def test_add_special_tokens_false_leaves_them_out(handler):
    result = run(handler, "tokenize", text="hello world",
                 params={"model": "whisper-tiny.en", "add_special_tokens": False})
    assert result["ids"] == [31373, 995]


def test_empty_string_has_only_the_special_tokens(handler):
    assert run(handler, "tokenize", text="", params={"model": "clip-vit-b32"})["ids"] == [
        49406, 49407]
    assert run(handler, "tokenize", text="", params={
        "model": "clip-vit-b32", "add_special_tokens": False})["ids"] == []


def test_detokenize_mirrors_the_single_and_list_forms(handler):
    single = run(handler, "detokenize", ids=(101, 7592, 2088, 102),
                 params={"skip_special_tokens": True})
    assert single == {"model": "all-minilm-l6-v2", "text": "hello world"}
    many = run(handler, "detokenize", ids=((101, 7592, 102), (2088,)), batch=True)
    assert many["text"] == ["[CLS] hello [SEP]", "world"]


def test_detokenize_of_no_ids_is_an_empty_text(handler):
    assert run(handler, "detokenize", ids=())["text"] == ""
    assert run(handler, "detokenize", ids=((), (2088,)), batch=True)["text"] == ["", "world"]


def test_whisper_timestamps_survive_skip_special_tokens(handler):
    result = run(handler, "detokenize", ids=(50257, 50363, 31373, 51863, 50256),
                 params={"model": "whisper-tiny.en", "skip_special_tokens": True})
    assert result["text"] == "<|0.00|>hello<|30.00|>"


def test_round_trip_keeps_a_nul_character(handler):
    params = {"model": "whisper-tiny.en", "add_special_tokens": False}
    ids = run(handler, "tokenize", text="a\x00", params=params)["ids"]
    assert run(handler, "detokenize", ids=tuple(ids), params={"model": "whisper-tiny.en"})[
        "text"] == "a\x00"


def test_results_are_json(handler):
    json.dumps(run(handler, "tokenize", text=("é", "😀"), batch=True))


def test_unknown_model_is_a_bad_request_naming_the_known_ones(handler):
    with pytest.raises(BadRequest, match="unknown model 'gpt-9'.*all-minilm-l6-v2.*clip-vit-b32"):
        run(handler, "tokenize", text="x", params={"model": "gpt-9"})


@pytest.mark.parametrize("ids", [(5, -1), (30522,), ((1, 2), (2**40,))])
def test_ids_outside_the_vocabulary_are_a_bad_request(handler, ids):
    with pytest.raises(BadRequest, match="out of range"):
        run(handler, "detokenize", ids=ids, batch=isinstance(ids[0], tuple))


def test_mixed_ids_are_a_bad_request(handler):
    with pytest.raises(BadRequest, match="list of ints"):
        run(handler, "detokenize", ids=(1, (2, 3)))


class _Port:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_names(self) -> set[str]:
        return {self.name}


class _Outputs(dict):
    """An infer result: ports as keys, readable by name too (as OpenVINO's)."""

    def __init__(self, **arrays) -> None:
        super().__init__({_Port(k): v for k, v in arrays.items()})
        self._by_name = arrays

    def __getitem__(self, key):
        return self._by_name[key]


def test_rows_read_both_output_forms():
    """Bundles prepared since recipe 5 give ragged ids; older ones padded ids and a mask."""
    import numpy as np

    from workers.tokenize.pipeline import _rows

    ragged = _Outputs(row_begins=np.array([0, 3, 3]), row_ends=np.array([3, 3, 5]),
                      ids=np.array([7, 8, 9, 1, 2]))
    padded = _Outputs(input_ids=np.array([[7, 8, 9], [0, 0, 0], [1, 2, 0]]),
                      attention_mask=np.array([[1, 1, 1], [0, 0, 0], [1, 1, 0]]))
    assert _rows(ragged) == _rows(padded) == [[7, 8, 9], [], [1, 2]]
