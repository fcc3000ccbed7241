"""Model load time: from an encrypted bundle (decrypt in memory + read_ir + compile) vs from the
plaintext IR files (read_model(path) + compile), same model, same device, medians.

    .venv/bin/python bench/bundle_load.py [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openvino as ov  # noqa: E402

import keys  # noqa: E402
from workers.api import read_ir  # noqa: E402

PREPARED = Path("~/.cache/edge-daemon/prepared").expanduser()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--model", default="whisper-tiny.en")
    args = parser.parse_args()
    folder = PREPARED / args.model
    irs = sorted(p.name for p in folder.glob("openvino_*_model.xml"))
    size = sum((folder / x.replace(".xml", ".bin")).stat().st_size for x in irs)
    with tempfile.TemporaryDirectory() as tmp:
        ring = keys.Keyring.generate()
        bundle = keys.Bundle.open(keys.pack_bundle(folder, Path(tmp), ring), ring)
        core = ov.Core()
        plain, sealed = [], []
        for _ in range(args.reps):  # alternate, so drift hits both alike
            t0 = time.perf_counter()
            for x in irs:
                core.compile_model(core.read_model(folder / x), "CPU")
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for x in irs:
                core.compile_model(read_ir(core, bundle, x), "CPU")
            sealed.append(time.perf_counter() - t0)
    p, s = statistics.median(plain), statistics.median(sealed)
    print(f"model {args.model}: {len(irs)} IRs, {size / 2**20:.1f} MiB of weights")
    print(f"plaintext IR files: {p * 1000:8.1f} ms (median of {args.reps})")
    print(f"encrypted bundle:   {s * 1000:8.1f} ms   ratio {s / p:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
