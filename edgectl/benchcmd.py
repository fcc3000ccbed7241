"""`edgectl bench`: benchmark_app for encrypted bundles (benchmark_app cannot open them).

The IR is decrypted in memory (`workers.api.read_ir`), reshaped by `--shape`, compiled with the
device's properties from the config overridden by the flags, fed random inputs and run with the
optimal (or `--requests`) number of requests for `--time` seconds or `--niter` iterations, as
benchmark_app does. The report has benchmark_app's numbers (count, duration, latency
median/average/min/max, throughput) plus the read (decrypt + read_model), compile and
first-inference times.

Throughput is inferences per second; unlike benchmark_app it is not multiplied by a batch size.
Stateful models (ReadValue/Assign, e.g. the Whisper decoder) are refused: their state carries
from one inference to the next, so random inputs run in parallel would measure nothing real.

openvino, keys and workers are imported inside functions so that `edgectl` starts without them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_SECONDS = 10.0
TEXTS = ("Hello world.", "The quick brown fox jumps over the lazy dog.",
         "Edge inference, encrypted at rest.", "¿Dónde está la biblioteca?")
_SHAPE = re.compile(r"([^\[\],]*)\[([^\]]*)\]")


class BenchError(Exception):
    """Something the operator must fix (exit 2) or a model OpenVINO refused (exit 1)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to benchmark and how; `shapes` maps an input name ('' for every input) to dims."""

    bundle: str
    task: str | None = None
    model_file: str | None = None
    device: str = "CPU"
    hint: str | None = None
    streams: int | None = None
    requests: int | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seconds: float | None = None
    niter: int | None = None
    precision: str | None = None


@dataclass(frozen=True, slots=True)
class BenchReport:
    """benchmark_app's numbers for one compiled model; times in milliseconds."""

    bundle: str
    model_file: str
    device: str
    properties: Mapping[str, str]
    inputs: Mapping[str, str]
    requests: int
    read_ms: float
    compile_ms: float
    first_inference_ms: float
    count: int
    duration_ms: float
    latency_median_ms: float
    latency_average_ms: float
    latency_min_ms: float
    latency_max_ms: float
    throughput_fps: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """Human-readable, laid out like benchmark_app's summary."""
        props = ", ".join(f"{k}={v}" for k, v in self.properties.items())
        inputs = ", ".join(f"{k}{v}" for k, v in self.inputs.items())
        return "\n".join([
            f"Bundle:          {self.bundle} ({self.model_file})",
            f"Device:          {self.device} ({props})",
            f"Inputs:          {inputs}",
            f"Requests:        {self.requests}",
            f"Read model:      {self.read_ms:.2f} ms (decrypt + read_model)",
            f"Compile model:   {self.compile_ms:.2f} ms",
            f"First inference: {self.first_inference_ms:.2f} ms",
            f"Count:           {self.count} iterations",
            f"Duration:        {self.duration_ms:.2f} ms",
            "Latency:",
            f"   Median:       {self.latency_median_ms:.2f} ms",
            f"   Average:      {self.latency_average_ms:.2f} ms",
            f"   Min:          {self.latency_min_ms:.2f} ms",
            f"   Max:          {self.latency_max_ms:.2f} ms",
            f"Throughput:      {self.throughput_fps:.2f} FPS",
        ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `edgectl bench` flags."""
    p.add_argument("bundle", metavar="BUNDLE_NAME", help="bundle name (or <task>--<name>)")
    p.add_argument("--task", help="the bundle's task, when several bundles share the name")
    p.add_argument("--model-file", help="the IR (.xml) to run, when the bundle has several")
    p.add_argument("--device", default="CPU")
    p.add_argument("--hint", choices=HINTS, help="PERFORMANCE_HINT (default: the config's)")
    p.add_argument("--streams", type=int, help="NUM_STREAMS")
    p.add_argument("--requests", type=int, help="infer requests (default: the optimal number)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME[D,...]",
                   help="static input shape, e.g. input[1,3,270,480]; repeat or comma-join")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--time", type=float, help=f"seconds to run (default {DEFAULT_SECONDS:g})")
    stop.add_argument("--niter", type=int, help="iterations to run")
    p.add_argument("--precision", choices=PRECISIONS, help="INFERENCE_PRECISION_HINT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run `edgectl bench` from parsed arguments; usage errors print one line and exit 2."""
    import keys
    from edge.startup import load_config

    try:
        opts = BenchOptions(args.bundle, args.task, args.model_file, args.device, args.hint,
                            args.streams, args.requests, parse_shapes(args.shape),
                            args.time, args.niter, args.precision)
        report = bench(load_config(args.config), opts)
    except (BenchError, keys.BundleError, keys.KeyringError) as exc:
        print(f"edgectl bench: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`["x[1,3,8,8]", "a[1],b[2]"]` -> `{"x": (1, 3, 8, 8), ...}`; a bare `[..]` is every input."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        matches = list(_SHAPE.finditer(spec))
        if not matches or _SHAPE.sub("", spec).strip(", "):
            raise BenchError(f"--shape {spec!r}: expected NAME[D,D,...], e.g. input[1,3,270,480]")
        for m in matches:
            try:
                dims = tuple(int(d) for d in m.group(2).split(",") if d.strip())
            except ValueError:
                raise BenchError(f"--shape {spec!r}: dimensions must be integers") from None
            if any(d < 0 for d in dims):
                raise BenchError(f"--shape {spec!r}: dimensions must be static (>= 0)")
            shapes[m.group(1).strip()] = dims
    return shapes


def bench(config: Any, opts: BenchOptions) -> BenchReport:
    """Open, read, reshape, compile and run one IR of a bundle; return benchmark_app's numbers."""
    import openvino as ov

    try:
        import openvino_tokenizers  # noqa: F401 - registers the tokenizer ops with new Cores
    except ImportError:
        pass
    from keys import load_ring
    from workers.api import read_ir
    from workers.model_store import device_present

    if opts.niter is not None and opts.niter < 1:
        raise BenchError("--niter must be at least 1")
    if opts.seconds is not None and opts.seconds <= 0:
        raise BenchError("--time must be positive")
    bundle = find_bundle(config.bundle_dir, load_ring(config.keyring), opts.bundle, opts.task)
    xml = pick_model_file(bundle, opts.model_file)
    core = ov.Core()
    if not device_present(core, opts.device):
        raise BenchError(f"OpenVINO device {opts.device!r} is not present on this host "
                         f"(available: {', '.join(core.available_devices)})")
    t0 = time.perf_counter()
    model = read_ir(core, bundle, xml)
    read_ms = (time.perf_counter() - t0) * 1000
    _refuse_stateful(model, bundle.id, xml)
    _reshape(model, opts.shapes, xml)
    props = properties(config.device(opts.device).properties(), opts)
    t0 = time.perf_counter()
    try:
        compiled = core.compile_model(model, opts.device, props)
    except RuntimeError as exc:
        raise BenchError(f"{bundle.id}/{xml}: compile failed on {opts.device}: {exc}", 1) from None
    compile_ms = (time.perf_counter() - t0) * 1000
    nreq = opts.requests or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    run = _run(compiled, nreq, opts)
    return BenchReport(
        bundle=bundle.id, model_file=xml, device=opts.device,
        properties={k: _text(compiled.get_property(k)) for k in
                    ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_PRECISION_HINT")
                    if k in _supported(compiled)},
        inputs={_name(p): str(list(p.get_shape())) for p in compiled.inputs},
        requests=nreq, read_ms=read_ms, compile_ms=compile_ms, **run)


def find_bundle(root: Any, ring: Any, name: str, task: str | None) -> Any:
    """The one bundle called `name` (or `<task>--<name>`; `@version` for another version than
    the serving one), of `task` when given."""
    import keys
    from keys import layout

    opened, failed = keys.open_all(root, ring)
    name, _, version = name.partition("@")
    hits = [b for b in opened if name in (b.name, b.id) and task in (None, b.task)]
    serving = {(m.task, m.name): m.serving for m in layout.installed(root)}
    hits = [b for b in hits if b.version == (version or serving.get((b.task, b.name)))]
    if len(hits) == 1:
        return hits[0]
    if hits:
        tasks = ", ".join(sorted(b.task for b in hits))
        raise BenchError(f"bundle {name!r} exists for several tasks ({tasks}); pass --task")
    broken = [f"{p.name}: {e}" for p, e in failed if name in p.name]
    known = ", ".join(sorted(b.id for b in opened)) or "none"
    where = f" (could not open: {'; '.join(broken)})" if broken else ""
    of_task = f" for task {task!r}" if task else ""
    raise BenchError(f"no bundle {name!r}{of_task} in {root}{where}; bundles: {known}")


def pick_model_file(bundle: Any, wanted: str | None) -> str:
    """The bundle's IR to run: `wanted` (with or without .xml), or its only one."""
    xmls = sorted(f for f in bundle.files if f.endswith(".xml"))
    if not xmls:
        raise BenchError(f"bundle {bundle.id} has no OpenVINO IR (.xml)")
    if wanted is None:
        if len(xmls) > 1:
            raise BenchError(f"bundle {bundle.id} has several IRs; pass --model-file with one "
                             f"of: {', '.join(xmls)}")
        return xmls[0]
    for candidate in (wanted, wanted + ".xml"):
        if candidate in xmls:
            return candidate
    raise BenchError(f"bundle {bundle.id} has no IR {wanted!r}; it has: {', '.join(xmls)}")


def properties(base: Mapping[str, Any], opts: BenchOptions) -> dict[str, Any]:
    """The config's compile properties for the device, overridden by the flags."""
    props = dict(base)
    for key, value in (("PERFORMANCE_HINT", opts.hint), ("NUM_STREAMS", opts.streams),
                       ("INFERENCE_PRECISION_HINT", opts.precision)):
        if value is not None:
            props[key] = value
    return props


def _refuse_stateful(model: Any, bundle_id: str, xml: str) -> None:
    """Refuse a model whose state carries from one inference to the next (a KV cache).

    An Assign that writes back its own ReadValue (how openvino_tokenizers keeps a settable
    flag) carries nothing and is allowed.
    """
    carried = sorted(op.get_friendly_name() for op in model.get_sinks()
                     if op.input_value(0).get_node().get_type_name() != "ReadValue")
    if carried:
        raise BenchError(f"{bundle_id}/{xml} is stateful ({len(carried)} ReadValue/Assign "
                         f"state variables, e.g. {', '.join(carried[:2])}): its state carries "
                         f"between inferences, so random inputs run in parallel would measure "
                         f"nothing meaningful")


def _reshape(model: Any, shapes: Mapping[str, tuple[int, ...]], xml: str) -> None:
    """Apply `--shape`; then every non-string input must be static (strings default to [1])."""
    if shapes:
        by_name = {n: p for p in model.inputs for n in (*p.get_names(), _name(p))}
        if "" in shapes:
            wanted = {p: shapes[""] for p in model.inputs}
        else:
            unknown = sorted(set(shapes) - set(by_name))
            if unknown:
                raise BenchError(f"{xml} has no input {', '.join(map(repr, unknown))}; "
                                 f"its inputs: {', '.join(_name(p) for p in model.inputs)}")
            wanted = {by_name[n]: dims for n, dims in shapes.items()}
        try:
            model.reshape({p: list(dims) for p, dims in wanted.items()})
        except RuntimeError as exc:
            raise BenchError(f"{xml}: cannot reshape to {dict(shapes)}: {exc}") from None
    for p in model.inputs:
        if not p.get_partial_shape().is_static and not _is_string(p):
            raise BenchError(f"{xml}: input {_name(p)!r} has dynamic shape "
                             f"{p.get_partial_shape()}; pass --shape {_name(p)}[...] "
                             f"with static dimensions")


def _run(compiled: Any, nreq: int, opts: BenchOptions) -> dict[str, Any]:
    """benchmark_app's loop: fill each request once, keep every request busy, time each one.

    Requests are driven round-robin with `start_async`/`wait` rather than through an
    `AsyncInferQueue` with a Python callback: on OpenVINO 2026.4 that queue's destructor holds
    the GIL while a callback thread waits for it, and the process hangs now and then (measured
    here; openvino PR #37073). With equal requests on one device the two schedules are the same.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    requests = [compiled.create_infer_request() for _ in range(nreq)]
    for request in requests:
        for i, port in enumerate(compiled.inputs):
            request.set_input_tensor(i, random_tensor(port, rng))
    t0 = time.perf_counter()
    requests[0].infer()
    first_ms = (time.perf_counter() - t0) * 1000
    latencies: list[float] = []
    seconds = opts.seconds if opts.seconds is not None else DEFAULT_SECONDS
    count = 0
    start = time.perf_counter()
    while (count < opts.niter) if opts.niter else (time.perf_counter() - start < seconds):
        request = requests[count % nreq]
        if count >= nreq:
            request.wait()
            latencies.append(request.latency)
        request.start_async()
        count += 1
    in_flight = requests[:min(count, nreq)]  # each has one run not yet counted
    for request in in_flight:
        request.wait()
    duration = time.perf_counter() - start
    latencies += [request.latency for request in in_flight]
    return dict(first_inference_ms=first_ms, count=count, duration_ms=duration * 1000,
                latency_median_ms=statistics.median(latencies),
                latency_average_ms=statistics.fmean(latencies),
                latency_min_ms=min(latencies), latency_max_ms=max(latencies),
                throughput_fps=count / duration)


def random_tensor(port: Any, rng: Any) -> Any:
    """Random data of the port's type: floats in [0, 1), small ints, texts for strings."""
    import numpy as np
    import openvino as ov

    etype = port.get_element_type()
    if _is_string(port):
        pshape = port.get_partial_shape()
        shape = [d.get_length() if d.is_static else 1 for d in pshape]
        texts = [TEXTS[i % len(TEXTS)] for i in range(int(np.prod(shape, dtype=np.int64)))]
        return ov.Tensor(np.array(texts).reshape(shape))
    shape = list(port.get_shape())
    tensor = ov.Tensor(etype, shape)
    if etype == ov.Type.bf16:  # numpy has no bf16: the high half of an f32 is its bf16
        values = np.asarray(rng.random(shape, np.float32))
        tensor.data.view(np.uint16)[...] = (values.view(np.uint32) >> 16).astype(np.uint16)
    elif etype == ov.Type.boolean:
        tensor.data[...] = rng.integers(0, 2, shape).astype(bool)
    elif etype.is_real():
        tensor.data[...] = rng.random(shape)
    else:
        tensor.data[...] = rng.integers(0, 10, shape)
    return tensor


def _is_string(port: Any) -> bool:
    import openvino as ov

    return port.get_element_type() == ov.Type.string


def _name(port: Any) -> str:
    names = port.get_names()
    return port.get_any_name() if names else port.get_node().get_friendly_name()


def _text(value: Any) -> str:
    """A property value as benchmark_app prints it (`bf16`, not `<Type: 'bfloat16'>`)."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def _supported(compiled: Any) -> set[str]:
    return set(compiled.get_property("SUPPORTED_PROPERTIES"))
