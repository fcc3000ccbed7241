"""The `keys` and `bundle` command groups, driven through argparse as edgectl does."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from keys import Keyring
from keys.cli import add_subcommands
from tests.keys.conftest import make_prepared


@pytest.fixture
def cli(tmp_path: Path):
    ring_path, root = tmp_path / "ring.json", tmp_path / "bundles"

    def resolve(args: argparse.Namespace):
        return ring_path, lambda: Keyring.load_file(ring_path), root, None

    parser = argparse.ArgumentParser(prog="edgectl")
    add_subcommands(parser.add_subparsers(dest="command", required=True), resolve)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)
    return run, ring_path, root


def test_operator_workflow(cli, tmp_path: Path, capsys) -> None:
    run, ring_path, root = cli
    assert run("keys", "generate") == 0
    assert run("keys", "generate") == 1  # refuses to overwrite
    first = Keyring.load_file(ring_path).current_id
    src = make_prepared(tmp_path, {"m.xml": b"<net/>", "m.bin": os.urandom(5000)})
    assert run("bundle", "pack", str(src)) == 0
    assert run("bundle", "verify") == 0
    assert run("keys", "rotate") == 0
    assert run("keys", "retire", first) == 0
    assert run("bundle", "verify", str(root / "asr--tiny" / "1")) == 0
    assert run("bundle", "ls") == 0
    assert run("keys", "ls") == 0
    out = capsys.readouterr()
    ring = Keyring.load_file(ring_path)
    assert ring.ids() == [ring.current_id] != [first]
    for kid in ring.ids():
        assert ring.key(kid).hex() not in out.out + out.err
    assert "asr--tiny" in out.out and "2 files" in out.out


def test_retire_refused_and_lists_needing_bundles(cli, tmp_path: Path, capsys) -> None:
    run, ring_path, root = cli
    run("keys", "generate")
    old = Keyring.load_file(ring_path).current_id
    run("bundle", "pack", str(make_prepared(tmp_path, {"m.xml": b"<net/>"})))
    ring = Keyring.load_file(ring_path)
    ring.rotate()
    ring.save(ring_path)  # rotated without rewrapping
    assert run("keys", "retire", old) == 1
    assert "asr--tiny" in capsys.readouterr().err
    assert old in Keyring.load_file(ring_path).ids()


def test_verify_failure_exits_1_with_one_line(cli, tmp_path: Path, capsys) -> None:
    run, ring_path, root = cli
    run("keys", "generate")
    run("bundle", "pack", str(make_prepared(tmp_path, {"m.bin": os.urandom(300)})))
    enc = root / "asr--tiny" / "1" / "m.bin.enc"
    raw = bytearray(enc.read_bytes())
    raw[-1] ^= 1
    enc.write_bytes(bytes(raw))
    assert run("bundle", "verify", str(root / "asr--tiny" / "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.bin.enc" in err[0]
