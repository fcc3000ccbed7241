"""`edgectl keys identity|seal|unseal`: a ring travels to a gateway sealed to its own key."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from keys import Keyring, pack_bundle
from keys.cli import add_subcommands
from tests.keys.conftest import make_prepared


def _cli(ring_path: Path, root: Path):
    parser = argparse.ArgumentParser(prog="edgectl")
    add_subcommands(parser.add_subparsers(dest="command", required=True),
                    lambda args: (ring_path, lambda: Keyring.load_file(ring_path), root))

    def run(*argv: str) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)
    return run


@pytest.fixture
def fleet(tmp_path: Path):
    """A key host (KMS side) and one gateway, each with its own config paths."""
    host = _cli(tmp_path / "host" / "ring.json", tmp_path / "host" / "bundles")
    gw_ring, gw_root = tmp_path / "gw" / "ring.json", tmp_path / "gw" / "bundles"
    gateway = _cli(gw_ring, gw_root)
    (tmp_path / "host").mkdir()
    assert host("keys", "generate") == 0
    assert gateway("keys", "identity", "--out", tmp_path / "gw" / "id.pem") == 0
    return host, gateway, tmp_path


def test_sealed_ring_opens_only_on_its_gateway_and_installs_0600(fleet, capsys):
    host, gateway, tmp = fleet
    identity = tmp / "gw" / "id.pem"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert host("keys", "seal", "--recipient", f"{identity}.pub", "--out", tmp / "s") == 0
    host_ring = Keyring.load_file(tmp / "host" / "ring.json")
    sealed = (tmp / "s").read_bytes()
    assert all(host_ring.key(k) not in sealed for k in host_ring.ids())

    assert gateway("keys", "unseal", tmp / "s", "--identity", identity) == 0
    gw_ring_path = tmp / "gw" / "ring.json"
    assert stat.S_IMODE(gw_ring_path.stat().st_mode) == 0o600
    assert Keyring.load_file(gw_ring_path).to_json() == host_ring.to_json()

    other = _cli(tmp / "other" / "ring.json", tmp / "other" / "bundles")
    assert other("keys", "identity", "--out", tmp / "other" / "id.pem") == 0
    assert other("keys", "unseal", tmp / "s", "--identity", tmp / "other" / "id.pem") == 1
    (tmp / "t").write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert gateway("keys", "unseal", tmp / "t", "--identity", identity) == 1
    err = capsys.readouterr().err
    assert "sealed for another gateway, or altered" in err
    assert not (tmp / "other" / "ring.json").exists()


def test_unseal_refuses_a_ring_that_lacks_a_key_local_bundles_need(fleet, capsys):
    host, gateway, tmp = fleet
    identity = tmp / "gw" / "id.pem"
    host_ring_path = tmp / "host" / "ring.json"
    old = Keyring.load_file(host_ring_path)
    # The gateway has the old ring and a bundle wrapped under its key...
    old.save(tmp / "gw" / "ring.json")
    pack_bundle(make_prepared(tmp, {"m.bin": os.urandom(300)}), tmp / "gw" / "bundles", old)
    # ...while the key host rotated and retired the old key before the gateway caught up.
    assert host("keys", "rotate") == 0
    assert host("keys", "retire", old.current_id) == 0
    assert host("keys", "seal", "--recipient", f"{identity}.pub", "--out", tmp / "s") == 0
    assert gateway("keys", "unseal", tmp / "s", "--identity", identity) == 1
    assert f"lacks {old.current_id}" in capsys.readouterr().err
    assert Keyring.load_file(tmp / "gw" / "ring.json").to_json() == old.to_json()


def test_fleet_rotation_ring_first_then_rewrap_then_retire(fleet):
    host, gateway, tmp = fleet
    identity, gw_ring = tmp / "gw" / "id.pem", tmp / "gw" / "ring.json"
    ship = ("keys", "seal", "--recipient", f"{identity}.pub", "--out", tmp / "s")
    old = Keyring.load_file(tmp / "host" / "ring.json")
    assert host(*ship) == 0 and gateway("keys", "unseal", tmp / "s", "--identity", identity) == 0
    pack_bundle(make_prepared(tmp, {"m.bin": os.urandom(300)}), tmp / "gw" / "bundles", old)
    assert host("keys", "rotate") == 0  # at the KMS; the gateway was offline meanwhile
    assert host(*ship) == 0 and gateway("keys", "unseal", tmp / "s", "--identity", identity) == 0
    assert gateway("keys", "rewrap") == 0
    assert host("keys", "retire", old.current_id) == 0  # every gateway acknowledged
    assert host(*ship) == 0 and gateway("keys", "unseal", tmp / "s", "--identity", identity) == 0
    assert Keyring.load_file(gw_ring).ids() == [Keyring.load_file(gw_ring).current_id]
    assert gateway("bundle", "verify") == 0
