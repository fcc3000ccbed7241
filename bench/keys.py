"""Bundle decrypt throughput and rotation cost; prints numbers and ratios.

    .venv/bin/python bench/keys.py [--mib 256] [--rounds 5]

Decrypt: `Bundle.read` of one file into a fresh buffer (what a worker does at start-up),
against the two ways to drive AES-GCM in `cryptography` into a warm buffer, and against the
floor of faulting in a fresh buffer of that size. Rotation: `rewrap_bundle` over 10 MB and
1 GB of bundles; header-only rewrites should make the two about equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import tempfile
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from keys import Bundle, Keyring, pack_bundle, rewrap_bundle  # noqa: E402

MiB = 1 << 20


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prepared(root: Path, name: str, total: int, files: int) -> Path:
    src = root / f"src-{name}"
    src.mkdir()
    (src / "bundle.json").write_text(json.dumps({"name": name, "task": "bench",
                                                 "version": "1", "settings": {}}))
    block = os.urandom(MiB)
    for i in range(files):
        with open(src / f"part{i}.bin", "wb") as f:
            left = total // files
            while left > 0:
                f.write(block[:min(left, MiB)])
                left -= MiB
    return src


def bench_decrypt(root: Path, ring: Keyring, mib: int, rounds: int) -> None:
    path = pack_bundle(prepared(root, "decrypt", mib * MiB, 1), root / "out", ring)
    bundle = Bundle.open(path, ring)
    size = mib * MiB
    read = median_time(lambda: bundle.read("part0.bin"), rounds)

    def into_tensor() -> None:  # what a worker does with model weights (workers.api.read_ir)
        import openvino as ov

        bundle.read_into("part0.bin", lambda n: ov.Tensor(ov.Type.u8, ov.Shape([n])).data)

    key, chunk, n = os.urandom(32), MiB, mib
    aead, alg = AESGCM(key), algorithms.AES(key)
    cts = [aead.encrypt(i.to_bytes(12, "big"), b"\0" * chunk, b"aad") for i in range(n)]
    warm = bytearray(size + 15)
    view = memoryview(warm)

    def aesgcm_copy() -> None:
        for i, ct in enumerate(cts):
            view[i * chunk:(i + 1) * chunk] = aead.decrypt(i.to_bytes(12, "big"), ct, b"aad")

    def update_into() -> None:
        for i, ct in enumerate(cts):
            m = memoryview(ct)
            dec = Cipher(alg, modes.GCM(i.to_bytes(12, "big"), bytes(m[chunk:]))).decryptor()
            dec.authenticate_additional_data(b"aad")
            dec.update_into(m[:chunk], view[i * chunk:(i + 1) * chunk + 15])
            dec.finalize()

    def fresh_buffer() -> None:
        buf = bytearray(size)
        memoryview(buf)[::4096] = b"\1" * len(range(0, size, 4096))

    rows = [("Bundle.read (file -> fresh buffer)", read),
            ("read_into an OpenVINO tensor", median_time(into_tensor, rounds)),
            ("AESGCM.decrypt + copy, warm buffer", median_time(aesgcm_copy, rounds)),
            ("Cipher GCM update_into, warm buffer", median_time(update_into, rounds)),
            ("fault in a fresh buffer (floor)", median_time(fresh_buffer, rounds))]
    print(f"decrypt {mib} MiB, median of {rounds}:")
    for label, t in rows:
        print(f"  {label:40s} {size / t / 1e9:6.2f} GB/s  ({t * 1e3:7.1f} ms)")
    print(f"  update_into vs AESGCM.decrypt: {rows[2][1] / rows[3][1]:.2f}x")


def bench_rotation(root: Path, ring: Keyring, rounds: int) -> None:
    sizes = {"10MB": 10 * 10**6, "1GB": 10**9}
    times = {}
    for label, total in sizes.items():
        out = root / f"rot-{label}"
        for b in range(4):  # 4 bundles x 5 files = 20 files either way
            pack_bundle(prepared(root, f"{label}-{b}", total // 4, 5), out, ring)

        def rotate() -> None:
            ring.rotate()
            for bundle in sorted(out.iterdir()):
                rewrap_bundle(bundle, ring)
        times[label] = median_time(rotate, rounds)
        print(f"rotation, {label} in 20 files: {times[label] * 1e3:.1f} ms (median of {rounds})")
    print(f"  1GB / 10MB time ratio: {times['1GB'] / times['10MB']:.2f} (flat = ~1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp)")
    args = parser.parse_args()
    ring = Keyring.generate()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench_decrypt(Path(tmp), ring, args.mib, args.rounds)
        bench_rotation(Path(tmp), ring, args.rounds)


if __name__ == "__main__":
    main()
