"""Two worker processes of one device (`edge-worker --device CPU` and `--device CPU:2`) with the
real Redis, Mosquitto and agent: both serve the one queue, the status shows both, each has its
own metrics port and compiles with the configured thread count, and one that dies leaves the
queue served by the other."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from edge import constants as C
from edge.config import load
from edge.status import node_status
from edgectl.localdaemon import Daemon
from edgectl.localservices import free_port
from edgectl.top import scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUE = "edge.tokenize.CPU"


def free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 all free right now."""
    for _ in range(50):
        base = free_port()
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "max_batch": 1}},
               extra={"devices.CPU": {"threads": 1}})
    # a top-level key must come before the first [section]: agent on it, CPU on +1, CPU:2 on +2
    port = free_ports(3)
    d.config.write_text(f"metrics_port = {port}\n" + d.config.read_text())
    d.metrics_port = port  # type: ignore[attr-defined]
    try:
        d.start()
        second = d._spawn("workers.worker", "--device", "CPU:2", log="worker-CPU-2.log")
        d.workers.append(second)
        deadline = time.monotonic() + 120
        while d.conn.zcard(C.ALIVE_KEY.format(queue=QUEUE)) < 2:
            assert second.poll() is None, d.log("worker-CPU-2.log")
            assert time.monotonic() < deadline, d.log("worker-CPU-2.log")
            time.sleep(0.1)
    except BaseException:
        d.stop()
        raise
    yield d
    d.stop()


def jobs_ok(port: int) -> float:
    samples = scrape(port) or {}
    return sum(v for (name, labels), v in samples.items()
               if name == "edge_jobs_total" and dict(labels).get("status") == "ok")


def test_two_workers_of_one_device_show_as_two_and_both_serve_the_queue(daemon):
    status = node_status(daemon.conn, load(daemon.config))
    assert status["queues"][QUEUE]["workers"] == 2
    docs = status["workers"].values()
    assert sorted(w["instance"] for w in docs) == ["CPU", "CPU:2"]
    assert {w["device"] for w in docs} == {"CPU"}
    assert len({w["name"] for w in docs}) == 2

    with daemon.device("dev-inst") as dev:
        # one at a time: each waits for its answer, so the idle worker that has waited
        # longest (Redis serves blocked pops in order) takes the next one
        answers = [dev.request("tokenize", text=f"job {i}", request_id=f"r-{i}")
                   for i in range(20)]
    assert all(a.ok for a in answers), [a.body for a in answers if not a.ok]
    first, second = jobs_ok(daemon.metrics_port + 1), jobs_ok(daemon.metrics_port + 2)
    assert first + second == 20
    assert first > 0 and second > 0


def test_threads_reach_the_compile_properties(tokenizer_bundles, keyring_file):
    import openvino as ov

    from edge.config import parse
    from keys import load_ring
    from workers.model_store import build_models

    config = parse({"bundle_dir": str(tokenizer_bundles), "keyring": {"file": str(keyring_file)},
                    "tasks": {"tokenize": {"devices": ["CPU"]}},
                    "devices": {"CPU": {"threads": 1}}})
    compiled: list[tuple[dict, int]] = []

    class RecordingCore:
        """An ov.Core that remembers every compile's properties and the thread count that the
        compiled model reports."""

        def __init__(self) -> None:
            self._core = ov.Core()

        def compile_model(self, model, device=None, config=None, **kw):
            out = self._core.compile_model(model, device, config or {}, **kw)
            compiled.append((dict(config or {}), out.get_property("INFERENCE_NUM_THREADS")))
            return out

        def __getattr__(self, name):
            return getattr(self._core, name)

    models = build_models(config, "CPU", load_ring(config.keyring), core=RecordingCore())
    assert models.handlers and compiled
    assert all(props.get("INFERENCE_NUM_THREADS") == 1 and threads == 1
               for props, threads in compiled), compiled


def test_killing_one_worker_leaves_the_queue_served(daemon):
    second = daemon.workers[-1]
    second.send_signal(signal.SIGKILL)
    second.wait(10)
    with daemon.device("dev-kill") as dev:
        answers = [dev.request("tokenize", text=f"after {i}", request_id=f"k-{i}")
                   for i in range(5)]
    assert all(a.ok for a in answers), [a.body for a in answers if not a.ok]
    status = node_status(daemon.conn, load(daemon.config))
    assert status["queues"][QUEUE]["workers"] >= 1  # the dead one ages out of the window
    assert jobs_ok(daemon.metrics_port + 1) >= 5


def test_a_worker_that_stops_cleanly_leaves_one_worker_on_the_queue(daemon):
    second = daemon.workers[-1]
    second.send_signal(signal.SIGTERM)  # warm stop: it withdraws from the alive sets
    second.wait(30)
    status = node_status(daemon.conn, load(daemon.config))
    assert status["queues"][QUEUE]["workers"] == 1
    assert [w["instance"] for w in status["workers"].values()] == ["CPU"]
    with daemon.device("dev-stop") as dev:
        assert dev.request("tokenize", text="still served").ok
