"""Run inside the gateway container: publish N tokenize jobs over TLS as device sensor-1, then
count the answers per id. Progress and the result go to files under /run (read by the test).

    python burst.py N OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from edgectl.client import DeviceClient


def _outcome(body: dict) -> str:
    """"ok", or the error code and message."""
    if body.get("status") == "ok":
        return "ok"
    return f"{body.get('error', {}).get('code')}: {body.get('error', {}).get('message')}"


def main() -> int:
    count, out = int(sys.argv[1]), Path(sys.argv[2])
    password = Path("/srv/test/device-password").read_text().strip()
    # ~200 KB of text per job (tasks.tokenize.max_bytes is 256 KiB): tens of ms each, so a
    # stop lands while jobs are still queued
    texts = [f"sentence {i} " + "gateway tokens " * 60 for i in range(200)]
    ids = [uuid.uuid4().hex[:16] for _ in range(count)]
    with DeviceClient("127.0.0.1", 8883, device_id="sensor-1", username="sensor-1",
                      password=password, tls_ca="/etc/edge/ca.crt") as dev:
        for rid in ids:
            dev.publish_envelope("tokenize", {"id": rid, "text": texts,
                                              "params": {"model": "all-minilm-l6-v2"}})
        (out / "published").write_text(str(count))
        answers: dict[str, list[str]] = {}
        for n, rid in enumerate(ids):
            answers[rid] = [_outcome(dev.wait(rid, timeout=300).body)]
            (out / "answered").write_text(str(n + 1))
        time.sleep(2)  # a duplicate answer would arrive now
        for rid in ids:
            answers[rid] += [_outcome(a) for a in dev.answers_so_far(rid)]
    (out / "burst.json").write_text(json.dumps(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
