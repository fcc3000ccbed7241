"""`edgectl keys identity|signer|seal|unseal`: a ring travels to a gateway sealed to its own
key and signed by the fleet signing key the gateway pins."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from keys import Keyring, pack_bundle
from keys.cli import add_subcommands
from tests.keys.conftest import make_prepared


def _cli(ring_path: Path, root: Path, signer: Path | None = None):
    parser = argparse.ArgumentParser(prog="edgectl")
    add_subcommands(parser.add_subparsers(dest="command", required=True),
                    lambda args: (ring_path, lambda: Keyring.load_file(ring_path), root, signer))

    def run(*argv: str) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)
    return run


@pytest.fixture
def fleet(tmp_path: Path):
    """A key host (KMS side, holding the fleet signing key) and one gateway pinning it."""
    host = _cli(tmp_path / "host" / "ring.json", tmp_path / "host" / "bundles")
    gw_ring, gw_root = tmp_path / "gw" / "ring.json", tmp_path / "gw" / "bundles"
    gateway = _cli(gw_ring, gw_root, tmp_path / "host" / "signer.key.pub")
    (tmp_path / "host").mkdir()
    assert host("keys", "generate") == 0
    assert host("keys", "signer", "generate", "--out", tmp_path / "host" / "signer.key") == 0
    assert gateway("keys", "identity", "--out", tmp_path / "gw" / "id.pem") == 0
    return host, gateway, tmp_path


def test_sealed_ring_opens_only_on_its_gateway_and_installs_0600(fleet, capsys):
    host, gateway, tmp = fleet
    identity = tmp / "gw" / "id.pem"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert host("keys", "seal", "--recipient", f"{identity}.pub", "--sign-key",
                tmp / "host" / "signer.key", "--out", tmp / "s") == 0
    host_ring = Keyring.load_file(tmp / "host" / "ring.json")
    sealed = (tmp / "s").read_bytes()
    assert all(host_ring.key(k) not in sealed for k in host_ring.ids())

    assert gateway("keys", "unseal", tmp / "s", "--identity", identity) == 0
    gw_ring_path = tmp / "gw" / "ring.json"
    assert stat.S_IMODE(gw_ring_path.stat().st_mode) == 0o600
    assert Keyring.load_file(gw_ring_path).to_json() == host_ring.to_json()

    other = _cli(tmp / "other" / "ring.json", tmp / "other" / "bundles",
                 tmp / "host" / "signer.key.pub")
    assert other("keys", "identity", "--out", tmp / "other" / "id.pem") == 0
    capsys.readouterr()
    assert other("keys", "unseal", tmp / "s", "--identity", tmp / "other" / "id.pem") == 1
    assert "sealed for another gateway" in capsys.readouterr().err
    (tmp / "t").write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert gateway("keys", "unseal", tmp / "t", "--identity", identity) == 1
    assert "does not verify (altered after signing)" in capsys.readouterr().err
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
    assert host("keys", "seal", "--recipient", f"{identity}.pub", "--sign-key",
                tmp / "host" / "signer.key", "--out", tmp / "s") == 0
    assert gateway("keys", "unseal", tmp / "s", "--identity", identity) == 1
    assert f"lacks {old.current_id}" in capsys.readouterr().err
    assert Keyring.load_file(tmp / "gw" / "ring.json").to_json() == old.to_json()


def test_fleet_rotation_ring_first_then_rewrap_then_retire(fleet):
    host, gateway, tmp = fleet
    identity, gw_ring = tmp / "gw" / "id.pem", tmp / "gw" / "ring.json"
    ship = ("keys", "seal", "--recipient", f"{identity}.pub", "--sign-key",
            tmp / "host" / "signer.key", "--out", tmp / "s")
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


def test_signer_generate_writes_a_private_key_and_prints_the_public_key_to_pin(fleet, capsys):
    host, _, tmp = fleet
    key = tmp / "host" / "signer2.key"
    capsys.readouterr()
    assert host("keys", "signer", "generate", "--out", key) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp / "host" / "signer2.key.pub").read_text() in out
    assert "PRIVATE" not in out and "ed25519:" in out
    assert host("keys", "signer", "generate", "--out", key) == 1  # never overwritten


def test_seal_refuses_a_signing_key_others_may_read(fleet, capsys):
    host, _, tmp = fleet
    os.chmod(tmp / "host" / "signer.key", 0o640)
    assert host("keys", "seal", "--recipient", tmp / "gw" / "id.pem.pub", "--sign-key",
                tmp / "host" / "signer.key", "--out", tmp / "s") == 1
    assert "chmod 600" in capsys.readouterr().err
    assert not (tmp / "s").exists()


def test_allow_unsigned_installs_an_unpinned_ring_with_a_warning(fleet, capsys):
    host, _, tmp = fleet
    identity = tmp / "gw" / "id.pem"
    unpinned = _cli(tmp / "gw" / "ring.json", tmp / "gw" / "bundles")  # no [keyring] signer
    assert host("keys", "seal", "--recipient", f"{identity}.pub", "--sign-key",
                tmp / "host" / "signer.key", "--out", tmp / "s") == 0
    assert unpinned("keys", "unseal", tmp / "s", "--identity", identity) == 1
    assert "no fleet signer is pinned" in capsys.readouterr().err
    assert not (tmp / "gw" / "ring.json").exists()
    assert unpinned("keys", "unseal", tmp / "s", "--identity", identity,
                    "--allow-unsigned") == 0
    captured = capsys.readouterr()
    assert "warning: --allow-unsigned" in captured.err and "NOT verified" in captured.err
    assert Keyring.load_file(tmp / "gw" / "ring.json").to_json() == \
        Keyring.load_file(tmp / "host" / "ring.json").to_json()
