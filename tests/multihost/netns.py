"""Hosts for multi-host tests: Linux network namespaces joined by veth pairs, with addresses
only inside them, and the processes the tests run in them.

Every namespace, link and process made here is recorded and removed by `Hosts.close()` (by
name and by pid): nothing outside the namespaces is touched, and nothing outlives the test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def why_no_netns() -> str | None:
    """None when this process can make network namespaces and veth pairs, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    name = f"edge-probe-{secrets.token_hex(3)}"
    try:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
        done = subprocess.run(["ip", "-n", name, "link", "add", "pv0", "type", "veth",
                               "peer", "name", "pv1"], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot make a veth pair in a namespace: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Named hosts (network namespaces) and the links between them."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.namespaces: dict[str, str] = {}  # host -> namespace name
        self.procs: list[subprocess.Popen] = []

    def add(self, host: str) -> str:
        """A new host: its own namespace with loopback up."""
        ns = f"edge-mh-{self.tag}-{host}"
        _ip("netns", "add", ns)
        self.namespaces[host] = ns
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str, a_addr: str, b: str, b_addr: str) -> None:
        """A veth pair between hosts `a` and `b` with these addresses (CIDR), made inside `a`
        and moved into `b`: no end and no address ever sits in the test's own namespace."""
        ns_a, ns_b = self.namespaces[a], self.namespaces[b]
        end_a, end_b = f"v{self.tag}{a[:4]}{b[:4]}"[:15], f"v{self.tag}{b[:4]}{a[:4]}"[:15]
        _ip("-n", ns_a, "link", "add", end_a, "type", "veth", "peer", "name", end_b)
        _ip("-n", ns_a, "link", "set", end_b, "netns", ns_b)
        for ns, end, addr in ((ns_a, end_a, a_addr), (ns_b, end_b, b_addr)):
            _ip("-n", ns, "addr", "add", addr, "dev", end)
            _ip("-n", ns, "link", "set", end, "up")

    def route(self, host: str, dest: str, via: str) -> None:
        """A route on `host` to `dest` (CIDR) through the gateway address `via`."""
        _ip("-n", self.namespaces[host], "route", "add", dest, "via", via)

    def forward(self, host: str) -> None:
        """Let `host` route between its links."""
        subprocess.run(["ip", "netns", "exec", self.namespaces[host], "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, capture_output=True)

    def popen(self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.Popen:
        """Run `argv` on `host` (`ip netns exec` execs it: the pid is the program's)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv], cwd=cwd,
                                env={**os.environ, **(env or {})}, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def python(self, host: str, module: str, *args: str, log: Path, config: Path,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        """A daemon (`python -m module`) on `host`, configured by `config`."""
        full = {"EDGE_CONFIG": str(config), "PYTHONUNBUFFERED": "1",
                "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        return self.popen(host, [sys.executable, "-m", module, *args], log, full)

    def run(self, host: str, argv: list[str], timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` on `host` to completion."""
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *argv],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              input=input)

    def reachable(self, host: str, addr: str, port: int) -> bool:
        """Whether a TCP connection from `host` to addr:port succeeds now."""
        probe = (f"import socket; socket.create_connection(({addr!r}, {port}), timeout=0.5)"
                 ".close()")
        return self.run(host, [sys.executable, "-c", probe], timeout=10).returncode == 0

    def wait_reachable(self, host: str, addr: str, port: int, timeout: float,
                       proc: subprocess.Popen | None = None) -> None:
        """Poll until `reachable`, or raise (naming the service) past `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{addr}:{port}: the server exited with {proc.returncode}")
            if self.reachable(host, addr, port):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{addr}:{port} not reachable from {host} within {timeout} s")

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process running on `host` (a power cut), by pid; returns the pids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            if proc.pid in pids:
                proc.wait(10)
        return pids

    def pids(self, host: str) -> list[int]:
        """The pids of the processes in `host`'s namespace (all of them made by this test)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[host]],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then delete every namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for host in list(self.namespaces):
            for pid in self.pids(host):  # anything a process of ours left behind in there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", self.namespaces.pop(host)],
                           capture_output=True)


def make_certs(folder: Path, ips: list[str], names: tuple[str, ...] = ("server",)) -> None:
    """A CA (`ca.crt`) and, per name, `<name>.crt`/`<name>.key` valid for `ips` (EC P-256,
    one day): what the gateway's Redis and Mosquitto present to the other hosts."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*a: object) -> None:
        subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True)
    run("req", "-x509", *ec, "-keyout", folder / "ca.key", "-out", folder / "ca.crt",
        "-days", "1", "-subj", "/CN=edge-multihost-ca")
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips) + "\n")
    for name in names:
        run("req", "-new", *ec, "-keyout", folder / f"{name}.key", "-out",
            folder / f"{name}.csr", "-subj", f"/CN={ips[0]}")
        run("x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / "ca.crt", "-CAkey",
            folder / "ca.key", "-CAcreateserial", "-out", folder / f"{name}.crt", "-days", "1",
            "-extfile", ext)
