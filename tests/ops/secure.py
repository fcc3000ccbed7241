"""A secured gateway for tests: the shipped configs/mosquitto.conf (TLS, passwords, ACL) and
configs/redis.conf (ACL users, unix socket, AOF), rendered onto private paths and ports, plus
certificates made with `openssl` and passwords made for this run."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edgectl.localservices import LocalService, free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEVICES = ("dev-a", "dev-b")


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (EC P-256, one day)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "1",
        "-subj", "/CN=edge-test-ca")
    run("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
        "-out", crt, "-days", "1", "-extfile", ext)
    return {"ca": ca_crt, "cert": crt, "key": key}


def render_acl(text: str, agents: Sequence[str]) -> str:
    """configs/aclfile.example with its agent block (the first `user` line and the rules under
    it) repeated for each of `agents`, as docs/operations.md tells operators to do."""
    blocks = list(re.finditer(r"(?m)^user \S+\n((?:topic .*\n?)*)", text))
    if not blocks:
        raise ValueError("the ACL has no `user` block for the agent")
    rules = blocks[0].group(1).rstrip("\n") + "\n"
    for block in reversed(blocks):
        text = text[:block.start()] + text[block.end():]
    return text.rstrip("\n") + "\n" + "".join(f"\nuser {a}\n{rules}" for a in agents)


class SecureMosquitto(LocalService):
    """mosquitto running configs/mosquitto.conf with its /etc paths moved into `workdir`.

    `agents` are the usernames that get the ACL's agent block (default: every user named
    edge-agent*); `configs` is the folder holding mosquitto.conf and aclfile.example."""

    binary = "/usr/sbin/mosquitto"

    def __init__(self, workdir: Path, passwords: dict[str, str],
                 agents: Sequence[str] | None = None, configs: Path = CONFIGS) -> None:
        super().__init__(workdir)
        self.configs = configs
        self.certs = make_certs(self.workdir)
        passwd = self.workdir / "passwd"
        for i, (user, password) in enumerate(passwords.items()):
            subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                            user, password], check=True, capture_output=True)
        if agents is None:
            agents = [u for u in passwords if u.startswith("edge-agent")]
        (self.workdir / "acl").write_text(
            render_acl((configs / "aclfile.example").read_text(), agents))

    def command(self) -> list[str]:
        text = (self.configs / "mosquitto.conf").read_text()
        text = text.replace("/etc/mosquitto/edge/", f"{self.workdir}/")
        text = text.replace("/var/lib/mosquitto/", f"{self.workdir}/")
        text = re.sub(r"(?m)^listener 8883$", f"listener {self.port} 127.0.0.1", text)
        text += f"\nuser {getpass.getuser()}\nlog_dest stderr\nlog_type all\n"
        # the shipped file leaves the location to Debian's main mosquitto.conf
        text += f"persistence_location {self.workdir}/\n"
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(text)
        return [self.binary, "-c", str(conf)]


class SecureRedis(LocalService):
    """redis-server running configs/redis.conf: ACL users with this run's passwords, a unix
    socket in `workdir`, plus a test-only `admin` user for the harness's own checks."""

    binary = "redis-server"

    def __init__(self, workdir: Path, passwords: dict[str, str]) -> None:
        super().__init__(workdir)
        self.passwords = passwords
        self.socket = self.workdir / "redis.sock"
        self.admin_password = secrets.token_hex(16)

    def command(self) -> list[str]:
        text = (CONFIGS / "redis.conf").read_text()
        for user, marker in (("edge-agent", "@AGENT_SHA256@"), ("edge-worker", "@WORKER_SHA256@")):
            text = text.replace(marker, hashlib.sha256(self.passwords[user].encode()).hexdigest())
        text = re.sub(r"(?m)^port 0$", f"port {self.port}", text)
        text = re.sub(r"(?m)^unixsocket .*$", f"unixsocket {self.socket}", text)
        text = re.sub(r"(?m)^dir .*$", f"dir {self.workdir}", text)
        text = re.sub(r"(?m)^pidfile .*$", f"pidfile {self.workdir}/redis.pid", text)
        text = re.sub(r"(?m)^supervised .*$", "supervised no", text)
        text += f"\nuser admin on >{self.admin_password} ~* &* +@all\n"
        conf = self.workdir / "redis.conf"
        conf.write_text(text)
        return ["redis-server", str(conf)]

    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def client(self, user: str = "admin"):
        import redis

        password = self.admin_password if user == "admin" else self.passwords[user]
        return redis.Redis(unix_socket_path=str(self.socket), username=user, password=password)


def free_port_pair() -> int:
    """A port P with P and P+1 both free (agent and first worker metrics)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def write_secrets(folder: Path, secrets_: dict[str, str]) -> dict[str, Path]:
    """One 0600 file per secret (what password_file settings point at)."""
    out = {}
    for name, value in secrets_.items():
        path = folder / f"{name}.password"
        path.write_text(value + "\n")
        os.chmod(path, 0o600)
        out[name] = path
    return out


def spawn(module: str, *args: str, config: Path, log: Path, env: dict[str, str] | None = None):
    """A daemon process (`python -m module`) with its output in `log`."""
    full = dict(os.environ, EDGE_CONFIG=str(config), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=full,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    """Poll until `predicate()` is truthy; return its value or raise naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} within {timeout} s")
