"""What every daemon and command does first: find the config, set up logging."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edge import config as config_mod
from edge import logs

DEFAULT_CONFIG = Path("configs/demo.toml")


def config_path(arg: str | None) -> Path:
    """--config, else $EDGE_CONFIG, else configs/demo.toml."""
    return Path(arg or os.environ.get("EDGE_CONFIG") or DEFAULT_CONFIG)


def load_config(arg: str | None) -> config_mod.Config:
    return config_mod.load(config_path(arg))


def setup_logging(config: config_mod.Config) -> None:
    logs.configure(config.log_format)


GIL_SWITCH_INTERVAL = 0.0005  # s


def start_daemon(prog: str, arg: str | None) -> config_mod.Config:
    """A daemon's first steps: load the config (exit 2 naming the bad field), set up logging."""
    try:
        config = load_config(arg)
    except config_mod.ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(config)
    # A thread woken by I/O (the outbox relay, paho's loop) waits for the GIL at most this long
    # instead of Python's 5 ms: the daemons' threads are I/O-bound and latency is the product.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    return config
