"""A gateway's broker bridged to the fleet's broker, for real: two hosts (network namespaces),
the shipped configs/mosquitto.conf on the gateway plus the bridge section docs/operations.md
gives ("Past one gateway"), TLS and a login of its own on the fleet side.

* Status goes out: the agent's retained `edge/status/<node>` reaches the fleet broker as
  `fleet/<gateway>/edge/status/<node>`, and is still there for a late subscriber.
* Sealed keyrings come in: what the KMS publishes to `fleet/keys/<gateway>` arrives on the
  gateway broker as `edge/keys/<gateway>`, readable there by the gateway's key installer only.
* Nothing else crosses: a job published on the gateway stays there.
"""

from __future__ import annotations

import secrets
import subprocess
import time

import pytest

from tests.multihost.conftest import render_mosquitto
from tests.multihost.netns import Hosts, make_certs
from tests.ops.secure import write_secrets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GW, FLEET = "10.211.3.1", "10.211.3.2"
GATEWAY = "gw-0001"
AGENT = f"edge-agent-{GATEWAY}"
BRIDGE = """
# -- bridge to the fleet broker (docs/operations.md, "Past one gateway") --
connection fleet
address {fleet}:8883
bridge_cafile {fleet_ca}
remote_username {gateway}
remote_password {password}
remote_clientid {gateway}
cleansession false
try_private true
notifications false
topic edge/status/# out 1 "" fleet/{gateway}/
topic keys/{gateway} in 1 edge/ fleet/
"""
FLEET_CONF = """
per_listener_settings false
allow_anonymous false
password_file {dir}/passwd
acl_file {dir}/acl
listener 8883
cafile {dir}/ca.crt
certfile {dir}/server.crt
keyfile {dir}/server.key
persistence true
persistence_location {dir}/
user root
log_dest stderr
log_type all
"""
FLEET_ACL = """
user {gateway}
topic write fleet/{gateway}/edge/status/#
topic read fleet/keys/{gateway}

user fleet-ops
topic read fleet/#
topic write fleet/keys/#
"""


@pytest.fixture(scope="module")
def bridged(netns_ok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge")
    hosts = Hosts()
    try:
        hosts.add("gw")
        hosts.add("fleet")
        hosts.link("gw", f"{GW}/24", "fleet", f"{FLEET}/24")
        pw = {u: secrets.token_hex(12) for u in (AGENT, "edge-keys", GATEWAY, "fleet-ops",
                                                  "dev-a")}
        fleet_dir, gw_dir = tmp / "fleet", tmp / "gw"
        fleet_dir.mkdir()
        gw_dir.mkdir()
        make_certs(fleet_dir, [FLEET, "127.0.0.1"])
        make_certs(gw_dir, [GW, "127.0.0.1"])
        for i, user in enumerate((GATEWAY, "fleet-ops")):
            subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b",
                            str(fleet_dir / "passwd"), user, pw[user]], check=True,
                           capture_output=True)
        (fleet_dir / "acl").write_text(FLEET_ACL.format(gateway=GATEWAY))
        (fleet_dir / "mosquitto.conf").write_text(FLEET_CONF.format(dir=fleet_dir))
        gw_conf = render_mosquitto(
            gw_dir, {u: pw[u] for u in (AGENT, "edge-keys", "dev-a")}, [AGENT],
            extra=BRIDGE.format(fleet=FLEET, fleet_ca=fleet_dir / "ca.crt", gateway=GATEWAY,
                                password=pw[GATEWAY]))
        # the key installer's own login on the gateway broker: it reads its ring, nothing else
        with open(gw_dir / "acl", "a") as acl:
            acl.write(f"\nuser edge-keys\ntopic read edge/keys/{GATEWAY}\n")
        fleet = hosts.popen("fleet", ["/usr/sbin/mosquitto", "-c",
                                      str(fleet_dir / "mosquitto.conf")], tmp / "fleet.log")
        hosts.wait_reachable("gw", FLEET, 8883, 20, fleet)
        gw = hosts.popen("gw", ["/usr/sbin/mosquitto", "-c", str(gw_conf)], tmp / "gw.log")
        hosts.wait_reachable("gw", "127.0.0.1", 8883, 20, gw)
        files = write_secrets(tmp, pw)
        yield hosts, tmp, pw, files
    finally:
        hosts.close()


def _client(kind: str, host: str, user: str, pw: dict, tmp, *args: str) -> list[str]:
    ca = tmp / ("gw" if host == "gw" else "fleet") / "ca.crt"
    return [f"mosquitto_{kind}", "-h", "127.0.0.1", "-p", "8883", "--cafile", str(ca),
            "-u", user, "-P", pw[user], "-V", "mqttv5", *args]


def _sub(hosts: Hosts, host: str, user: str, pw, tmp, topic: str, count: int = 1,
         wait: int = 10) -> list[str]:
    done = hosts.run(host, _client("sub", host, user, pw, tmp, "-t", topic, "-v",
                                   "-C", str(count), "-W", str(wait)), timeout=wait + 10)
    return done.stdout.splitlines()


def _pub(hosts: Hosts, host: str, user: str, pw, tmp, topic: str, msg: str,
         *flags: str) -> None:
    done = hosts.run(host, _client("pub", host, user, pw, tmp, "-t", topic, "-m", msg,
                                   "-q", "1", *flags))
    assert done.returncode == 0, done.stderr


def _until(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    return predicate()


def test_status_goes_out_to_the_fleet_broker_retained(bridged):
    hosts, tmp, pw, _ = bridged
    status = '{"node": "gw-0001", "online": true}'
    # the bridge connects in the background: publish until the fleet has it
    got = _until(lambda: (_pub(hosts, "gw", AGENT, pw, tmp, f"edge/status/{GATEWAY}", status,
                               "-r"),
                          _sub(hosts, "fleet", "fleet-ops", pw, tmp, "fleet/#", wait=3))[1], 30)
    assert got == [f"fleet/{GATEWAY}/edge/status/{GATEWAY} {status}"]
    # retained on the fleet side: a subscriber that comes later still gets it
    assert _sub(hosts, "fleet", "fleet-ops", pw, tmp, f"fleet/{GATEWAY}/edge/status/#") == got


def test_sealed_ring_comes_in_for_the_key_installer_only(bridged):
    hosts, tmp, pw, _ = bridged
    sealed = "EDGESEAL2-stand-in-" + secrets.token_hex(8)  # opaque bytes to the broker
    _until(lambda: _sub(hosts, "fleet", "fleet-ops", pw, tmp, "fleet/#", wait=3), 30)
    proc = subprocess.Popen(["ip", "netns", "exec", hosts.namespaces["gw"],
                             *_client("sub", "gw", "edge-keys", pw, tmp, "-t",
                                      f"edge/keys/{GATEWAY}", "-v", "-C", "1", "-W", "20")],
                            stdout=subprocess.PIPE, text=True)
    hosts.procs.append(proc)
    spy = subprocess.Popen(["ip", "netns", "exec", hosts.namespaces["gw"],
                            *_client("sub", "gw", "dev-a", pw, tmp, "-t", "edge/keys/#",
                                     "-t", "edge/status/#", "-v", "-W", "8")],
                           stdout=subprocess.PIPE, text=True)
    hosts.procs.append(spy)
    time.sleep(1.5)  # both subscribed
    _pub(hosts, "fleet", "fleet-ops", pw, tmp, f"fleet/keys/{GATEWAY}", sealed)
    out, _ = proc.communicate(timeout=30)
    assert out.splitlines() == [f"edge/keys/{GATEWAY} {sealed}"]
    spied, _ = spy.communicate(timeout=30)
    # the device was connected and subscribed (it got the retained status it may read) ...
    assert any(ln.startswith("edge/status/") for ln in spied.splitlines()), spied
    # ... and read no ring (the gateway's ACL)
    assert [ln for ln in spied.splitlines() if ln.startswith("edge/keys/")] == []


def test_jobs_and_other_topics_stay_on_the_gateway(bridged):
    hosts, tmp, pw, _ = bridged
    spy = subprocess.Popen(["ip", "netns", "exec", hosts.namespaces["fleet"],
                            *_client("sub", "fleet", "fleet-ops", pw, tmp, "-t", "fleet/#",
                                     "-v", "-W", "6")], stdout=subprocess.PIPE, text=True)
    hosts.procs.append(spy)
    time.sleep(1.5)
    _pub(hosts, "gw", "dev-a", pw, tmp, "edge/jobs/tokenize/dev-a", '{"id": "j1", "text": "x"}')
    _pub(hosts, "gw", AGENT, pw, tmp, "edge/results/dev-a/j1", '{"id": "j1"}')
    out, _ = spy.communicate(timeout=30)
    # the spy was live (the retained status, which crossed, is there); no job, no result
    assert any("/edge/status/" in ln for ln in out.splitlines()), out
    assert [ln for ln in out.splitlines() if "/edge/status/" not in ln] == []
