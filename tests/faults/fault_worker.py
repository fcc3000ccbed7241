"""A real `edge-worker` whose job entry misbehaves on cue (test code only).

`python -m tests.faults.fault_worker --device CPU` runs `workers.worker.main` after patching
the request builder: a job whose text is `__stop__` stops its own process (SIGSTOP) while
started, `__segv__` dies of SIGSEGV, `__sleep:N__` sleeps N seconds inside the job.

With `--crash-after-beat` first, the worker loads its models, connects to Redis, tells the
agent it is alive (one heartbeat, as at every start) and then dies (exit 1) before it takes a
job: a worker that crashes at start-up, which systemd's `Restart=on-failure` starts again.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from workers import perform, worker

CRASH_AFTER_BEAT = "--crash-after-beat"

_to_request = perform.to_request


def _misbehaving(job, payload):
    request = _to_request(job, payload)
    text = request.text if isinstance(request.text, str) else ""
    if text == "__stop__":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif text == "__segv__":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif text.startswith("__sleep:"):
        time.sleep(float(text[len("__sleep:"):-2]))
    return request


def _beat_then_crash(self, *args, **kwargs):
    self._announce()  # alive in Redis: the agent routes jobs to this worker
    os._exit(1)  # no clean-up, no withdrawal: a crash


perform.to_request = _misbehaving

if __name__ == "__main__":
    argv = sys.argv[1:]
    if CRASH_AFTER_BEAT in argv:
        argv.remove(CRASH_AFTER_BEAT)
        worker.EdgeWorker.work = _beat_then_crash
    sys.exit(worker.main(argv))
