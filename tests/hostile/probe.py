"""What the hostile tests measure: a daemon process's memory, and every answer per request id."""

from __future__ import annotations

import time
from pathlib import Path

from edgectl.client import DeviceClient

MiB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> int:
    """Start measuring a peak afresh (VmHWM := VmRSS); returns the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory(pid)["VmRSS"]


def answers(dev: DeviceClient, ids, timeout: float = 60.0, settle: float = 2.0
            ) -> dict[str, list[dict]]:
    """Every answer body each id got: waits for one per id, then `settle` s more for
    duplicates. Progress notes are not answers."""
    got: dict[str, list[dict]] = {rid: [] for rid in ids}
    deadline = time.monotonic() + timeout

    def drain() -> None:
        for rid in ids:
            got[rid].extend(dev.answers_so_far(rid))

    while time.monotonic() < deadline and not all(got.values()):
        drain()
        time.sleep(0.02)
    time.sleep(settle)
    drain()
    return got


def code(body: dict) -> str:
    """ok, or the error code of an answer."""
    return "ok" if body.get("status") == "ok" else body["error"]["code"]
