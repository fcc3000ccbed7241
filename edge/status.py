"""The node summary the agent publishes (retained) and `edgectl status` prints."""

from __future__ import annotations

import time
from typing import Any

import redis

from edge import alive
from edge import constants as C
from edge.config import Config
from edge.queueing import depth, queue_name


def node_status(conn: redis.Redis, config: Config, online: bool = True) -> dict[str, Any]:
    """Online flag, live workers with their models, queue depths, outbox lag."""
    now, redis_now = time.time(), alive.redis_time(conn)  # beats are stamped in Redis' clock
    queues = {}
    for task, tcfg in config.tasks.items():
        for device in tcfg.devices:
            name = queue_name(task, device)
            queues[name] = {
                "depth": depth(conn, name),
                "limit": tcfg.queue_limit,
                "workers": alive.live_count(conn, name, redis_now),
            }
    workers = alive.worker_docs(conn)
    try:
        outbox = conn.xlen(C.OUTBOX_STREAM)
    except redis.ResponseError:
        outbox = 0
    return {"node": config.node, "online": online, "time": round(now, 3),
            "workers": workers, "queues": queues, "outbox": outbox, "redis": redis_memory(conn, config.limits.redis_fill_percent),
            "devices": sorted({w.get("device") for w in workers.values() if w.get("device")}),
            "serving": serving_versions(workers)}


def serving_versions(workers: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """`task--name` -> the versions its live workers serve (two during an activation)."""
    out: dict[str, set[str]] = {}
    for doc in workers.values():
        for task, names in (doc.get("versions") or {}).items():
            for name, state in names.items():
                if state.get("serving"):
                    out.setdefault(f"{task}--{name}", set()).add(str(state["serving"]))
    return {model: sorted(versions) for model, versions in sorted(out.items())}


def redis_memory(conn: redis.Redis, fill_percent: int = 100) -> dict[str, Any]:
    """Redis' memory use against its `maxmemory`; `full` when new jobs are refused (past
    `fill_percent` of it: limits.redis_fill_percent)."""
    info = conn.info("memory")
    used, cap = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    return {"used_memory": used, "maxmemory": cap,
            "full": bool(cap) and used * 100 >= cap * fill_percent}
