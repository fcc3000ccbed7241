"""Who is alive, in Redis' clock: the workers' beats and the reaper's watch.

Every live worker beats every `C.HEARTBEAT_INTERVAL` s: its name goes into the alive set
(`C.ALIVE_KEY`, a sorted set) of each queue it serves with Redis' `TIME` as the score, and its
document (device, models, what failed to load) into `C.WORKER_KEY` with an expiry. Workers
write here (`beat`, `withdraw`); the reaper, the status and the enqueue read. Every stamp is
Redis' clock, never a host's, so hosts whose clocks disagree (or step) still agree on ages, and
an age is always `redis_time(conn) - stamp` (or, in Lua, `redis.call('TIME')` minus the score).

The reaper also stamps each of its passes here (`watch`): a pass that finds the previous
stamp old learns that nobody watched Redis in between (Redis was down, or the agents were).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from edge import constants as C
from edge import scripts

PRUNE_AFTER = 10 * C.ALIVE_WINDOW  # s: a beat this old is a worker long gone; its entry goes
DOC_TTL = int(2 * C.ALIVE_WINDOW)  # s a worker's document outlives its last beat

def redis_time(conn: redis.Redis) -> float:
    """Redis' clock (`TIME`) in unix seconds: the one clock every age here is read in."""
    seconds, micros = conn.time()
    return seconds + micros / 1e6


def beat(conn: redis.Redis, worker: str, queues: Iterable[str], doc: Mapping[str, Any],
         ttl: int = DOC_TTL, prune_after: float = PRUNE_AFTER) -> float:
    """Stamp `worker` alive on each of `queues` with Redis' clock, drop members of those sets
    not seen for `prune_after` s, and store its document for `ttl` s; one round trip, atomic.
    Returns the stamp (Redis time)."""
    keys = [C.WORKER_KEY.format(worker=worker), *(C.ALIVE_KEY.format(queue=q) for q in queues)]
    seconds, micros = conn.register_script(scripts.BEAT)(
        keys=keys, args=[worker, json.dumps(doc), ttl, prune_after])
    return int(seconds) + int(micros) / 1e6


def withdraw(conn: redis.Redis, worker: str, queues: Iterable[str]) -> None:
    """Take `worker` off every one of `queues` and drop its document (a clean stop)."""
    pipe = conn.pipeline(transaction=False)
    for q in queues:
        pipe.zrem(C.ALIVE_KEY.format(queue=q), worker)
    pipe.delete(C.WORKER_KEY.format(worker=worker))
    pipe.execute()


def beats(conn: redis.Redis, queue: str) -> dict[str, float]:
    """Every worker that beat on `queue` lately -> its last stamp (Redis time)."""
    members: list[tuple[bytes, float]] = conn.zrange(C.ALIVE_KEY.format(queue=queue), 0, -1,
                                                     withscores=True)  # type: ignore[assignment]
    return {w.decode(): s for w, s in members}


def live_count(conn: redis.Redis, queue: str, now: float | None = None,
               window: float = C.ALIVE_WINDOW) -> int:
    """How many workers of `queue` beat within the last `window` s of Redis' clock (`now`,
    read from Redis when not given): the ones the enqueue routes to."""
    now = redis_time(conn) if now is None else now
    return int(conn.zcount(C.ALIVE_KEY.format(queue=queue), now - window, "+inf"))


def worker_docs(conn: redis.Redis) -> dict[str, dict[str, Any]]:
    """The document of every worker that beat within its document's TTL, by worker name."""
    docs = {}
    for key in conn.scan_iter(match=C.WORKER_KEY.format(worker="*"), count=100):
        raw = conn.get(key)
        if raw:
            doc = json.loads(raw)
            docs[doc.get("name", key.decode())] = doc
    return docs


def watch(conn: redis.Redis) -> tuple[float, float | None]:
    """Stamp a reaper's pass: Redis' time now, and the stamp of the pass before (any agent's;
    None when no reaper ever looked at this Redis). One round trip."""
    seconds, micros, prev = conn.register_script(scripts.WATCH)(keys=[C.WATCH_KEY])
    return int(seconds) + int(micros) / 1e6, None if prev is None else float(prev)
