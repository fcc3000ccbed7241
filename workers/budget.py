"""The per-job memory budget: what a handler may allocate for one job's data, checked first.

Every decoder works out, from headers alone, the bytes a job would hold at its peak (decoded
samples or pixels, outputs, working buffers) and calls `check` before it decodes anything. The
budget is `[limits] job_memory` (`edge.constants.DEFAULT_JOB_MEMORY`), handed to each task's
`load` in `DeviceSettings.job_memory`; compiled models are not part of it.
"""

from __future__ import annotations

from edge.errors import PayloadTooLarge

MIB = 1 << 20


def mib(n: float) -> str:
    """Bytes as MiB for a message: whole MiB from 10 MiB up, one decimal below."""
    return f"{n / MIB:.0f}" if n >= 10 * MIB else f"{n / MIB:.1f}"


def check(cost: int, budget: int, what: str) -> None:
    """Refuse, as `payload_too_large` naming the budget, a job whose `what` needs `cost` bytes."""
    if cost > budget:
        raise PayloadTooLarge(f"{what} needs {mib(cost)} MiB of memory, over the per-job budget "
                              f"of {mib(budget)} MiB ([limits] job_memory)")
