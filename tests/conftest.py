"""Session-wide fixtures: private Redis and Mosquitto, a test keyring, packed bundles, a daemon.

The services run from Debian's binaries on free ports and are stopped at the end; nothing here
touches the machine's own Redis (6379) or Mosquitto (1883).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from edgectl.localservices import MosquittoServer, RedisServer

PREPARED = Path.home() / ".cache" / "edge-daemon" / "prepared"


@pytest.fixture(scope="session", autouse=True)
def _no_server_outlives_the_session():
    """Whatever a failed fixture left running is stopped at the end."""
    yield
    from edgectl.localservices import stop_all

    stop_all()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory):
    server = MosquittoServer(tmp_path_factory.mktemp("mosquitto")).start()
    yield server
    server.stop()


@pytest.fixture
def conn(redis_server):
    """A connection to the session's private Redis, emptied before and after the test."""
    c = redis.Redis.from_url(redis_server.url)
    c.flushdb()
    yield c
    c.flushdb()


@pytest.fixture(scope="session")
def keyring_file(tmp_path_factory):
    """A keyring generated for this test session (never committed)."""
    import keys

    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    keys.Keyring.generate().save(path)
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="session")
def tokenizer_bundles(tmp_path_factory, keyring_file):
    """The three tokenizer bundles, prepared (cached) and packed with the session keyring."""
    import keys
    from workers.tokenize.prepare import prepare

    folders = prepare(PREPARED)
    root = tmp_path_factory.mktemp("bundles")
    ring = keys.Keyring.load_file(keyring_file)
    for folder in folders:
        keys.pack_bundle(folder, root, ring)
    return root


@pytest.fixture(scope="session")
def packed_bundles(tmp_path_factory, keyring_file):
    """`packed_bundles("asr", "tokenize")`: a bundle dir with those tasks' bundles (cached)."""
    import importlib

    import keys

    made: dict[tuple[str, ...], Path] = {}

    def pack(*tasks: str) -> Path:
        key = tuple(sorted(set(tasks)))
        if key not in made:
            root = tmp_path_factory.mktemp("bundles-" + "-".join(key))
            ring = keys.Keyring.load_file(keyring_file)
            for task in key:
                for folder in importlib.import_module(f"workers.{task}.prepare").prepare(PREPARED):
                    keys.pack_bundle(folder, root, ring)
            made[key] = root
        return made[key]

    return pack
