"""Legacy import: files encrypted by the real `openssl enc -aes-128-cbc -K -iv` command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from keys import Bundle, BundleError, Keyring, import_openssl

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
KEY = "00112233445566778899aabbccddeeff"
IV = "0f0e0d0c0b0a09080706050403020100"
pytestmark = pytest.mark.skipif(not Path(OPENSSL).exists(), reason="openssl CLI not installed")


def _openssl_encrypt(plain: bytes, out: Path, key: str = KEY, iv: str = IV) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([OPENSSL, "enc", "-aes-128-cbc", "-K", key, "-iv", iv, "-out", str(out)],
                   input=plain, check=True)


@pytest.fixture
def legacy(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    plain = {
        "model.xml": b"<?xml version=\"1.0\"?>\n<net name=\"legacy\" version=\"11\"/>\n",
        "model.bin": os.urandom(3 * (1 << 20) + 5),
        "block.bin": os.urandom(32),  # a multiple of 16: a whole padding block follows
        "extra/labels.txt": b"cat\ndog\n",
    }
    src = tmp_path / "legacy"
    for name, data in plain.items():
        if name.endswith((".xml", ".bin")):
            _openssl_encrypt(data, src / name)
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
    return src, plain


def test_openssl_files_import_into_a_bundle(legacy, tmp_path: Path) -> None:
    src, plain = legacy
    ring = Keyring.generate()
    path = import_openssl(src, tmp_path / "out", ring, KEY, IV, name="old-sr", task="superres")
    assert path.parent.name == "superres--old-sr"
    bundle = Bundle.open(path, ring)
    assert sorted(bundle.files) == sorted(plain)
    for name, data in plain.items():
        assert bundle.read(name) == data
    assert not any(p.suffix in (".xml", ".bin") for p in path.rglob("*"))


def test_wrong_key_is_refused_before_anything_is_written(legacy, tmp_path: Path) -> None:
    src, _ = legacy
    wrong = "ff" * 16
    with pytest.raises(BundleError, match="model.xml: does not decrypt to XML"):
        import_openssl(src, tmp_path / "out", Keyring.generate(), wrong, IV, "x", "superres")
    assert not (tmp_path / "out" / "superres--x").exists()


def test_wrong_key_without_xml_fails_on_padding(tmp_path: Path) -> None:
    src = tmp_path / "legacy"
    _openssl_encrypt(os.urandom(1000), src / "weights.bin")
    out = tmp_path / "out"
    # A random last block has valid PKCS#7 padding 1 time in ~256: try keys until one fails.
    for i in range(8):
        wrong = f"{i:02x}" * 16
        try:
            import_openssl(src, out, Keyring.generate(), wrong, IV, "x", "superres")
        except BundleError as exc:
            assert "weights.bin: bad padding" in str(exc)
            assert not list(out.glob(".*tmp*"))
            return
    pytest.fail("no wrong key was refused")


def test_malformed_key_hex_is_refused(legacy, tmp_path: Path) -> None:
    src, _ = legacy
    with pytest.raises(BundleError, match="key must be 16 bytes"):
        import_openssl(src, tmp_path / "out", Keyring.generate(), "abcd", IV, "x", "superres")
    with pytest.raises(BundleError, match="IV is not hex"):
        import_openssl(src, tmp_path / "out", Keyring.generate(), KEY, "zz" * 16, "x", "asr")
