"""`edgectl init-gateway`: lay out one gateway from the installed package; start nothing.

Writes the units (`edgectl install-units`), the sysusers file and its groups, `/etc/edge`
(config, Redis and MQTT passwords, the broker's CA), the `redis-server@edge` instance's config
with its ACL users, and Mosquitto's TLS listener, password file and ACL; then prints what is left
for the operator (bundles, the keyring credential, device accounts, enabling the units).

Who reads what: the agent and the workers run as `DynamicUser=yes` users that join the static
groups `edge` (reads `/etc/edge`, root:edge 0750, its 0640 files and the bundles) and
`edge-redis` (opens the Redis socket); Redis runs as `redis`, Mosquitto as `mosquitto`, and
each gets its own files group-readable. Secrets are created once: a file already there is
kept, so running it again changes nothing (`--root DIR` writes under DIR, for a package build
or a test, and sets owners only where DIR's /etc/passwd and /etc/group name them).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgectl import units


@dataclass(frozen=True, slots=True)
class Placed:
    """One path the gateway needs, with the owner, group and mode it must have."""

    path: str  # absolute, as on the gateway
    owner: str
    group: str
    mode: int
    created: bool = True  # False: it was there already and was kept


DIRS = (
    ("/etc/edge", "root", "edge", 0o750),
    ("/var/lib/edge", "root", "root", 0o755),
    ("/var/lib/edge/bundles", "root", "edge", 0o750),
    ("/etc/mosquitto/edge", "root", "mosquitto", 0o750),
    ("/etc/mosquitto/conf.d", "root", "root", 0o755),
    ("/etc/redis", "redis", "redis", 0o2770),  # as Debian's redis-server package leaves it
    ("/var/lib/redis-edge", "redis", "redis", 0o750),
)
SECRET = ("root", "edge", 0o640)  # read by the agent and workers through group edge


class Layout:
    """Writes files under `root` and remembers each one's owner, group and mode."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.placed: list[Placed] = []

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def exists(self, *paths: str) -> bool:
        return all(self.at(p).exists() for p in paths)

    def directory(self, path: str, owner: str, group: str, mode: int) -> None:
        created = not self.at(path).is_dir()
        self.at(path).mkdir(parents=True, exist_ok=True)
        self.at(path).chmod(mode)
        self.placed.append(Placed(path, owner, group, mode, created))

    def file(self, path: str, data: str | bytes, owner: str, group: str, mode: int,
             replace: bool = False) -> None:
        """Write `data` unless the file exists (or `replace`); the mode is set either way."""
        target = self.at(path)
        created = replace or not target.exists()
        if created:
            # made with the final mode from the start: a secret is never readable in between
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data.encode() if isinstance(data, str) else data)
        target.chmod(mode)
        self.placed.append(Placed(path, owner, group, mode, created))

    def keep(self, path: str, owner: str, group: str, mode: int) -> None:
        """A file written by another tool (mosquitto_passwd): record and fix its mode."""
        self.at(path).chmod(mode)
        self.placed.append(Placed(path, owner, group, mode))

    def apply_owners(self) -> list[str]:
        """chown what the tree's own passwd/group files name; return the names missing."""
        users, groups = _ids(self.root / "etc/passwd"), _ids(self.root / "etc/group")
        missing = sorted({n for p in self.placed for n, ids in ((p.owner, users),
                                                                (p.group, groups))
                          if n not in ids})
        for p in self.placed:
            if p.owner in users and p.group in groups:
                os.chown(self.at(p.path), users[p.owner], groups[p.group])
        return missing


def _ids(table: Path) -> dict[str, int]:
    """name -> id from an /etc/passwd or /etc/group file (of the target tree, not this host's)."""
    if not table.exists():
        return {}
    return {f[0]: int(f[2]) for f in (line.split(":") for line in table.read_text().splitlines())
            if len(f) > 2 and f[2].isdigit()}


def _password() -> str:
    return secrets.token_hex(32)


def render_config(example: str, node: str) -> str:
    """configs/edge.example.toml for this gateway: its node name and the agent's MQTT login."""
    out, n = re.subn(r'(?m)^node = "[^"]*"', f'node = "{node}"', example)
    out, m = re.subn(r'(?m)^username = "edge-agent-[^"]*"', f'username = "edge-agent-{node}"',
                     out)
    if n != 1 or m != 1:
        raise RuntimeError("configs/edge.example.toml changed: `node` or the [mqtt] username "
                           "line is not where init-gateway expects it")
    return out


def render_acl(example: str, node: str) -> str:
    """configs/aclfile.example with the agent block named after this gateway's agent."""
    out, n = re.subn(r"(?m)^user edge-agent-\S+$", f"user edge-agent-{node}", example)
    if n != 1:
        raise RuntimeError("configs/aclfile.example changed: no single agent `user` line")
    return out


def render_redis(example: str, agent_password: str, worker_password: str) -> str:
    """configs/redis.conf with the two ACL users' SHA-256 password hashes filled in."""
    for marker, pw in (("@AGENT_SHA256@", agent_password), ("@WORKER_SHA256@", worker_password)):
        if marker not in example:
            raise RuntimeError(f"configs/redis.conf changed: no {marker}")
        example = example.replace(marker, hashlib.sha256(pw.encode()).hexdigest())
    return example


def make_tls(names: list[str]) -> dict[str, bytes]:
    """A gateway CA and the broker's server certificate for `names` (DNS names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edge-gateway-ca"))
          .issuer_name(name("edge-gateway-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    server = (x509.CertificateBuilder().subject_name(name(names[0])).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=825))
              .add_extension(x509.SubjectAlternativeName(alt), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {"ca.key": pem_key(ca_key), "ca.crt": ca.public_bytes(pem),
            "server.key": pem_key(key), "server.crt": server.public_bytes(pem)}


def init_gateway(root: Path, node: str, bindir: Path | None = None,
                 tls_names: list[str] | None = None) -> Layout:
    """Lay the gateway out under `root` (see the module docstring); returns what was placed."""
    configs = units.data_dir("configs")
    units.install(root, bindir)
    if root == Path("/"):
        # the groups must exist before anything is handed to them
        subprocess.run(["systemd-sysusers", "/etc/sysusers.d/edge.conf"], check=True)
    lay = Layout(root)
    for path, owner, group, mode in DIRS:
        lay.directory(path, owner, group, mode)
    lay.file("/etc/edge/edge.toml", render_config(
        (configs / "edge.example.toml").read_text(), node), *SECRET)

    # Redis: the two users' passwords and the config holding their hashes go together.
    redis_files = ("/etc/edge/redis-agent", "/etc/edge/redis-worker", "/etc/redis/redis-edge.conf")
    fresh = not lay.exists(*redis_files)
    agent_pw, worker_pw = _password(), _password()
    lay.file(redis_files[0], agent_pw, *SECRET, replace=fresh)
    lay.file(redis_files[1], worker_pw, *SECRET, replace=fresh)
    lay.file(redis_files[2], render_redis((configs / "redis.conf").read_text(), agent_pw,
                                          worker_pw), "root", "redis", 0o640, replace=fresh)

    # Mosquitto: TLS listener, the broker's CA and certificate, ACL, the agent's login.
    tls = ("/etc/mosquitto/edge/ca.key", "/etc/mosquitto/edge/ca.crt",
           "/etc/mosquitto/edge/server.key", "/etc/mosquitto/edge/server.crt")
    fresh = not lay.exists(*tls)
    made = make_tls(tls_names or [socket.getfqdn(), "localhost", "127.0.0.1"]) if fresh else {}
    for path, owner, group, mode in zip(tls, ("root", "root", "mosquitto", "root"),
                                        ("root", "root", "mosquitto", "root"),
                                        (0o600, 0o644, 0o600, 0o644), strict=True):
        lay.file(path, made.get(Path(path).name, b""), owner, group, mode, replace=fresh)
    lay.file("/etc/edge/ca.crt", lay.at(tls[1]).read_bytes(), "root", "root", 0o644,
             replace=fresh)
    lay.file("/etc/mosquitto/conf.d/edge.conf", (configs / "mosquitto.conf").read_text(),
             "root", "root", 0o644)
    lay.file("/etc/mosquitto/edge/acl", render_acl(
        (configs / "aclfile.example").read_text(), node), "root", "mosquitto", 0o640)
    passwd = "/etc/mosquitto/edge/passwd"
    fresh = not lay.exists("/etc/edge/mqtt-password", passwd)
    mqtt_pw = _password()
    lay.file("/etc/edge/mqtt-password", mqtt_pw, *SECRET, replace=fresh)
    if fresh:
        add_mqtt_user(lay.at(passwd), f"edge-agent-{node}", mqtt_pw)
    lay.keep(passwd, "root", "mosquitto", 0o640)

    missing = lay.apply_owners()
    if missing and root == Path("/"):
        raise RuntimeError(f"no such users/groups: {', '.join(missing)} (apt-get install "
                           "redis-server mosquitto, then run init-gateway again)")
    return lay


def add_mqtt_user(passwd: Path, user: str, password: str) -> None:
    """Add (or reset) one broker login with Mosquitto's own tool."""
    create = [] if passwd.exists() else ["-c"]
    subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                   check=True, capture_output=True)


NEXT_STEPS = """\
left to do:
  1. bundles: copy the encrypted bundles into /var/lib/edge/bundles
       (chgrp -R edge /var/lib/edge/bundles; chmod -R g+rX,o-rwx /var/lib/edge/bundles)
  2. keyring credential for the workers (docs/keys.md), sealed on this gateway:
       systemd-creds encrypt --name=edge-keyring keyring.json /etc/edge/keyring.cred
  3. device accounts (username = device id), then reload the broker; give devices ca.crt:
       mosquitto_passwd -b /etc/mosquitto/edge/passwd DEVICE-ID PASSWORD
       systemctl reload mosquitto; cp /etc/edge/ca.crt <device>
  4. review /etc/edge/edge.toml (tasks, devices), then start:
       systemctl daemon-reload
       systemctl enable --now edge.target edge-agent edge-worker@CPU
"""


def main(root: str, node: str | None, bindir: str | None, tls_names: list[str]) -> int:
    """CLI body: lay out the gateway, list what was written, print what is left."""
    lay = init_gateway(Path(root), node or socket.gethostname().split(".")[0],
                       Path(bindir) if bindir else None, tls_names or None)
    for p in lay.placed:
        state = "wrote" if p.created else "kept "
        print(f"{state} {oct(p.mode)[2:]:>4} {p.owner}:{p.group} {p.path}")
    print(NEXT_STEPS, end="")
    return 0
