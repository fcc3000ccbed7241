"""One way to open a Redis connection from the config."""

from __future__ import annotations

import redis

from edge.config import RedisConfig


def connect(cfg: RedisConfig, **kwargs) -> redis.Redis:
    """A Redis client for `cfg` (password read from its file, never from the config itself)."""
    password = cfg.password_file.read_text().strip() if cfg.password_file else None
    if not cfg.url.startswith("unix://"):
        # TCP keepalive notices a dead peer; a unix socket connection refuses the option.
        kwargs.setdefault("socket_keepalive", True)
    return redis.Redis.from_url(cfg.url, username=cfg.username, password=password,
                                health_check_interval=30, **kwargs)
