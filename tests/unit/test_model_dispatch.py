"""Which model version answers a request: name, name@version, the default; the answer says."""

from __future__ import annotations

import pytest

from edge.config import parse
from edge.errors import ModelUnavailable
from workers.api import Request, Response, no_progress
from workers.model_store import Dispatch, ModelSet, Version, default_models


def _version(name: str, version: str, mode: str | None = None) -> Version:
    def handler(request: Request, progress) -> Response:
        return Response({"model": request.params["model"], "echo": version})

    settings = {"mode": mode} if mode else {}
    return Version("superres" if mode else "tokenize", name, version, handler,
                   (f"{name}/{version}", "x"), {"settings": settings}, 0.1)


def _dispatch(task="tokenize", default=None, broken=None, modes=None) -> Dispatch:
    modes = modes or {}
    loaded = {"b": {"1": _version("b", "1", modes.get("b")), "2": _version("b", "2", modes.get("b"))},
              "a": {"7": _version("a", "7", modes.get("a"))}}
    return Dispatch(task, loaded, {"b": "2", "a": "7"}, ["b", "a"], default, broken or {})


def _ask(dispatch: Dispatch, **params) -> dict:
    return dict(dispatch(Request(dispatch.task, params=params, text="x"), no_progress).result)


def test_a_name_gets_its_serving_version_and_the_answer_names_it():
    result = _ask(_dispatch(), model="b")
    assert result == {"model": "b", "version": "2", "echo": "2"}
    assert list(result)[:2] == ["model", "version"]


def test_name_at_version_reaches_a_loaded_version_that_is_not_serving():
    assert _ask(_dispatch(), model="b@1")["echo"] == "1"


def test_a_version_not_loaded_or_an_unknown_name_is_model_unavailable():
    with pytest.raises(ModelUnavailable, match="b@3 is not loaded"):
        _ask(_dispatch(), model="b@3")
    with pytest.raises(ModelUnavailable, match="'zz' is not installed here"):
        _ask(_dispatch(), model="zz")
    with pytest.raises(ModelUnavailable, match="fails authentication"):
        _ask(_dispatch(broken={"b@3": "fails authentication"}), model="b@3")


def test_no_model_is_the_first_installed_or_the_configured_default():
    assert _ask(_dispatch())["model"] == "b"  # order: first installed first
    assert _ask(_dispatch(default="a"))["model"] == "a"
    with pytest.raises(ModelUnavailable, match="default_model"):
        _ask(_dispatch(default="gone"))


def test_superres_default_is_the_first_model_of_the_requested_mode():
    d = _dispatch("superres", modes={"b": "quality", "a": "fast"})
    assert _ask(d)["model"] == "a"  # mode defaults to fast
    assert _ask(d, mode="quality")["model"] == "b"


def test_modelset_check_refuses_before_the_payload_is_read():
    models = ModelSet({"tokenize": _dispatch()}, {})
    models.check("tokenize", "b@1")
    with pytest.raises(ModelUnavailable):
        models.check("tokenize", "b@9")


def test_default_model_comes_from_the_config_and_detokenize_shares_tokenize_s():
    config = parse({"tasks": {"tokenize": {"default_model": "clip-vit-b32"},
                              "detokenize": {}, "asr": {"default_model": "whisper-base"}}})
    assert default_models(config, ("tokenize", "detokenize", "asr", "lcm")) == {
        "tokenize": "clip-vit-b32", "detokenize": "clip-vit-b32", "asr": "whisper-base"}


def test_job_metrics_carry_the_model_and_its_version():
    from edge import metrics

    labels = {"task": "tokenize", "device": "CPU", "status": "ok", "model": "b", "version": "2"}
    before = metrics.REGISTRY.get_sample_value("edge_jobs_total", labels) or 0
    metrics.observe_answer("tokenize", "CPU", {"status": "ok", "result": {"model": "b",
                                                                          "version": "2"},
                                               "timings": {"run_ms": 1.0}})
    assert metrics.REGISTRY.get_sample_value("edge_jobs_total", labels) == before + 1
    del labels["status"]
    assert metrics.REGISTRY.get_sample_value("edge_job_run_seconds_count", labels) >= 1
