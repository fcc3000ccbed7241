"""The node summary the agent publishes (retained) and `edgectl status` prints."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from edge import constants as C
from edge.config import Config
from edge.queueing import queue_name


def node_status(conn: redis.Redis, config: Config, online: bool = True) -> dict[str, Any]:
    """Online flag, live workers with their models, queue depths, outbox lag."""
    now = time.time()
    queues = {}
    for task, tcfg in config.tasks.items():
        for device in tcfg.devices:
            name = queue_name(task, device)
            queues[name] = {
                "depth": conn.llen(f"rq:queue:{name}"),
                "limit": tcfg.queue_limit,
                "workers": conn.zcount(C.ALIVE_KEY.format(queue=name), now - C.ALIVE_WINDOW,
                                       "+inf"),
            }
    workers = {}
    for key in conn.scan_iter(match=C.WORKER_KEY.format(worker="*"), count=100):
        raw = conn.get(key)
        if raw:
            doc = json.loads(raw)
            workers[doc.get("name", key.decode())] = doc
    try:
        outbox = conn.xlen(C.OUTBOX_STREAM)
    except redis.ResponseError:
        outbox = 0
    return {"node": config.node, "online": online, "time": round(now, 3),
            "workers": workers, "queues": queues, "outbox": outbox,
            "devices": sorted({w.get("device") for w in workers.values() if w.get("device")})}
