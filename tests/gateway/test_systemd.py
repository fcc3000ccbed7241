"""The gateway deployed as README's "Deploy to a gateway" says, under a real systemd.

A Debian 12 container (tests/gateway/container.py) boots systemd 252 as its PID 1; inside it the
project's wheel is installed in /opt/edge/venv, `edgectl init-gateway` lays the gateway out and
the hardened units run: Mosquitto with TLS, Redis on its unix socket with ACL users, the agent
and a CPU worker as DynamicUser services. Each step is a command run in the container
(`nsenter` into its namespaces) whose output the test checks. The steps run in file order on
one booted container; a failed step fails the ones after it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.gateway import container
from tests.gateway.wheel import build_wheel

pytestmark = pytest.mark.slow

PREPARED = Path.home() / ".cache" / "edge-daemon" / "prepared"
CPU = "edge-worker@CPU.service"
UNITS = ("mosquitto.service", "redis-server@edge.service", "edge-agent.service", CPU)
SUBMIT = ("edgectl --config /etc/edge/edge.toml submit --device-id sensor-1 "
          "--password-file /srv/test/device-password --tls-ca /etc/edge/ca.crt "
          "--host 127.0.0.1 --port 8883 --timeout 90")
SCORES: dict[str, float] = {}


def _payload(where: Path) -> Path:
    """What the operator brings: a keyring (made now), bundles, a device's password."""
    import keys
    from workers.tokenize.prepare import prepare

    where.mkdir()
    ring = keys.Keyring.generate()
    ring.save(where / "keyring.json")
    (where / "keyring.json").chmod(0o600)
    for folder in prepare(PREPARED):
        name = {"tokenizer-all-minilm-l6-v2": "first", "tokenizer-clip-vit-b32": "second"}.get(
            folder.name)
        if name:
            keys.pack_bundle(folder, where / name, ring)
    (where / "device-password").write_text(secrets.token_hex(16))
    shutil.copy(Path(__file__).with_name("burst.py"), where / "burst.py")
    return where


@pytest.fixture(scope="module")
def gw():
    reason = container.why_not()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    # Under the cache, not pytest's tmp: other sessions' pytest runs prune /tmp/pytest-of-*
    # while this one runs. One folder per run; the rootfs copy is removed at the end.
    work = container.CACHE / "runs" / f"{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ready = container.ready_rootfs()
    rootfs = work / "rootfs"
    rootfs.mkdir()
    container.copy_tree(ready, rootfs)
    wheel = build_wheel(work / "build")
    done = container.nspawn_run(rootfs, f"{container.VENV}/bin/pip install -q --no-index "
                                        f"--no-deps /dist/{wheel.name}", {wheel.parent: "/dist"})
    assert done.returncode == 0, done.stdout + done.stderr
    gateway = container.Gateway(rootfs, {_payload(work / "payload"): "/srv/test"}).boot()
    try:
        yield gateway
    finally:
        journal = gateway.run("journalctl -b --no-pager -o short-precise", check=False)
        (work / "journal.txt").write_text(journal.stdout)
        (container.CACHE / "last-journal.txt").write_text(journal.stdout)
        gateway.shutdown()
        print(f"\njournal: {work / 'journal.txt'}; systemd-analyze security: {SCORES}")
        # keep only the journal: the rootfs copy, the wheel and the payload (a test keyring)
        # go; the next run of this pid's folder starts clean anyway
        for leftover in (rootfs, work / "build", work / "payload"):
            shutil.rmtree(leftover, ignore_errors=True)


def _show(gw, unit: str, *props: str) -> dict[str, str]:
    out = gw.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _wait(what, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(message)


def _submit(gw, args: str) -> dict:
    done = gw.run(f"{SUBMIT} {args}", check=False, timeout=120)
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout)


def test_init_gateway_from_the_installed_wheel(gw):
    out = gw.run("edgectl init-gateway --node gw-0001").stdout
    assert "left to do:" in out
    assert gw.run("getent group edge edge-redis").stdout.count("\n") == 2
    modes = gw.run("stat -c '%a %U %G %n' /etc/edge /etc/edge/edge.toml /etc/edge/redis-agent "
                   "/etc/edge/mqtt-password /etc/redis/redis-edge.conf /var/lib/redis-edge "
                   "/etc/mosquitto/edge/server.key").stdout.splitlines()
    assert modes == ["750 root edge /etc/edge", "640 root edge /etc/edge/edge.toml",
                     "640 root edge /etc/edge/redis-agent",
                     "640 root edge /etc/edge/mqtt-password",
                     "640 root redis /etc/redis/redis-edge.conf",
                     "750 redis redis /var/lib/redis-edge",
                     "600 mosquitto mosquitto /etc/mosquitto/edge/server.key"]


def test_operator_steps_then_edge_target_starts_ready(gw):
    # what init-gateway printed as left to do, as README's "Deploy to a gateway" does it
    gw.run("cp -r /srv/test/first/. /var/lib/edge/bundles/ && chgrp -R edge /var/lib/edge/bundles"
           " && chmod -R g+rX,o-rwx /var/lib/edge/bundles")
    gw.run("systemd-creds encrypt --name=edge-keyring /srv/test/keyring.json "
           "/etc/edge/keyring.cred")
    gw.run("mosquitto_passwd -b /etc/mosquitto/edge/passwd sensor-1 "
           "\"$(cat /srv/test/device-password)\"")
    gw.run("systemctl daemon-reload && systemctl restart mosquitto && "
           "systemctl enable --now edge.target edge-agent edge-worker@CPU", timeout=600)
    for unit in UNITS:
        state = _show(gw, unit, "ActiveState", "SubState", "Result")
        assert state["ActiveState"] == "active", (unit, state, gw.run(
            f"journalctl -b -u {unit} --no-pager | tail -40", check=False).stdout)
    # Type=notify: `active` means READY=1 arrived, sent after every bundle compiled
    status = _show(gw, CPU, "StatusText")["StatusText"]
    assert "serving" in status and "tokenize" in status, status
    assert gw.run("test -e /etc/edge/keyring.json", check=False).returncode != 0


def test_keyring_arrives_as_the_encrypted_credential(gw):
    # the only keyring on the gateway is the sealed credential; systemd decrypted it for the
    # worker alone, into its private credentials directory
    assert gw.run("ls /run/credentials/edge-worker@CPU.service/").stdout.split() == [
        "edge-keyring"]
    env = gw.run("tr '\\0' '\\n' < /proc/$(systemctl show -p MainPID --value "
                 "edge-worker@CPU)/environ").stdout
    assert "CREDENTIALS_DIRECTORY=/run/credentials/edge-worker@CPU.service" in env
    assert gw.run("ls /run/credentials/edge-agent.service", check=False).returncode != 0


def test_a_job_is_answered_over_tls(gw):
    reply = _submit(gw, "tokenize 'hello gateway' --param model=all-minilm-l6-v2")
    assert reply["status"] == "ok", reply
    assert reply["result"]["model"] == "all-minilm-l6-v2" and reply["result"]["ids"]
    # the broker has no plaintext listener: 1883 is closed inside the container
    assert gw.run("mosquitto_pub -h localhost -p 1883 -t x -m y", check=False).returncode != 0


def test_reload_swaps_the_models_without_a_restart(gw):
    pid = _show(gw, CPU, "MainPID")["MainPID"]
    before = _submit(gw, "tokenize 'hello' --param model=clip-vit-b32")
    assert before["status"] == "error", before
    gw.run("cp -r /srv/test/second/. /var/lib/edge/bundles/ && chgrp -R edge "
           "/var/lib/edge/bundles && chmod -R g+rX,o-rwx /var/lib/edge/bundles")
    gw.run("systemctl reload edge-worker@CPU", timeout=300)
    _wait(lambda: "reloaded" in _show(gw, CPU, "StatusText")["StatusText"], 120,
          "no reload finished")
    after = _submit(gw, "tokenize 'hello' --param model=clip-vit-b32")
    assert after["status"] == "ok" and after["result"]["model"] == "clip-vit-b32", after
    assert _show(gw, CPU, "MainPID")["MainPID"] == pid


def test_watchdog_restarts_a_hung_worker(gw):
    # The shipped WatchdogSec=120 is the production value; a drop-in shortens it for the test
    # (systemctl edit does the same), the mechanism is the one the unit ships.
    gw.run("mkdir -p /etc/systemd/system/edge-worker@CPU.service.d && printf "
           "'[Service]\\nWatchdogSec=10\\n' > /etc/systemd/system/edge-worker@CPU.service.d/"
           "test-watchdog.conf && systemctl daemon-reload && systemctl restart edge-worker@CPU",
           timeout=300)
    before = _show(gw, CPU, "MainPID", "NRestarts")
    gw.run(f"kill -STOP {before['MainPID']}")
    _wait(lambda: (lambda s: s["MainPID"] not in ("0", before["MainPID"])
                   and s["ActiveState"] == "active" and s["NRestarts"] != before["NRestarts"])(
        _show(gw, CPU, "MainPID", "NRestarts", "ActiveState")), 240,
        "the stopped worker was not restarted: " + gw.run(
            "journalctl -b -u edge-worker@CPU --no-pager | tail -30", check=False).stdout)
    journal = gw.run("journalctl -b -u edge-worker@CPU --no-pager").stdout
    assert "Watchdog timeout" in journal
    reply = _submit(gw, "tokenize 'after the watchdog' --param model=all-minilm-l6-v2")
    assert reply["status"] == "ok", reply


def test_systemd_analyze_security_scores_the_loaded_units(gw):
    for unit in ("edge-agent.service", CPU, "mosquitto.service", "redis-server@edge.service"):
        out = gw.run(f"systemd-analyze security --no-pager {unit}", check=False).stdout
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        assert match, out[-2000:]
        SCORES[unit] = float(match.group(1))
    print(f"systemd-analyze security (loaded): {SCORES}")
    assert SCORES["edge-agent.service"] <= 2.0 and SCORES[CPU] <= 2.0, SCORES
    # Debian's own unit scores 9.6; systemd/mosquitto.service.d/edge.conf sandboxes it
    assert SCORES["mosquitto.service"] <= 5.0, SCORES


def test_stop_is_warm_and_loses_no_job(gw):
    # A burst of jobs from a device; the worker is stopped while they are still coming in.
    count = 40
    gw.run("mkdir -p /run/burst && systemd-run --unit=edge-burst -p WorkingDirectory=/ "
           f"{container.VENV}/bin/python /srv/test/burst.py {count} /run/burst")
    _wait(lambda: gw.run("test -e /run/burst/published", check=False).returncode == 0, 120,
          "the burst was not published")
    gw.run("systemctl stop edge-worker@CPU", timeout=700)
    answered = int(gw.run("cat /run/burst/answered 2>/dev/null || echo 0").stdout)
    state = _show(gw, CPU, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # SIGTERM -> RQ's warm shutdown -> exit 0 (CLD_EXITED=1), not killed (Result=success)
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}, state
    assert answered < count, "the burst ended before the stop: nothing was tested"
    gw.run("systemctl start edge-worker@CPU", timeout=600)
    _wait(lambda: gw.run("test -e /run/burst/burst.json", check=False).returncode == 0, 300,
          "the burst did not finish")
    answers = json.loads(gw.run("cat /run/burst/burst.json").stdout)
    assert len(answers) == count
    # every job answered exactly once: done (ok), or, while no worker served tokenize, told so
    # by the agent's reaper (model_unavailable); never cut off half way (internal / timeout)
    assert all(len(a) == 1 for a in answers.values()), answers
    outcomes = [a[0] for a in answers.values()]
    assert all(o == "ok" or o.startswith("model_unavailable") for o in outcomes), outcomes
    assert outcomes.count("ok") >= answered
    summary = Counter(o.split(":")[0] for o in outcomes)
    print(f"warm stop: {answered}/{count} answered before the stop; outcomes {dict(summary)}")
