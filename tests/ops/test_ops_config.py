"""Config for operations: the workers' own Redis user, where each process serves /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import ConfigError, parse

TASKS = {"tokenize": {"devices": ["GPU", "CPU"]}, "asr": {"devices": ["NPU", "CPU"]}}


def test_redis_worker_section_overrides_only_what_it_names():
    cfg = parse({"redis": {"url": "unix:///run/redis-edge/redis.sock?db=0",
                           "username": "edge-agent", "password_file": "/etc/edge/redis-agent",
                           "worker": {"username": "edge-worker",
                                      "password_file": "/etc/edge/redis-worker"}}})
    w = cfg.redis.for_worker()
    assert (w.url, w.username, w.password_file) == (
        "unix:///run/redis-edge/redis.sock?db=0", "edge-worker", Path("/etc/edge/redis-worker"))
    assert cfg.redis.username == "edge-agent"


def test_without_redis_worker_workers_use_redis():
    cfg = parse({"redis": {"username": "u"}})
    assert cfg.redis.for_worker() is cfg.redis


def test_unknown_key_in_redis_worker_is_refused_with_its_path():
    with pytest.raises(ConfigError, match=r"redis.worker.user\b"):
        parse({"redis": {"worker": {"user": "x"}}})


def test_worker_metrics_ports_follow_the_sorted_device_list():
    cfg = parse({"metrics_port": 9100, "tasks": TASKS})
    assert [cfg.worker_metrics_port(d) for d in ("CPU", "GPU", "NPU")] == [9101, 9102, 9103]


def test_per_device_metrics_port_wins_and_zero_turns_everything_off():
    cfg = parse({"metrics_port": 9100, "tasks": TASKS, "devices": {"GPU": {"metrics_port": 9200}}})
    assert cfg.worker_metrics_port("GPU") == 9200
    assert parse({"tasks": TASKS}).worker_metrics_port("CPU") == 0
