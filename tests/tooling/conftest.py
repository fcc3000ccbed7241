"""A live demo daemon with metrics, health and status endpoints, shared by the tooling tests."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from edgectl.localdaemon import Daemon
from edgectl.localservices import free_port


@dataclass
class Http:
    code: int
    body: str


def get(url: str, timeout: float = 10.0) -> Http:
    """GET a URL; an HTTP error status is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return Http(r.status, r.read().decode())
    except urllib.error.HTTPError as exc:
        return Http(exc.code, exc.read().decode())


def free_port_pair() -> int:
    """A free port whose successor is free too (agent = N, CPU worker = N + 1)."""
    for _ in range(50):
        port = free_port()
        try:
            import socket

            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def start_daemon(workdir, bundles, keyring_file) -> tuple[Daemon, int]:
    """A tokenize/detokenize demo daemon with `metrics_port`: agent on it, CPU worker on +1."""
    d = Daemon(workdir, bundles, keyring_file)
    port = free_port_pair()
    # metrics_port is a top-level key: it must come before the first [section]
    d.config.write_text(f"metrics_port = {port}\n" + d.config.read_text())
    d.start()
    return d, port


@pytest.fixture(scope="session")
def live(tmp_path_factory, tokenizer_bundles, keyring_file):
    """(daemon, agent metrics port, worker metrics port), shared by the tooling tests."""
    d, port = start_daemon(tmp_path_factory.mktemp("live"), tokenizer_bundles, keyring_file)
    yield d, port, port + 1
    d.stop()
