"""A real `edge-worker` whose job entry misbehaves on cue (test code only).

`python -m tests.faults.fault_worker --device CPU` runs `workers.worker.main` after patching
the request builder: a job whose text is `__stop__` stops its own process (SIGSTOP) while
started, `__segv__` dies of SIGSEGV, `__sleep:N__` sleeps N seconds inside the job.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from workers import jobs, worker

_to_request = jobs.to_request


def _misbehaving(job, blob):
    request = _to_request(job, blob)
    text = request.text if isinstance(request.text, str) else ""
    if text == "__stop__":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif text == "__segv__":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif text.startswith("__sleep:"):
        time.sleep(float(text[len("__sleep:"):-2]))
    return request


jobs.to_request = _misbehaving

if __name__ == "__main__":
    sys.exit(worker.main(sys.argv[1:]))
