"""`edgectl`: the operator's tool.

    edgectl run TASK INPUT... [--param k=v] [--out DIR]     one job in-process (no Redis/MQTT)
    edgectl submit TASK INPUT... [--device-id ID]           one job over MQTT, as a device would
    edgectl prepare TASK [--force]                          convert + pack the demo bundles
    edgectl prepare TASK --from PATH [--name N] [--version V] the user's own model -> a bundle
    edgectl bundle pack|verify|ls|import-openssl ...        encrypted model bundles
    edgectl keys generate|rotate|retire|ls ...              key-encryption keys
    edgectl status                                          node status, devices, queues
    edgectl top [--interval S] [--once]                     live view: tasks, queues, workers, errors
    edgectl models ls|activate N V|rollback N|remove N V    model versions, no downtime
    edgectl bench BUNDLE [--shape N[..]] [--niter N|--time S] benchmark_app for a bundle's IR
    edgectl install-units [--root DIR] [--bindir DIR] [--instance GPU:2]  copy the systemd units
    edgectl init-gateway [--root DIR] [--node N]            units, groups, /etc/edge, Redis, Mosquitto
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge.config import Config, ConfigError
from edge.startup import load_config
from edge.tasks import BUNDLE_TASKS, TASKS

PREPARE_CACHE = Path("~/.cache/edge-daemon/prepared").expanduser()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `edgectl`."""
    parser = argparse.ArgumentParser(prog="edgectl", description="Operate the edge daemon.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--config", help="daemon TOML (default: $EDGE_CONFIG or configs/demo.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one job in-process through the worker's pipeline")
    _job_args(p)
    p.add_argument("--device", default="CPU")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="publish one job over MQTT and wait for the answer")
    _job_args(p)
    p.add_argument("--device-id", default="edgectl")
    p.add_argument("--raw", action="store_true", help="send raw bytes + MQTT 5 properties")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--host", help="broker host (default: the config's [mqtt] host)")
    p.add_argument("--port", type=int, help="broker port (default: the config's [mqtt] port)")
    p.add_argument("--tls-ca", type=Path,
                   help="CA certificate: connect over TLS (default: the config's [mqtt] tls_ca)")
    p.add_argument("--username", help="broker login (default: the device id, when a password "
                                      "file is given)")
    p.add_argument("--password-file", type=Path, help="the device's broker password")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("prepare", help="convert models and pack them as encrypted bundles")
    p.add_argument("task", choices=sorted(BUNDLE_TASKS))
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--cache", type=Path, default=PREPARE_CACHE,
                   help="where plaintext prepared models are kept (build host only)")
    p.add_argument("--no-pack", action="store_true", help="prepare only; do not encrypt")
    p.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="task-specific prepare option")
    p.add_argument("--from", dest="source", type=Path, metavar="PATH",
                   help="the user's own checkpoint (a folder or file; README: 'Use your own "
                        "models' lists the layouts each task accepts)")
    p.add_argument("--name", help="model name (default: read from the checkpoint)")
    p.add_argument("--version", default="1", help="model version (default: 1)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("status", help="node status: workers, models, queues, devices")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="a refreshing view of tasks, queues, workers, models, errors")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--host", help="broker host (default: the config's [mqtt] host)")
    p.add_argument("--port", type=int, help="broker port (default: the config's [mqtt] port)")
    p.set_defaults(func=lambda a: __import__("edgectl.top").top.run(
        load_config(a.config), a.interval, a.once, host=a.host, port=a.port))
    __import__("edgectl.models").models.add_parser(sub)  # edgectl models ls|activate|...

    p = sub.add_parser("bench", help="benchmark one IR of an encrypted bundle (benchmark_app)")
    __import__("edgectl.benchcmd").benchcmd.add_arguments(p)

    p = sub.add_parser("install-units", help="copy the systemd units to /etc (starts nothing)")
    p.add_argument("--root", default="/", help="install under this tree (DESTDIR)")
    p.add_argument("--bindir", help="where edge-agent/edge-worker are (default: this venv's bin)")
    p.add_argument("--instance", action="append", default=[], metavar="DEVICE:N",
                   help="a further worker of a device (GPU:2): link the device's drop-ins for it")
    p.set_defaults(func=lambda a: __import__("edgectl.units").units.main(a.root, a.bindir,
                                                                          a.instance))

    p = sub.add_parser("init-gateway", help="lay out this gateway: units, groups, /etc/edge, "
                                            "Redis and Mosquitto configs (starts nothing)")
    p.add_argument("--root", default="/", help="write under this tree (DESTDIR)")
    p.add_argument("--node", help="this gateway's name (default: the short host name)")
    p.add_argument("--bindir", help="where edge-agent/edge-worker are (default: this venv's bin)")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="DNS name or IP in the broker's certificate (default: this host's FQDN, "
                        "localhost, 127.0.0.1)")
    p.set_defaults(func=lambda a: __import__("edgectl.gateway").gateway.main(
        a.root, a.node, a.bindir, a.tls_name))

    from keys.cli import add_subcommands
    from workers.schema import check as check_manifest

    add_subcommands(sub, lambda: _resolve_keys(parser), check=check_manifest)

    args = parser.parse_args(argv)
    from edge import logs

    logs.configure("auto")  # log lines go to stderr: stdout carries only the command's answer
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"edgectl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _resolve_keys(parser: argparse.ArgumentParser):
    args, _ = parser.parse_known_args()
    config = load_config(args.config)

    def load_ring():
        from keys import load_ring as _load

        return _load(config.keyring)

    return (config.keyring.file, load_ring, config.bundle_dir, config.keyring.signer,
            config.keyring)


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text (tokenize, lcm), JSON ids (detokenize) or file paths (media); "
                        "'-' reads stdin")
    p.add_argument("--param", action="append", default=[], metavar="K=V")
    p.add_argument("--out", type=Path, help="write result media here")


def _params(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"edgectl: --param {pair!r} is not K=V")
        out[key] = value
    return out


def envelope(task: str, inputs: list[str], params: dict[str, Any], rid: str) -> dict[str, Any]:
    """The JSON envelope a device would send for these command-line inputs."""
    spec = TASKS[task]
    values = [sys.stdin.read() if i == "-" else i for i in inputs]
    env: dict[str, Any] = {"id": rid}
    if params:
        env["params"] = params
    if "text" in spec.inputs:
        env["text"] = values[0] if len(values) == 1 else values
    elif "ids" in spec.inputs:
        parsed = [json.loads(v) for v in values]
        env["ids"] = parsed[0] if len(parsed) == 1 else parsed
    else:
        blobs = [sys.stdin.buffer.read() if i == "-" else Path(i).read_bytes() for i in inputs]
        b64 = [base64.b64encode(b).decode() for b in blobs]
        env["data"] = b64[0] if len(b64) == 1 else b64
    return env


def cmd_run(args: argparse.Namespace) -> int:
    """One job through the same validation, bundle and handler a worker uses."""
    from edge.jobs import Payload, error_answer
    from edge.protocol import Properties, Rejected, parse
    from keys import load_ring
    from workers.api import no_progress
    from workers.model_store import build_models
    from workers.perform import in_process, perform

    config = load_config(args.config)
    rid = uuid.uuid4().hex[:12]
    env = envelope(args.task, args.inputs, _params(args.param), rid)
    limits = {t: (config.tasks[t].max_bytes if t in config.tasks else 64 << 20) for t in TASKS}
    try:
        sub = parse(f"edge/jobs/{args.task}/edgectl", json.dumps(env).encode(), Properties(),
                    max_bytes=limits)
    except Rejected as exc:
        assert exc.route is not None, "an edge/jobs/... topic always has a route"
        return _print_answer(error_answer(exc.route, exc.error), args.out)
    started = time.perf_counter()
    models = build_models(_only(config, (args.task,), args.device), args.device,
                          load_ring(config.keyring))
    load_s = time.perf_counter() - started
    payload = Payload(sub.text, sub.ids, sub.media)
    answer = perform(in_process(sub.route, sub.params, batch=sub.batch), models,
                     lambda: payload, no_progress)
    body = dict(answer.body)
    body["timings"] = {**body.get("timings", {}), "load_ms": round(load_s * 1000, 3)}
    return _print_answer(replace(answer, body=body), args.out)


def _only(config: Config, tasks: tuple[str, ...], device: str) -> Config:
    """The config with `tasks` routed to `device` (edgectl run needs no other model)."""
    from dataclasses import replace

    from edge.config import TaskConfig

    routed = {t: replace(config.tasks.get(t, TaskConfig()), devices=(device,)) for t in tasks}
    return replace(config, tasks=routed)


def _print_answer(answer, out: Path | None) -> int:
    body = dict(answer.body)
    if answer.media:
        files = _write_media(answer.media, out or Path("."), answer.route.request_id)
        body.setdefault("result", {})["files"] = [str(f) for f in files]
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0 if body.get("status") == "ok" else 1


_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _write_media(media, out: Path, rid: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (ctype, data) in enumerate(media):
        path = out / f"{rid}-{i}{_EXT.get(ctype, '.bin')}"
        path.write_bytes(data)
        files.append(path)
    return files


def cmd_submit(args: argparse.Namespace) -> int:
    """Publish one job as a device would and wait for its answer."""
    from edgectl.client import DeviceClient

    config = load_config(args.config)
    rid = uuid.uuid4().hex[:12]
    params = _params(args.param)
    password = args.password_file.read_text().strip() if args.password_file else None
    username = args.username or (args.device_id if password is not None else None)
    tls_ca = args.tls_ca or config.mqtt.tls_ca
    # on a terminal, long jobs (asr windows, lcm and superres steps) draw a progress bar
    from edgectl.progressbar import ProgressBar

    progress = ProgressBar(sys.stderr, args.task) if sys.stderr.isatty() else None
    with DeviceClient(args.host or config.mqtt.host, args.port or config.mqtt.port,
                      device_id=args.device_id, username=username, password=password,
                      tls_ca=str(tls_ca) if tls_ca else None) as dev:
        if args.raw:
            spec = TASKS[args.task]
            payload = (args.inputs[0].encode() if "text" in spec.inputs
                       else Path(args.inputs[0]).read_bytes())
            dev.publish_raw(args.task, payload, rid, params=params,
                            content_type="text/plain" if "text" in spec.inputs else None)
        else:
            env = envelope(args.task, args.inputs, params, rid)
            dev.publish_envelope(args.task, env)
        try:
            reply = dev.wait(rid, args.timeout, on_progress=progress.update if progress else None)
        finally:
            if progress is not None:
                progress.finish()
    body = dict(reply.body)
    if reply.media:
        body.setdefault("result", {}).pop("media", None)
        files = _write_media(reply.media, args.out or Path("."), rid)
        body["result"]["files"] = [str(f) for f in files]
    for note in reply.progress if progress is None else ():
        print(json.dumps(note), file=sys.stderr)
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0 if reply.ok else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    """Run a task's prepare step, then encrypt each prepared folder into a bundle."""
    import importlib

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = _params(args.option)
    module = importlib.import_module(f"{TASKS[args.task].module}.prepare")
    if args.source is not None:
        prepare_from = getattr(module, "prepare_from", None)
        if prepare_from is None:
            print(f"edgectl: prepare {args.task} --from is not supported yet", file=sys.stderr)
            return 2
        if not args.source.exists():
            print(f"edgectl: {args.source}: no such file or folder", file=sys.stderr)
            return 2
        from edge.errors import EdgeError

        try:
            folders = [prepare_from(args.source, args.cache, name=args.name,
                                    version=args.version, force=args.force, options=options)]
        except EdgeError as exc:  # a model we cannot serve: say why, no traceback
            print(f"edgectl: {exc.message}", file=sys.stderr)
            return 2
        except ValueError as exc:  # a checkpoint the task cannot read (asr: CheckpointError)
            print(f"edgectl: prepare {args.task} --from {args.source}: {exc}", file=sys.stderr)
            return 2
    else:
        folders = module.prepare(args.cache, force=args.force, options=options)
    for folder in folders:
        print(f"prepared {folder}")
    if args.no_pack:
        return 0
    import keys
    from keys import load_ring
    from workers.schema import check as check_manifest

    config = load_config(args.config)
    ring = load_ring(config.keyring)
    config.bundle_dir.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        path = keys.pack_bundle(folder, config.bundle_dir, ring, check=check_manifest)
        print(f"packed {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Node status from Redis, plus the OpenVINO devices this host has."""
    from edge.redisconn import connect
    from edge.status import node_status

    config = load_config(args.config)
    doc = node_status(connect(config.redis), config)
    try:
        import openvino as ov

        core = ov.Core()
        doc["host_devices"] = {d: core.get_property(d, "FULL_DEVICE_NAME")
                               for d in core.available_devices}
    except ImportError:
        doc["host_devices"] = "openvino not installed"
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
