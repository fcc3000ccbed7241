"""Key delivery on a gateway: `edgectl keys install` makes the host-bound credential, a stale
copy never wins (sources that disagree are refused, naming both), rotation checks every bundle
before it changes anything and refreshes the credential in the same step, and a fleet gateway
never makes keys of its own.

The credential step runs the real `systemd-creds --with-key=host` where it works here (root,
no running systemd needed), and a stand-in tool everywhere: the logic is the same.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from keys import Keyring, KeyringError, pack_bundle
from keys import cli as keys_cli
from keys.delivery import SystemdCreds, digest, stamp_path
from keys.rotation import file_key_ids
from tests.keys.conftest import CHUNK, make_prepared

ROOT = Path(__file__).resolve().parents[2]


class FakeCreds:
    """Stands in for systemd-creds: the 'encrypted' file is not the plaintext JSON."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def encrypt(self, name: str, plaintext: bytes, out: Path) -> None:
        if self.fail:
            raise KeyringError("systemd-creds encrypt failed (exit 1): no host key")
        out.write_bytes(b"FAKECRED" + name.encode() + b"\0" + base64.b64encode(plaintext[::-1]))

    def decrypt(self, name: str, path: Path) -> bytes:
        head, body = path.read_bytes().split(b"\0", 1)
        assert head == b"FAKECRED" + name.encode(), "credential opened under another name"
        return base64.b64decode(body)[::-1]


def _systemd_creds_usable() -> str | None:
    """None when `systemd-creds --with-key=host` round-trips here (with the host key named by
    $SYSTEMD_CREDENTIAL_SECRET), else why not."""
    if shutil.which("systemd-creds") is None:
        return "systemd-creds is not installed"
    if os.geteuid() != 0:
        return "systemd-creds --with-key=host needs root (the host key is root's)"
    with tempfile.TemporaryDirectory() as tmp:
        tool, out = SystemdCreds(with_key="host"), Path(tmp) / "probe.cred"
        try:
            tool.encrypt("probe", b"{}", out)
            if tool.decrypt("probe", out) != b"{}":
                return "systemd-creds round trip changed the data"
        except KeyringError as exc:
            return f"systemd-creds does not work here: {exc}"
    return None


@pytest.fixture(params=["fake", "systemd-creds"])
def tool(request, monkeypatch, tmp_path):
    # The host key systemd-creds binds credentials to: a private one per test
    # (SYSTEMD_CREDENTIAL_SECRET), so the tests never create or use the machine's own
    # /var/lib/systemd/credential.secret.
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(tmp_path / "host-a.secret"))
    if request.param == "systemd-creds":
        why = _systemd_creds_usable()
        if why:
            pytest.skip(why)
        made = SystemdCreds(with_key="host")
    else:
        made = FakeCreds()
    monkeypatch.setattr(keys_cli, "credential_tool", lambda with_key: made)
    return made


def _gateway(tmp_path: Path, mode: str = "single", signer: Path | None = None):
    """edgectl's keys commands for one gateway config: key file, credential, bundles."""
    etc = tmp_path / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    ring_path, root = etc / "keyring.json", tmp_path / "bundles"
    settings = argparse.Namespace(mode=mode, credential="edge-keyring",
                                  credential_file=etc / "keyring.cred")
    parser = argparse.ArgumentParser(prog="edgectl")
    keys_cli.add_subcommands(
        parser.add_subparsers(dest="command", required=True),
        lambda args: (ring_path, lambda: Keyring.load_file(ring_path), root, signer, settings))

    def run(*argv: object) -> int:
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)
    return run, ring_path, settings.credential_file, root


def _worker_ring(tool, cred: Path, ring_path: Path, tmp_path: Path) -> Keyring:
    """What a worker loads: systemd decrypts the credential into $CREDENTIALS_DIRECTORY."""
    creds_dir = tmp_path / "run-credentials"
    creds_dir.mkdir(exist_ok=True)
    (creds_dir / "edge-keyring").write_bytes(tool.decrypt("edge-keyring", cred))
    return Keyring.from_sources(creds_dir, ring_path, None)


def _pack_two(tmp_path: Path, ring_path: Path, root: Path) -> None:
    ring = Keyring.load_file(ring_path)
    for name in ("a", "b"):
        src = make_prepared(tmp_path, {"m.xml": b"<net/>", "m.bin": os.urandom(CHUNK * 3)},
                            name=name)
        pack_bundle(src, root, ring, chunk_size=CHUNK)


def _snapshot(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


def test_install_makes_a_credential_the_worker_loads(tool, tmp_path: Path, capsys) -> None:
    run, ring_path, cred, _ = _gateway(tmp_path)
    assert run("keys", "generate") == 0
    assert run("keys", "install", "--with-key", "host") == 0
    ring = Keyring.load_file(ring_path)
    raw = cred.read_bytes()
    assert ring.to_json().encode() not in raw and b'"keys"' not in raw
    assert oct(cred.stat().st_mode & 0o777) == "0o600"
    assert _worker_ring(tool, cred, ring_path, tmp_path).to_json() == ring.to_json()
    assert digest(ring) in capsys.readouterr().out
    assert not [p for p in cred.parent.iterdir() if ".tmp-" in p.name]


def test_a_credential_made_on_another_host_does_not_open_here(tool, tmp_path, monkeypatch):
    # Why `keys install` runs on the gateway: a credential is bound to the host key (or TPM)
    # of the machine that encrypted it.
    if isinstance(tool, FakeCreds):
        pytest.skip("host binding is systemd-creds' own: nothing to show with the stand-in")
    run, ring_path, cred, _ = _gateway(tmp_path)
    run("keys", "generate")
    assert run("keys", "install", "--with-key", "host") == 0  # on the build host (key A)
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(tmp_path / "host-b.secret"))
    with pytest.raises(KeyringError, match="decrypt failed"):
        tool.decrypt("edge-keyring", cred)  # the gateway (key B) cannot open it


def test_stale_credential_after_a_new_ring_is_refused_naming_both(tool, tmp_path: Path) -> None:
    run, ring_path, cred, _ = _gateway(tmp_path)
    run("keys", "generate")
    run("keys", "install", "--with-key", "host")
    old = Keyring.load_file(ring_path)
    fresh = Keyring.generate()  # e.g. a newly unsealed fleet ring, credential not remade
    from keys.delivery import save_key_file
    save_key_file(fresh, ring_path)
    with pytest.raises(KeyringError) as err:
        _worker_ring(tool, cred, ring_path, tmp_path)
    msg = str(err.value)
    assert "disagree" in msg and "keys install" in msg
    assert old.current_id in msg and fresh.current_id in msg
    assert run("keys", "install", "--with-key", "host") == 0
    assert _worker_ring(tool, cred, ring_path, tmp_path).current_id == fresh.current_id


_AS_WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from keys import Keyring, KeyringError
try:
    ring = Keyring.from_sources(Path(sys.argv[2]), Path(sys.argv[3]), None)
    print("loaded", ring.current_id)
except KeyringError as exc:
    print("refused", exc)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a check as another user")
def test_worker_that_cannot_read_the_key_file_checks_its_stamp(tmp_path: Path) -> None:
    # Under systemd the worker's user may not read root's 0600 key file: it compares the
    # credential with the public stamp written beside the file instead.
    base = Path(tempfile.mkdtemp(prefix="edge-keys-"))
    try:
        os.chmod(base, 0o755)
        etc, creds = base / "etc", base / "creds"
        etc.mkdir(mode=0o755)
        creds.mkdir(mode=0o755)
        ring_path = etc / "keyring.json"
        from keys.delivery import save_key_file
        ring = Keyring.generate()
        save_key_file(ring, ring_path)
        assert oct(stamp_path(ring_path).stat().st_mode & 0o777) == "0o644"
        assert ring.key(ring.current_id).hex() not in stamp_path(ring_path).read_text()
        (creds / "edge-keyring").write_text(ring.to_json())
        os.chmod(creds / "edge-keyring", 0o644)  # systemd would chown it to the service user

        def as_nobody() -> str:
            done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   sys.executable, "-c", _AS_WORKER, str(ROOT), str(creds),
                                   str(ring_path)], capture_output=True, text=True, timeout=60,
                                  cwd="/")
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert as_nobody() == f"loaded {ring.current_id}"
        fresh = Keyring.generate()
        save_key_file(fresh, ring_path)
        out = as_nobody()
        assert out.startswith("refused keyring sources disagree"), out
        assert ring.current_id in out and fresh.current_id in out and "stamp" in out
        stamp_path(ring_path).unlink()
        assert "no stamp" in as_nobody()
        save_key_file(fresh, ring_path)
        os.chmod(etc, 0o700)  # the worker may not even look into the folder: still refused
        out = as_nobody()
        assert out.startswith("refused") and "stamp" in out, out
    finally:
        shutil.rmtree(base)


def test_install_of_a_sealed_fleet_ring_replaces_key_file_and_credential(
        tool, tmp_path: Path) -> None:
    host, host_ring, _, _ = _gateway(tmp_path / "kms")
    assert host("keys", "generate") == 0
    signer = tmp_path / "kms" / "signer.key"
    assert host("keys", "signer", "generate", "--out", signer) == 0
    run, ring_path, cred, _ = _gateway(tmp_path / "gw", mode="fleet",
                                       signer=Path(f"{signer}.pub"))
    ident = tmp_path / "gw" / "etc" / "id.pem"
    assert run("keys", "identity", "--out", ident) == 0
    sealed = tmp_path / "gw.sealed"
    assert host("keys", "seal", "--recipient", f"{ident}.pub", "--sign-key", signer,
                "--out", sealed) == 0
    assert run("keys", "install", sealed, "--identity", ident, "--with-key", "host") == 0
    fleet_ring = Keyring.load_file(host_ring)
    assert Keyring.load_file(ring_path).to_json() == fleet_ring.to_json()
    assert _worker_ring(tool, cred, ring_path, tmp_path).to_json() == fleet_ring.to_json()


def test_failed_credential_step_changes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    run, ring_path, cred, _ = _gateway(tmp_path)
    monkeypatch.setattr(keys_cli, "credential_tool", lambda with_key: FakeCreds())
    run("keys", "generate")
    run("keys", "install")
    _pack_two(tmp_path, ring_path, tmp_path / "bundles")
    before = _snapshot(ring_path.parent, tmp_path / "bundles")
    monkeypatch.setattr(keys_cli, "credential_tool", lambda with_key: FakeCreds(fail=True))
    assert run("keys", "install") == 1
    assert run("keys", "rotate") == 1
    assert "no host key" in capsys.readouterr().err
    assert _snapshot(ring_path.parent, tmp_path / "bundles") == before


def test_rotation_with_one_bad_bundle_changes_nothing(tool, tmp_path: Path, capsys) -> None:
    run, ring_path, cred, root = _gateway(tmp_path)
    run("keys", "generate")
    run("keys", "install", "--with-key", "host")
    _pack_two(tmp_path, ring_path, root)
    # One bundle packed under a key this gateway's ring never had.
    stranger = Keyring.generate()
    pack_bundle(make_prepared(tmp_path, {"m.xml": b"<net/>"}, name="z"), root, stranger,
                chunk_size=CHUNK)
    before = _snapshot(ring_path.parent, root)
    assert run("keys", "rotate", "--with-key", "host") == 1
    err = capsys.readouterr().err
    assert "nothing was changed" in err and "asr--z" in err and stranger.current_id in err
    assert _snapshot(ring_path.parent, root) == before
    assert run("keys", "rewrap") == 1  # the same check guards a fleet gateway's rewrap
    assert _snapshot(ring_path.parent, root) == before


def test_rotation_refreshes_the_credential_in_the_same_step(tool, tmp_path: Path) -> None:
    run, ring_path, cred, root = _gateway(tmp_path)
    run("keys", "generate")
    run("keys", "install", "--with-key", "host")
    _pack_two(tmp_path, ring_path, root)
    old = Keyring.load_file(ring_path).current_id
    assert run("keys", "rotate", "--with-key", "host") == 0
    ring = Keyring.load_file(ring_path)
    served = _worker_ring(tool, cred, ring_path, tmp_path)
    assert served.to_json() == ring.to_json()
    assert {k for p in root.rglob("*.enc") for k in file_key_ids(p)} == {ring.current_id}
    assert run("keys", "retire", old, "--with-key", "host") == 0  # the credential follows too
    served = _worker_ring(tool, cred, ring_path, tmp_path)
    assert served.ids() == [ring.current_id] == Keyring.load_file(ring_path).ids()


def test_fleet_gateway_never_makes_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    run, ring_path, cred, root = _gateway(tmp_path, mode="fleet")
    monkeypatch.setattr(keys_cli, "credential_tool", lambda with_key: FakeCreds())
    Keyring.generate().save(ring_path)
    _pack_two(tmp_path, ring_path, root)
    before = _snapshot(ring_path.parent, root)
    assert run("keys", "rotate") == 1
    assert "refusing to make a new key" in capsys.readouterr().err
    assert run("keys", "rotate", "--scheduled") == 0  # the timer: a no-op with a log line
    assert "nothing done" in capsys.readouterr().err
    assert _snapshot(ring_path.parent, root) == before


def test_timer_unit_runs_the_scheduled_rotation() -> None:
    unit = (ROOT / "systemd" / "edge-key-rotation.service").read_text()
    exec_start = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert len(exec_start) == 1 and "keys rotate --scheduled" in exec_start[0]
    # credentials are read at service start only: the workers are restarted, not reloaded
    post = [ln for ln in unit.splitlines() if ln.startswith("ExecStartPost=")]
    assert any("try-restart" in ln and "edge-worker@" in ln for ln in post), post
    assert not any("reload" in ln for ln in post), post
    # The credential is refreshed by the rotation itself, not by a separate step after it.
    assert "systemd-creds" not in "".join(ln for ln in unit.splitlines()
                                          if not ln.startswith("#"))


def test_edge_worker_refuses_to_start_on_a_stale_credential(tmp_path: Path) -> None:
    # The real entry point, as systemd starts it: $CREDENTIALS_DIRECTORY holds the credential
    # systemd decrypted; the key file beside the config is newer. Exit 2 (no restart), both named.
    from keys.delivery import save_key_file

    stale, fresh = Keyring.generate(), Keyring.generate()
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "edge-keyring").write_text(stale.to_json())
    save_key_file(fresh, tmp_path / "keyring.json")
    config = tmp_path / "edge.toml"
    config.write_text(f"""
bundle_dir = "{tmp_path / 'bundles'}"
[keyring]
file = "{tmp_path / 'keyring.json'}"
env = "EDGE_TEST_NO_KEYRING_ENV"
[redis]
url = "redis://127.0.0.1:1/0"
[tasks.tokenize]
devices = ["CPU"]
""")
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_KEYRING", "EDGE_CONFIG")}
    done = subprocess.run([sys.executable, "-m", "workers.worker", "--device", "CPU",
                           "--config", str(config)], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "CREDENTIALS_DIRECTORY": str(creds)}, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "keyring sources disagree" in done.stderr
    assert stale.current_id in done.stderr and fresh.current_id in done.stderr
