"""An attacker who knows a gateway's public identity tries to install a keyring of their own.

The gateway's public key is no secret (it travels to the key host, it may sit in a status
topic), so anyone can seal a ring to it. The gateway pins the fleet's signing key
(`[keyring] signer`); the real `edgectl keys unseal` must refuse every ring that key did not
sign, or that changed after signing, and leave the installed key file exactly as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.localdaemon import ROOT
from keys import Keyring, sealed
from keys.sealed import load_public_key

RECIPIENT_AT = len(sealed.MAGIC) + 8  # magic, created u64, then the recipient's public key


def _edgectl(config: Path, *argv: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGE_KEYRING", "CREDENTIALS_DIRECTORY", "EDGE_CONFIG")}
    return subprocess.run([sys.executable, "-m", "edgectl.cli", "--config", str(config),
                           *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr
    return done


def _config(path: Path, ring: str, signer: str | None = None) -> Path:
    pin = f'signer = "{signer}"\n' if signer else ""
    path.write_text(f'node = "{path.stem}"\nbundle_dir = "bundles-{path.stem}"\n\n'
                    f'[keyring]\nfile = "{ring}"\nenv = ""\n{pin}')
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> dict[str, Path]:
    """A key host with the fleet signing key, two gateways pinning it, and an attacker."""
    d = tmp_path_factory.mktemp("fleet")
    host = _config(d / "host.toml", "host-ring.json")
    gw = _config(d / "gw.toml", "gw-ring.json", "fleet-signer.pub")
    gw2 = _config(d / "gw2.toml", "gw2-ring.json", "fleet-signer.pub")
    _config(d / "gw-nopin.toml", "gw-ring.json")  # the same gateway, before pinning
    attacker = _config(d / "attacker.toml", "attacker-ring.json")
    _ok(_edgectl(host, "keys", "generate"))
    signed = _ok(_edgectl(host, "keys", "signer", "generate", "--out", d / "fleet-signer.key"))
    assert "BEGIN PUBLIC KEY" in signed.stdout
    (d / "fleet-signer.pub").write_bytes((d / "fleet-signer.key.pub").read_bytes())  # pinned
    for cfg, ident in ((gw, "gw.id"), (gw2, "gw2.id")):
        _ok(_edgectl(cfg, "keys", "identity", "--out", d / ident))
    # The legitimate delivery works: sealed and signed at the key host, installed on gw.
    _ok(_edgectl(host, "keys", "seal", "--recipient", d / "gw.id.pub", "--sign-key",
                 d / "fleet-signer.key", "--out", d / "fleet-for-gw.sealed"))
    installed = _ok(_edgectl(gw, "keys", "unseal", d / "fleet-for-gw.sealed", "--identity",
                             d / "gw.id"))
    assert "verified against the pinned signer" in installed.stdout
    _ok(_edgectl(host, "keys", "seal", "--recipient", d / "gw2.id.pub", "--sign-key",
                 d / "fleet-signer.key", "--out", d / "fleet-for-gw2.sealed"))
    # The attacker: their own ring and signing key, and the gateway's public identity.
    _ok(_edgectl(attacker, "keys", "generate"))
    _ok(_edgectl(attacker, "keys", "signer", "generate", "--out", d / "attacker-signer.key"))
    _ok(_edgectl(attacker, "keys", "seal", "--recipient", d / "gw.id.pub", "--sign-key",
                 d / "attacker-signer.key", "--out", d / "attacker-signed.sealed"))
    return {"dir": d, "gw": gw, "ring": d / "gw-ring.json"}


def _forge(d: Path, how: str) -> Path:
    """The attacker's ring for gateway `gw`, made the way `how` says."""
    out = d / f"forged-{how}.sealed"
    gw_pub = load_public_key(d / "gw.id.pub")
    if how == "unsigned":  # the pre-signing format: sealed to gw, no signature at all
        out.write_bytes(sealed.seal_unsigned(Keyring.generate().to_json().encode(), gw_pub))
    elif how == "own-signing-key":
        out.write_bytes((d / "attacker-signed.sealed").read_bytes())
    elif how == "fleet-ring-one-byte-changed":
        blob = bytearray((d / "fleet-for-gw.sealed").read_bytes())
        blob[len(blob) // 2] ^= 0x01
        out.write_bytes(bytes(blob))
    elif how == "fleet-ring-for-another-gateway":
        out.write_bytes((d / "fleet-for-gw2.sealed").read_bytes())
    elif how == "fleet-ring-readdressed":  # gw2's ring, recipient field rewritten to gw's
        blob = (d / "fleet-for-gw2.sealed").read_bytes()
        raw = gw_pub.public_bytes_raw()
        out.write_bytes(blob[:RECIPIENT_AT] + raw + blob[RECIPIENT_AT + 32:])
    elif how == "oversized":
        out.write_bytes(sealed.MAGIC + os.urandom(sealed.MAX_SEALED + 1))
    else:
        raise AssertionError(how)
    return out


ATTACKS = [
    # (how the ring is forged, extra unseal flags, config, what the refusal says)
    ("unsigned", (), "gw", "unsigned (format 1)"),
    ("own-signing-key", (), "gw", "which this gateway does not pin"),
    ("own-signing-key", ("--allow-unsigned",), "gw", "which this gateway does not pin"),
    ("fleet-ring-one-byte-changed", (), "gw", "does not verify (altered after signing)"),
    ("fleet-ring-one-byte-changed", ("--allow-unsigned",), "gw", "does not verify"),
    ("fleet-ring-for-another-gateway", (), "gw", "sealed for another gateway"),
    ("fleet-ring-readdressed", (), "gw", "does not verify"),
    ("oversized", (), "gw", f"over the {sealed.MAX_SEALED}-byte limit"),
    ("own-signing-key", (), "gw-nopin", "no fleet signer is pinned"),
    ("unsigned", (), "gw-nopin", "no fleet signer is pinned"),
]


@pytest.mark.parametrize("how, flags, config, refusal", ATTACKS,
                         ids=[f"{a[0]}{''.join(a[1])}@{a[2]}" for a in ATTACKS])
def test_attacker_ring_is_refused_and_the_installed_ring_is_untouched(
        fleet, how: str, flags: tuple[str, ...], config: str, refusal: str) -> None:
    d, ring = fleet["dir"], fleet["ring"]
    before_bytes, before_stat = ring.read_bytes(), ring.stat()
    before_listing = sorted(p.name for p in d.iterdir())
    forged = _forge(d, how)

    done = _edgectl(d / f"{config}.toml", "keys", "unseal", forged, "--identity", d / "gw.id",
                    *flags)

    assert done.returncode == 1, (done.stdout, done.stderr)
    assert refusal in done.stderr
    assert done.stderr.startswith(f"error: {forged}: refused: ")
    assert "Traceback" not in done.stderr and "wrote" not in done.stdout
    assert ring.read_bytes() == before_bytes
    after = ring.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before_stat.st_ino, before_stat.st_mtime_ns)
    assert sorted(p.name for p in d.iterdir()) == sorted(set(before_listing) | {forged.name})


def test_refusal_without_a_pin_tells_the_operator_how_to_pin(fleet) -> None:
    d = fleet["dir"]
    done = _edgectl(d / "gw-nopin.toml", "keys", "unseal", d / "fleet-for-gw.sealed",
                    "--identity", d / "gw.id")
    assert done.returncode == 1
    assert "[keyring]" in done.stderr and "signer = " in done.stderr
    assert "--allow-unsigned (development only)" in done.stderr
