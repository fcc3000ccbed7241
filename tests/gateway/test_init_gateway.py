"""`edgectl init-gateway --root DIR`: what a gateway gets, with the owners and modes the
DynamicUser services need (the files are checked on disk, the owners in the plan it applies)."""

from __future__ import annotations

import hashlib
import ssl
import stat
from pathlib import Path

import pytest

from edge.config import load
from edgectl import gateway, units

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("gw")
    lay = gateway.init_gateway(root, "gw-test", Path("/opt/edge/venv/bin"),
                               ["gw-test.example", "127.0.0.1"])
    return root, {p.path: p for p in lay.placed}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_placed_path_has_its_mode_and_secrets_are_never_world_readable(laid_out):
    root, placed = laid_out
    for path, p in placed.items():
        assert _mode(root / path.lstrip("/")) == p.mode, path
    for path in ("/etc/edge/redis-agent", "/etc/edge/redis-worker", "/etc/edge/mqtt-password",
                 "/etc/mosquitto/edge/ca.key", "/etc/mosquitto/edge/server.key",
                 "/etc/redis/redis-edge.conf", "/etc/mosquitto/edge/passwd"):
        assert not _mode(root / path.lstrip("/")) & 0o007, path


def test_the_services_reach_what_they_read_through_their_groups(laid_out):
    _, placed = laid_out
    # agent + workers: DynamicUser=yes, SupplementaryGroups=edge edge-redis
    for path in ("/etc/edge", "/var/lib/edge/bundles"):
        assert (placed[path].group, placed[path].mode & 0o050) == ("edge", 0o050), path
    for path in ("/etc/edge/edge.toml", "/etc/edge/redis-agent", "/etc/edge/redis-worker",
                 "/etc/edge/mqtt-password"):
        assert (placed[path].owner, placed[path].group, placed[path].mode) == (
            "root", "edge", 0o640), path
    assert placed["/var/lib/redis-edge"].owner == "redis"
    assert placed["/etc/redis/redis-edge.conf"].group == "redis"
    assert placed["/etc/mosquitto/edge/server.key"].owner == "mosquitto"
    for path in ("/etc/mosquitto/edge/acl", "/etc/mosquitto/edge/passwd"):
        assert placed[path].group == "mosquitto" and placed[path].mode & 0o040, path
    sysusers = units.data_dir("systemd") / "edge.sysusers.conf"
    groups = {line.split()[1] for line in sysusers.read_text().splitlines()
              if line.startswith("g ")}
    assert {"edge", "edge-redis"} <= groups
    for unit in ("edge-agent.service", "edge-worker@.service"):
        text = (units.data_dir("systemd") / unit).read_text()
        assert "SupplementaryGroups=edge edge-redis" in text.splitlines(), unit


def test_units_order_after_the_edge_redis_instance_not_debians_default(laid_out):
    root, _ = laid_out
    etc = root / "etc/systemd/system"
    for unit in ("edge-agent.service", "edge-worker@.service", "edge.target"):
        after = [line for line in (etc / unit).read_text().splitlines()
                 if line.startswith("After=")]
        assert after and all("redis-server@edge.service" in a for a in after), unit
        assert not any("redis-server.service" in a.split() for a in after), unit
    drop_in = (etc / "redis-server@edge.service.d/edge.conf").read_text()
    assert "ReadWritePaths=/var/lib/redis-edge" in drop_in.splitlines()


def test_config_loads_and_names_the_files_init_gateway_wrote(laid_out):
    root, placed = laid_out
    cfg = load(root / "etc/edge/edge.toml")
    assert cfg.node == "gw-test" and cfg.mqtt.username == "edge-agent-gw-test"
    named = {cfg.mqtt.password_file, cfg.mqtt.tls_ca, cfg.redis.password_file,
             cfg.redis.worker.password_file}
    assert {str(p) for p in named} <= set(placed), named
    assert cfg.redis.username == "edge-agent" and cfg.redis.worker.username == "edge-worker"


def test_redis_conf_holds_the_hashes_of_the_password_files(laid_out):
    root, _ = laid_out
    conf = (root / "etc/redis/redis-edge.conf").read_text()
    assert "@AGENT_SHA256@" not in conf and "@WORKER_SHA256@" not in conf
    for who in ("agent", "worker"):
        pw = (root / f"etc/edge/redis-{who}").read_text()
        assert f"user edge-{who} on #{hashlib.sha256(pw.encode()).hexdigest()} " in conf
        assert pw not in conf


def test_broker_gets_tls_acl_and_the_agents_login(laid_out):
    root, _ = laid_out
    m = root / "etc/mosquitto"
    assert "user edge-agent-gw-test" in (m / "edge/acl").read_text().splitlines()
    assert (m / "edge/passwd").read_text().startswith("edge-agent-gw-test:$")
    assert (m / "conf.d/edge.conf").read_text() == (
        units.data_dir("configs") / "mosquitto.conf").read_text()
    # the server certificate chains to the CA the agent and devices are given
    ctx = ssl.create_default_context(cafile=str(root / "etc/edge/ca.crt"))
    ctx.load_cert_chain(m / "edge/server.crt", m / "edge/server.key")


def test_a_second_run_keeps_every_secret(laid_out, tmp_path):
    root, _ = laid_out
    secrets = ["etc/edge/redis-agent", "etc/edge/mqtt-password", "etc/mosquitto/edge/ca.key",
               "etc/redis/redis-edge.conf", "etc/mosquitto/edge/passwd", "etc/edge/edge.toml"]
    before = {s: (root / s).read_bytes() for s in secrets}
    again = gateway.init_gateway(root, "gw-test", Path("/opt/edge/venv/bin"))
    assert {s: (root / s).read_bytes() for s in secrets} == before
    assert not [p.path for p in again.placed if p.created and p.path.startswith("/etc/edge/")]


def test_cli_prints_what_is_left_to_do(tmp_path, capsys):
    from edgectl.cli import main

    assert main(["init-gateway", "--root", str(tmp_path), "--node", "gw-9",
                 "--tls-name", "localhost"]) == 0
    out = capsys.readouterr().out
    assert "wrote  640 root:edge /etc/edge/mqtt-password" in out
    for step in ("/var/lib/edge/bundles", "systemd-creds encrypt", "mosquitto_passwd",
                 "systemctl enable --now edge.target"):
        assert step in out, step
