"""A site of several hosts, for real: network namespaces made by the test (veth pairs, addresses
only inside them), the shipped Mosquitto and Redis configs served from the "gateway" host over
TLS, agents and workers as processes on their hosts.

    host gw  10.211.1.1 (to h2), 10.211.2.1 (to dev): Redis (TLS on TCP 6390, ACL users),
             Mosquitto (configs/mosquitto.conf: TLS 8883, passwords, ACL), agent A, worker A
    host h2  10.211.1.2: agent B, worker B, reaching Redis and Mosquitto over TCP + TLS
    host dev 10.211.2.2: the device
"""

from __future__ import annotations

import getpass
import hashlib
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.multihost.netns import ROOT, Hosts, make_certs, why_no_netns
from tests.ops.secure import render_acl, write_secrets

CONFIGS = ROOT / "configs"
GW_TO_H2, H2, GW_TO_DEV, DEV = "10.211.1.1", "10.211.1.2", "10.211.2.1", "10.211.2.2"
REDIS_TLS_PORT, MQTT_PORT = 6390, 8883
NODES = {"gw": "site-gw", "h2": "site-h2"}


@pytest.fixture(scope="module")
def netns_ok():
    why = why_no_netns()
    if why:
        print(f"multi-host tests skipped: {why}")
        pytest.skip(why)


def render_redis(workdir: Path, passwords: dict[str, str], admin: str) -> Path:
    """configs/redis.conf as the gateway serves other hosts: no plaintext TCP (`port 0`
    kept), TLS on 6390 for the gateway's addresses, the same ACL users, plus a test `admin`."""
    text = (CONFIGS / "redis.conf").read_text()
    for user, marker in (("edge-agent", "@AGENT_SHA256@"), ("edge-worker", "@WORKER_SHA256@")):
        text = text.replace(marker, hashlib.sha256(passwords[user].encode()).hexdigest())
    text = re.sub(r"(?m)^bind .*$", f"bind {GW_TO_H2} 127.0.0.1", text)
    text = re.sub(r"(?m)^unixsocket .*$", f"unixsocket {workdir}/redis.sock", text)
    text = re.sub(r"(?m)^dir .*$", f"dir {workdir}", text)
    text = re.sub(r"(?m)^supervised .*$", "supervised no", text)
    assert re.search(r"(?m)^port 0$", text), "configs/redis.conf no longer disables plain TCP"
    text += (f"\ntls-port {REDIS_TLS_PORT}\n"
             f"tls-cert-file {workdir}/server.crt\ntls-key-file {workdir}/server.key\n"
             f"tls-ca-cert-file {workdir}/ca.crt\n"
             # clients prove who they are with their ACL password; the server proves itself
             # with its certificate
             "tls-auth-clients no\n"
             f"user admin on >{admin} ~* &* +@all\n")
    conf = workdir / "redis.conf"
    conf.write_text(text)
    return conf


def render_mosquitto(workdir: Path, passwords: dict[str, str], agents: list[str],
                     extra: str = "") -> Path:
    """configs/mosquitto.conf with its /etc and /var paths moved into `workdir`, listening on
    every address of its host (8883, TLS)."""
    passwd = workdir / "passwd"
    for i, (user, password) in enumerate(passwords.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                        user, password], check=True, capture_output=True)
    (workdir / "acl").write_text(render_acl((CONFIGS / "aclfile.example").read_text(), agents))
    text = (CONFIGS / "mosquitto.conf").read_text()
    text = text.replace("/etc/mosquitto/edge/", f"{workdir}/")
    text = text.replace("/var/lib/mosquitto/", f"{workdir}/")
    assert re.search(r"(?m)^listener 8883$", text)
    text += f"\nuser {getpass.getuser()}\nlog_dest stderr\nlog_type all\n{extra}"
    conf = workdir / "mosquitto.conf"
    conf.write_text(text)
    return conf


class Site:
    """The hosts, the gateway's servers, and per host an agent and a worker."""

    def __init__(self, tmp: Path, bundles: Path, keyring_file: Path) -> None:
        self.tmp, self.bundles, self.keyring_file = tmp, bundles, keyring_file
        self.hosts = Hosts()
        try:
            self._build()
        except BaseException:
            self.hosts.close()  # a half-built site leaves no namespace or process behind
            raise

    def _build(self) -> None:
        tmp = self.tmp
        for host in ("gw", "h2", "dev"):
            self.hosts.add(host)
        self.hosts.link("gw", f"{GW_TO_H2}/24", "h2", f"{H2}/24")
        self.hosts.link("gw", f"{GW_TO_DEV}/24", "dev", f"{DEV}/24")
        self.agents = [f"edge-agent-{NODES[h]}" for h in ("gw", "h2")]
        self.mqtt_pw = {u: secrets.token_hex(12) for u in (*self.agents, "dev-a")}
        self.redis_pw = {u: secrets.token_hex(12) for u in ("edge-agent", "edge-worker")}
        self.admin_pw = secrets.token_hex(12)
        self.shared_group = "edge-" + secrets.token_hex(16)  # a secret, as docs ask
        self.files = write_secrets(tmp, {
            **{f"mqtt-{h}": self.mqtt_pw[f"edge-agent-{NODES[h]}"] for h in ("gw", "h2")},
            "mqtt-dev-a": self.mqtt_pw["dev-a"],
            "redis-agent": self.redis_pw["edge-agent"],
            "redis-worker": self.redis_pw["edge-worker"]})
        for name in ("redis", "mosquitto"):
            (tmp / name).mkdir()
            make_certs(tmp / name, [GW_TO_H2, GW_TO_DEV, "127.0.0.1"])
        self.ca = {"redis": tmp / "redis" / "ca.crt", "mqtt": tmp / "mosquitto" / "ca.crt"}
        self.servers = {
            "redis": self.hosts.popen("gw", ["redis-server", str(render_redis(
                tmp / "redis", self.redis_pw, self.admin_pw))], tmp / "redis.log"),
            "mosquitto": self.hosts.popen("gw", ["/usr/sbin/mosquitto", "-c", str(
                render_mosquitto(tmp / "mosquitto", self.mqtt_pw, self.agents))],
                tmp / "mosquitto.log"),
        }
        self.hosts.wait_reachable("h2", GW_TO_H2, REDIS_TLS_PORT, 20, self.servers["redis"])
        self.hosts.wait_reachable("h2", GW_TO_H2, MQTT_PORT, 20, self.servers["mosquitto"])
        self.hosts.wait_reachable("dev", GW_TO_DEV, MQTT_PORT, 20, self.servers["mosquitto"])
        self.configs = {h: self._config(h) for h in ("gw", "h2")}
        self.procs: dict[str, dict[str, subprocess.Popen]] = {}

    def _config(self, host: str) -> Path:
        node = NODES[host]
        path = self.tmp / f"{host}.toml"
        url = (f"rediss://{GW_TO_H2}:{REDIS_TLS_PORT}/0?ssl_ca_certs={self.ca['redis']}"
               f"&ssl_cert_reqs=required")
        path.write_text(f"""
node = "{node}"
bundle_dir = "{self.bundles}"
log_format = "json"

[keyring]
file = "{self.keyring_file}"
env = "EDGE_TEST_NO_KEYRING_ENV"

[mqtt]
host = "{GW_TO_H2}"
port = {MQTT_PORT}
username = "edge-agent-{node}"
password_file = "{self.files[f'mqtt-{host}']}"
tls_ca = "{self.ca['mqtt']}"
shared_group = "{self.shared_group}"

[redis]
url = "{url}"
username = "edge-agent"
password_file = "{self.files['redis-agent']}"

[redis.worker]
username = "edge-worker"
password_file = "{self.files['redis-worker']}"

[tasks.tokenize]
devices = ["CPU"]

[tasks.detokenize]
devices = ["CPU"]
""")
        return path

    def admin(self):
        """The harness's own Redis client (over the unix socket: the test's namespace has no
        route to the gateway host, by design)."""
        import redis

        return redis.Redis(unix_socket_path=str(self.tmp / "redis" / "redis.sock"),
                           username="admin", password=self.admin_pw)

    def start_host(self, host: str) -> None:
        """The worker, then the agent, of `host`."""
        log = self.tmp / f"{host}"
        self.procs[host] = {
            "worker": self.hosts.python(host, "workers.worker", "--device", "CPU",
                                        log=Path(f"{log}-worker.log"),
                                        config=self.configs[host]),
        }
        self.procs[host]["agent"] = self.hosts.python(host, "edge.agent",
                                                      log=Path(f"{log}-agent.log"),
                                                      config=self.configs[host])

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        self.hosts.close()


@pytest.fixture(scope="module")
def site(netns_ok, tmp_path_factory, tokenizer_bundles, keyring_file):
    s = Site(tmp_path_factory.mktemp("multihost"), tokenizer_bundles, keyring_file)
    try:
        yield s
    finally:
        s.close()
