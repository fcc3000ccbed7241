"""`edgectl models ls | activate NAME VERSION | rollback NAME | remove NAME VERSION`.

Activation is two-phase, across every live worker that serves the model's task:

1. `prepare`: each worker compiles the version beside the ones serving and answers `ready`
   or `failed` (with why). Jobs keep running on the serving version meanwhile.
2. Every worker ready: the serving file is written (atomically), then `commit`: each worker
   swaps to the new version (nothing left to compile) and answers `serving`.
   Any worker failed or silent past the timeout: `abort`, the serving file is untouched, and
   the version was never activated anywhere.

A roll-back is the same towards the version that served before. Workers also converge on the
serving files by themselves (workers/lifecycle.py), so one that missed a command catches up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from edge import alive
from edge import constants as C
from edge.config import Config
from edge.queueing import queue_name
from edge.startup import load_config
from edge.tasks import BUNDLE_TASKS, TASKS, bundle_task


def add_parser(sub: Any) -> None:
    """Register `edgectl models ...` on the top-level subparsers."""
    p = sub.add_parser("models", help="model versions: list, activate, roll back, remove")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("ls", help="every model, its versions and the serving one")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_ls)
    for name, helptext, func, versioned in (
            ("activate", "make VERSION serve on every worker (two-phase, no downtime)",
             cmd_activate, True),
            ("rollback", "serve the version that served before", cmd_rollback, False),
            ("remove", "delete a version that does not serve", cmd_remove, True)):
        q = msub.add_parser(name, help=helptext)
        q.add_argument("name")
        if versioned:
            q.add_argument("version")
        q.add_argument("--task", choices=sorted(BUNDLE_TASKS),
                       help="the model's task, when the name exists under several")
        if name != "remove":
            q.add_argument("--timeout", type=float, default=300.0,
                           help="seconds to wait for every worker (default 300)")
        q.set_defaults(func=func)


def _find(config: Config, name: str, task: str | None) -> Any:
    from keys import layout

    found = [m for m in layout.installed(config.bundle_dir)
             if m.name == name and (task is None or m.task == task)]
    if not found:
        raise SystemExit(f"edgectl: no model {name!r} under {config.bundle_dir}")
    if len(found) > 1:
        raise SystemExit(f"edgectl: {name!r} exists for tasks "
                         f"{', '.join(m.task for m in found)}: say which with --task")
    return found[0]


def cmd_ls(args: argparse.Namespace) -> int:
    """Every installed model: versions, the serving one, what each live worker has loaded."""
    from keys import layout

    config = load_config(args.config)
    loaded = _loaded_on_workers(config)
    rows: list[dict[str, Any]] = []
    for m in layout.installed(config.bundle_dir):
        rows.append({"task": m.task, "name": m.name, "serving": m.serving,
                     "previous": m.previous, "versions": list(m.versions), "flat": m.flat,
                     "workers": loaded.get((m.task, m.name), {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        marks = " ".join(f"*{v}" if v == r["serving"] else v for v in r["versions"])
        where = "; ".join(f"{w}: serving {d['serving']}, loaded {','.join(d['loaded'])}"
                          for w, d in sorted(r["workers"].items()))
        print(f"{r['task']}--{r['name']}  versions {marks}"
              + (" (flat bundle)" if r["flat"] else "")
              + (f"  [{where}]" if where else "  [no live worker has it loaded]"))
    return 0


def _loaded_on_workers(config: Config) -> dict[tuple[str, str], dict[str, Any]]:
    import redis

    from edge.redisconn import connect

    out: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        docs = alive.worker_docs(connect(config.redis))
    except redis.RedisError as exc:
        print(f"edgectl: Redis unreachable ({exc}): not showing the workers", file=sys.stderr)
        return out
    for worker, doc in docs.items():
        for task, names in (doc.get("versions") or {}).items():
            for name, d in names.items():
                out.setdefault((task, name), {})[worker] = d
    return out


def cmd_activate(args: argparse.Namespace) -> int:
    """Make VERSION the serving version of NAME on every worker of the gateway."""
    config = load_config(args.config)
    model = _find(config, args.name, args.task)
    if args.version not in model.versions:
        print(f"edgectl: {model.task}--{model.name} has no version {args.version!r} "
              f"(installed: {', '.join(model.versions)})", file=sys.stderr)
        return 2
    if model.serving == args.version:
        print(f"{model.task}--{model.name} {args.version} is already serving")
        return 0
    refusal = _check_bundle(config, model.versions[args.version])
    if refusal:
        print(f"edgectl: {model.task}--{model.name} {args.version} is refused: {refusal}",
              file=sys.stderr)
        return 1
    history = [args.version, *(v for v in [model.serving, *model.history]
                               if v and v != args.version)]
    return switch(config, model, args.version, history, args.timeout)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Serve again the version that served before the current one (the current one becomes
    the previous: a second roll-back returns to it)."""
    config = load_config(args.config)
    model = _find(config, args.name, args.task)
    target = model.previous
    if target is None:
        print(f"edgectl: {model.task}--{model.name} has no earlier serving version installed "
              f"to roll back to (serving {model.serving})", file=sys.stderr)
        return 1
    # like `kubectl rollout undo`: the version rolled back from becomes the previous one, so
    # it stays loaded (model=name@version reaches it) and a second roll-back undoes the first
    rest = list(model.history)
    older = rest[rest.index(target) + 1:] if target in rest else []
    history = [target, *dict.fromkeys(v for v in [model.serving, *older] if v and v != target)]
    return switch(config, model, target, history, args.timeout)


def cmd_remove(args: argparse.Namespace) -> int:
    """Delete one version; the serving one is refused."""
    from keys import layout

    config = load_config(args.config)
    model = _find(config, args.name, args.task)
    if args.version not in model.versions:
        print(f"edgectl: {model.task}--{model.name} has no version {args.version!r}",
              file=sys.stderr)
        return 2
    if args.version == model.serving:
        print(f"edgectl: {model.task}--{model.name} {args.version} is serving: activate "
              "another version first", file=sys.stderr)
        return 1
    if model.flat:
        print("edgectl: a flat bundle has a single version", file=sys.stderr)
        return 1
    layout.remove_version(model.path, args.version)
    layout.write_serving(model.path, [v for v in model.history if v != args.version])
    print(f"removed {model.task}--{model.name} {args.version}")
    return 0


def _check_bundle(config: Config, path: Any) -> str | None:
    """Why the version cannot serve, found before any worker is asked (None: no reason)."""
    import keys
    from keys import load_ring
    from workers.schema import check

    try:
        keys.verify_bundle(path, load_ring(config.keyring), check=check)
    except (keys.BundleError, keys.KeyringError) as exc:
        return str(exc)
    return None


def live_workers(conn: Any, config: Config, task: str) -> list[str]:
    """The workers that beat lately on a queue of a job task served by bundle task `task`."""
    now, names = alive.redis_time(conn), set()
    for job_task, tcfg in config.tasks.items():
        if job_task in TASKS and bundle_task(job_task) == task:
            for device in tcfg.devices:
                for worker, stamp in alive.beats(conn, queue_name(job_task, device)).items():
                    if now - stamp < C.ALIVE_WINDOW:
                        names.add(worker)
    return sorted(names)


def switch(config: Config, model: Any, version: str, history: list[str],
           timeout: float) -> int:
    """Two-phase switch of `model` to `version` (module docstring); the exit code."""
    import redis

    from edge.redisconn import connect
    from keys import layout

    label = f"{model.task}--{model.name} {version}"
    conn = connect(config.redis)
    try:
        workers = live_workers(conn, config, model.task)
    except redis.RedisError as exc:
        print(f"edgectl: Redis unreachable ({exc}): cannot ask the workers; nothing changed",
              file=sys.stderr)
        return 2
    if not workers:
        layout.unflatten(model.path)
        layout.write_serving(model.path, history)
        print(f"{label}: no live worker serves {model.task}; the serving file now names it "
              "and workers load it when they start")
        return 0
    started = time.monotonic()
    cid = uuid.uuid4().hex
    cmd = {"id": cid, "task": model.task, "name": model.name, "version": version}
    print(f"{label}: preparing on {len(workers)} worker(s): {', '.join(workers)}")
    answers = _ask(conn, {**cmd, "op": "prepare"}, workers, ("ready", "failed"), timeout)
    not_ready = {w: a for w, a in answers.items() if a.get("state") != "ready"}
    if not_ready:
        _ask(conn, {**cmd, "op": "abort"}, workers, ("aborted",), 10.0)
        for worker, a in sorted(not_ready.items()):
            why = a.get("reason") or ("no answer in time" if not a else a.get("state"))
            print(f"  {worker}: {a.get('state', 'silent')}: {why}", file=sys.stderr)
        print(f"{label}: NOT activated (the serving version is unchanged)", file=sys.stderr)
        return 1
    layout.write_serving(model.path, history)
    answers = _ask(conn, {**cmd, "op": "commit"}, workers, ("serving", "failed"), timeout)
    late = {w: a for w, a in answers.items() if a.get("state") != "serving"}
    seconds = time.monotonic() - started
    for worker, a in sorted(late.items()):
        print(f"  {worker}: {a.get('state', 'silent')}: {a.get('reason') or 'no answer in time'}"
              " (it converges on the serving file by itself)", file=sys.stderr)
    print(f"{label}: serving on {len(workers) - len(late)}/{len(workers)} worker(s) "
          f"after {seconds:.2f} s")
    return 1 if late else 0


def _ask(conn: Any, cmd: dict[str, Any], workers: list[str], final: tuple[str, ...],
         timeout: float) -> dict[str, dict[str, Any]]:
    """Send `cmd` to every worker and wait until each has answered one of `final` states
    (or the timeout); worker -> its answer ({} when it said nothing)."""
    key = C.MODELS_ACK_KEY.format(id=cmd["id"])
    conn.xadd(C.MODELS_STREAM, {"cmd": json.dumps(cmd)}, maxlen=C.MODELS_STREAM_MAXLEN,
              approximate=True)
    deadline = time.monotonic() + timeout
    answers: dict[str, dict[str, Any]] = {w: {} for w in workers}
    while True:
        raw = conn.hgetall(key)
        for field, value in raw.items():
            op, _, worker = field.decode().partition(":")
            if op == cmd["op"] and worker in answers:
                answers[worker] = json.loads(value)
        if all(a.get("state") in final for a in answers.values()):
            return answers
        if time.monotonic() > deadline:
            return answers
        time.sleep(0.05)
