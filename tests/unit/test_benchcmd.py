"""`edgectl bench`: benchmark_app's numbers for an IR inside an encrypted bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import keys
from edgectl import cli
from edgectl.benchcmd import BenchError, BenchOptions, bench, parse_shapes
from edge.config import load

FIELDS = ("count", "duration_ms", "latency_median_ms", "latency_average_ms", "latency_min_ms",
          "latency_max_ms", "throughput_fps", "read_ms", "compile_ms", "first_inference_ms")


def _ir(folder: Path, stem: str, rows: int | None) -> None:
    """A MatMul x[rows, 8] @ W[8, 4] (rows None: a dynamic first dimension)."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([-1 if rows is None else rows, 8], np.float32, name="x")
    w = ops.constant(np.random.default_rng(0).standard_normal((8, 4), dtype=np.float32))
    ov.save_model(ov.Model([ops.matmul(x, w, False, False)], [x], stem), folder / f"{stem}.xml")


def _pack(root: Path, ring: keys.Keyring, task: str, name: str, stems: dict) -> None:
    src = root.parent / f"src-{task}-{name}"
    src.mkdir()
    for stem, rows in stems.items():
        _ir(src, stem, rows)
    (src / "bundle.json").write_text(json.dumps({"name": name, "task": task, "version": "1"}))
    keys.pack_bundle(src, root, ring)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A config whose bundle dir holds small MatMul bundles, one name packed for two tasks."""
    tmp = tmp_path_factory.mktemp("bench")
    ring = keys.Keyring.generate()
    ring.save(tmp / "ring.json")
    os.chmod(tmp / "ring.json", 0o600)
    root = tmp / "bundles"
    root.mkdir()
    _pack(root, ring, "test", "mm", {"mm": 2})
    _pack(root, ring, "test", "dyn", {"dyn": None})
    _pack(root, ring, "test", "pair", {"encoder": 2, "decoder": 2})
    _pack(root, ring, "a", "twice", {"mm": 2})
    _pack(root, ring, "b", "twice", {"mm": 2})
    (tmp / "edge.toml").write_text('bundle_dir = "bundles"\n[keyring]\nfile = "ring.json"\n')
    return tmp / "edge.toml"


def _sane(report: dict, count: int) -> None:
    assert set(FIELDS) <= set(report)
    assert report["count"] == count
    assert all(report[k] > 0 for k in FIELDS)
    assert report["latency_min_ms"] <= report["latency_median_ms"] <= report["latency_max_ms"]
    assert report["latency_min_ms"] <= report["latency_average_ms"] <= report["latency_max_ms"]


def test_bench_reports_benchmark_app_numbers(config_file):
    report = bench(load(config_file), BenchOptions("mm", niter=20, hint="THROUGHPUT",
                                                   requests=2)).to_dict()
    _sane(report, 20)
    assert report["bundle"] == "test--mm" and report["model_file"] == "mm.xml"
    assert report["requests"] == 2
    assert report["properties"]["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert report["inputs"] == {"x": "[2, 8]"}


def test_json_output_through_the_cli(config_file, capsys):
    rc = cli.main(["--config", str(config_file), "bench", "mm", "--niter", "20", "--json",
                   "--precision", "f32", "--streams", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    _sane(report, 20)
    assert report["properties"]["INFERENCE_PRECISION_HINT"] == "f32"


def test_time_mode_runs_for_about_that_long(config_file, capsys):
    assert cli.main(["--config", str(config_file), "bench", "mm", "--time", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "Throughput:" in out and "Latency:" in out and "Read model:" in out
    duration = float(out.split("Duration:")[1].split("ms")[0])
    assert 300 <= duration < 3000


def test_shape_makes_a_dynamic_input_static(config_file):
    report = bench(load(config_file), BenchOptions("dyn", shapes=parse_shapes(["x[3,8]"]),
                                                   niter=20)).to_dict()
    _sane(report, 20)
    assert report["inputs"] == {"x": "[3, 8]"}


def test_model_file_picks_one_ir_of_several(config_file):
    report = bench(load(config_file), BenchOptions("pair", model_file="decoder", niter=5))
    assert report.model_file == "decoder.xml" and report.count == 5


def test_task_resolves_a_name_two_tasks_share(config_file):
    assert bench(load(config_file), BenchOptions("twice", task="b", niter=5)).bundle == "b--twice"


@pytest.mark.parametrize("argv,message", [
    (["twice"], "exists for several tasks (a, b); pass --task"),
    (["nope"], "no bundle 'nope'"),
    (["twice", "--task", "c"], "no bundle 'twice' for task 'c'"),
    (["pair"], "pass --model-file with one of: decoder.xml, encoder.xml"),
    (["pair", "--model-file", "middle"], "has no IR 'middle'"),
    (["dyn"], "input 'x' has dynamic shape [?,8]; pass --shape x[...]"),
    (["dyn", "--shape", "y[1,8]"], "has no input 'y'; its inputs: x"),
    (["dyn", "--shape", "x(1,8)"], "expected NAME[D,D,...]"),
    (["dyn", "--shape", "x[1,?]"], "dimensions must be integers"),
    (["mm", "--niter", "0"], "--niter must be at least 1"),
])
def test_usage_errors_say_what_to_pass_and_exit_2(config_file, capsys, argv, message):
    assert cli.main(["--config", str(config_file), "bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgectl bench: ") and message in err


def test_parse_shapes_accepts_repeated_and_comma_joined_specs():
    assert parse_shapes(["a[1,3]", "b[2],c[4,5]", "[7]"]) == {"a": (1, 3), "b": (2,),
                                                              "c": (4, 5), "": (7,)}
    with pytest.raises(BenchError):
        parse_shapes(["a[-1]"])


def test_stateful_model_is_refused(tmp_path):
    import openvino as ov
    from openvino import opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    from edgectl.benchcmd import _refuse_stateful

    x = ops.parameter([1, 4], np.float32, name="x")
    info = VariableInfo()
    info.data_shape, info.data_type, info.variable_id = ov.PartialShape([1, 4]), ov.Type.f32, "kv"
    var = Variable(info)
    new = ops.add(ops.read_value(x, var), x)
    model = ov.Model([ops.result(new)], [ops.assign(new, var)], [x], "decoder")
    with pytest.raises(BenchError, match="is stateful"):
        _refuse_stateful(model, "asr--w", "decoder.xml")
    info.variable_id = "flag"
    flag = ops.read_value(x, Variable(info))  # written back unchanged: carries nothing
    model = ov.Model([ops.result(ops.add(flag, x))], [ops.assign(flag, Variable(info))], [x])
    _refuse_stateful(model, "tokenize--w", "tokenizer.xml")
