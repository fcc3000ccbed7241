"""Two hosts share one gateway's Redis and broker, for real (network namespaces, TLS, ACL
users): the second host's worker takes jobs from the gateway's Redis over TCP + TLS as
`edge-worker`, agents on both hosts share the job topics through a shared subscription, and a
host that dies mid-flow (every process SIGKILLed) costs no job: each is answered exactly once.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from edge import constants as C
from tests.multihost.conftest import DEV, GW_TO_DEV, H2, MQTT_PORT, NODES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_JOBS = 80


class Device:
    """tests/multihost/_device.py on the device host; its output lines, as they come."""

    def __init__(self, site, tag: str, n: int, pace: float) -> None:
        argv = ["ip", "netns", "exec", site.hosts.namespaces["dev"], sys.executable, "-m",
                "tests.multihost._device", GW_TO_DEV, str(MQTT_PORT), str(site.ca["mqtt"]),
                "dev-a", str(site.files["mqtt-dev-a"]), tag, str(n), str(pace)]
        self.proc = subprocess.Popen(argv, cwd=_root(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(site.tmp / "dev.log",
                                                                         "ab"),
                                     text=True, env=_env())
        site.hosts.procs.append(self.proc)  # closed with the site whatever happens
        self.lines: queue.Queue = queue.Queue()
        self.answers: Counter = Counter()
        self.codes: Counter = Counter()
        self.published = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def pump(self, until, timeout: float) -> bool:
        """Consume output until `until(self)` holds (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while not until(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                doc = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if "published" in doc:
                self.published = doc["published"]
            elif "id" in doc:
                self.answers[doc["id"]] += 1
                self.codes[doc["status"] if doc["status"] == "ok" else doc["code"]] += 1
            else:
                raise AssertionError(f"device: {doc}")
        return True

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _root():
    from tests.multihost.netns import ROOT
    return ROOT


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(_root()), "PYTHONUNBUFFERED": "1"}


def _events(site, name: str, event: str) -> int:
    count = 0
    path = site.tmp / name
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
        try:
            count += json.loads(line).get("event") == event
        except (ValueError, AttributeError):
            pass
    return count


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _jobs_delivered_to(site, agent: str) -> int:
    log = (site.tmp / "mosquitto.log").read_text(errors="replace")
    return sum(1 for ln in log.splitlines()
               if f"Sending PUBLISH to {agent}" in ln and "edge/jobs/tokenize/dev-a" in ln)


def _start(site, host: str) -> None:
    before = _events(site, f"{host}-agent.log", "mqtt_connected")
    admin = site.admin()
    alive = C.ALIVE_KEY.format(queue="edge.tokenize.CPU")
    was = set(admin.zrange(alive, 0, -1))
    site.start_host(host)
    worker = site.procs[host]["worker"]
    # worker names are <hostname>-<device>-<pid>: a new name is this host's worker
    _wait(lambda: worker.poll() is not None or set(admin.zrangebyscore(
        alive, time.time() - C.ALIVE_WINDOW, "+inf")) - was, 180, f"worker on {host} alive")
    assert worker.poll() is None, site.log(f"{host}-worker.log")
    agent = site.procs[host]["agent"]
    _wait(lambda: agent.poll() is not None
          or _events(site, f"{host}-agent.log", "mqtt_connected") > before, 60,
          f"agent on {host} connected")
    assert agent.poll() is None, site.log(f"{host}-agent.log")


@pytest.fixture(scope="module")
def running(site):
    """The site with an agent and a worker started on each of gw and h2."""
    _start(site, "gw")
    _start(site, "h2")
    return site


def test_second_hosts_worker_and_agent_reach_the_gateway_over_tls_as_their_acl_users(running):
    site = running
    clients = site.admin().client_list()
    from_h2 = {(c["user"], c["addr"].rsplit(":", 1)[0]) for c in clients
               if c["addr"].startswith(H2 + ":")}
    # Redis has no plaintext TCP port (`port 0`): every TCP client came in over TLS
    assert ("edge-worker", H2) in from_h2 and ("edge-agent", H2) in from_h2, clients
    assert {u for u, _ in from_h2} <= {"edge-worker", "edge-agent"}
    # the device host reaches the broker, never Redis (it has no route to the gateway's
    # Redis address at all)
    assert not site.hosts.reachable("dev", "10.211.1.1", 6390)
    assert DEV.startswith("10.211.2.")


def test_a_host_killed_mid_flow_costs_no_job_and_answers_none_twice(running):
    site = running
    dev = Device(site, "kill", N_JOBS, pace=0.05)
    try:
        # Both agents take jobs (the group hands them round-robin); kill h2 with work in flight
        assert dev.pump(lambda d: d.published >= N_JOBS // 3 and sum(d.answers.values()) >= 5,
                        120), f"no flow: published {dev.published}, answers {dev.answers}"
        taken_by_h2 = _jobs_delivered_to(site, f"edge-agent-{NODES['h2']}")
        run_on_h2 = _events(site, "h2-worker.log", "job_started")
        killed = site.hosts.kill_host("h2")
        # host 2 had work in hand: jobs from the broker, jobs run by its worker
        assert len(killed) == 2 and taken_by_h2 > 0 and run_on_h2 > 0, (taken_by_h2, run_on_h2)
        answered_at_kill = sum(dev.answers.values())
        assert answered_at_kill < N_JOBS

        ids = [f"kill-{i}" for i in range(N_JOBS)]
        # With h2 down: the jobs its agent had stored and its worker had not finished are
        # answered by the gateway host (its worker runs them, or its reaper answers the one
        # the dead worker held); what the broker had queued for h2's agent waits in that
        # agent's persistent session.
        dev.pump(lambda d: all(d.answers[i] for i in ids), 120)
        missing_while_down = [i for i in ids if not dev.answers[i]]
        print(f"killed h2 after {answered_at_kill} answers; h2's agent had been sent "
              f"{taken_by_h2} jobs, its worker had started {run_on_h2}; unanswered while h2 "
              f"was down: {len(missing_while_down)}")

        if missing_while_down:  # the host comes back: its session delivers what it held
            _start(site, "h2")
            assert dev.pump(lambda d: all(d.answers[i] for i in ids), 120), (
                f"never answered: {[i for i in ids if not dev.answers[i]]}")
        dev.pump(lambda d: False, 3)  # a duplicate would arrive by now
        twice = {i: n for i, n in dev.answers.items() if n != 1}
        assert twice == {}, f"answered more than once: {twice}"
        assert set(dev.answers) == set(ids)
        print(f"answers by status/code: {dict(dev.codes)}")
    finally:
        dev.close()
