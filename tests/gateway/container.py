"""A Debian 12 gateway booted with a real systemd as PID 1 (systemd-nspawn), for tests.

Three layers, the first two cached under ~/.cache/edge-gateway (rebuilt when missing):
* `base`: `debootstrap --variant=minbase` bookworm with systemd, Redis, Mosquitto, python3-venv;
* `ready`: base + /opt/edge/venv holding the project's runtime dependencies, installed offline
  from a wheelhouse that `pip download` filled on this host;
* per test: a copy of `ready` with this checkout's wheel installed, booted with
  `systemd-nspawn -b --private-network` (loopback only inside) and driven with `nsenter` into
  the container's namespaces. Nothing here talks to the host's PID 1 or its services; the
  nspawn process is ended by its pid.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CACHE = Path.home() / ".cache" / "edge-gateway"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("systemd", "systemd-sysv", "dbus", "redis-server", "mosquitto", "mosquitto-clients",
            "python3-venv", "openssl", "ca-certificates", "procps")
VENV = "/opt/edge/venv"
PATH = "/opt/edge/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def why_not() -> str | None:
    """Why a container cannot be booted on this machine, or None."""
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install debootstrap systemd-container)"
    if os.geteuid() != 0:
        return "booting a container needs root (namespaces, mounts, chroot)"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no permission to make namespaces: {probe.stderr.strip()[:200]}"
    return None


def mirror() -> str:
    """The Debian mirror this host's apt uses (not the security archive, not third parties)."""
    found = []
    for src in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if src.is_file() and src.suffix in (".list", ".sources"):
            found += re.findall(r"(?m)(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)",
                                src.read_text())
    debian = [u for u in found if "/debian" in u and "security" not in u]
    return debian[0] if debian else "http://deb.debian.org/debian"


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _cached(name: str, build) -> Path:
    """CACHE/name, built into a temporary folder and renamed when complete."""
    done = CACHE / name
    if done.is_dir():
        return done
    tmp = CACHE / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    CACHE.mkdir(parents=True, exist_ok=True)
    build(tmp)
    tmp.rename(done)
    return done


def base_rootfs() -> Path:
    def build(tmp: Path) -> None:
        try:
            subprocess.run(["debootstrap", "--variant=minbase",
                            "--include=" + ",".join(PACKAGES), "bookworm", str(tmp), mirror()],
                           check=True, capture_output=True)
        finally:
            # debootstrap can leave the host's /proc mounted in the target (seen here): a copy
            # of the tree would then descend into it (/proc/kcore...) and fill the disk
            unmount_below(tmp)
    return _cached(f"rootfs-{_key(PACKAGES)}", build)


def unmount_below(path: Path) -> None:
    """Unmount whatever is mounted inside `path` (deepest first); `path` itself is left."""
    prefix = str(path.resolve()) + "/"
    targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def copy_tree(src: Path, dst: Path) -> None:
    """`cp -a` that never crosses into a file system mounted inside `src` (-x)."""
    unmount_below(src)
    subprocess.run(["cp", "-a", "-x", f"{src}/.", str(dst)], check=True)


def runtime_requirements() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # Debian 12's Python is 3.11.2: redis-py wants async-timeout below 3.11.3, and the wheel
    # house is filled by this host's (newer) Python, whose markers skip it.
    return [*deps, "async-timeout>=4.0.3"]


def wheelhouse() -> Path:
    """The runtime dependencies as wheels (this host's Python is the container's: 3.11)."""
    reqs = runtime_requirements()

    def build(tmp: Path) -> None:
        # `pip wheel`, not `download`: pyvips ships as an sdist only; its wheel is built here
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(tmp), *reqs],
                       check=True, capture_output=True)
    return _cached(f"wheelhouse-{_key(reqs)}", build)


def nspawn_run(rootfs: Path, command: str, binds: dict[Path, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """One command in the rootfs, no boot, no network."""
    args = ["systemd-nspawn", "-q", "-D", str(rootfs), "--register=no", "--keep-unit",
            "--console=pipe", "--private-network"]
    args += [f"--bind-ro={src}:{dst}" for src, dst in (binds or {}).items()]
    return subprocess.run([*args, "/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=timeout, check=False)


def ready_rootfs() -> Path:
    base, wheels = base_rootfs(), wheelhouse()
    reqs = runtime_requirements()

    def build(tmp: Path) -> None:
        tmp.mkdir()
        copy_tree(base, tmp)
        quoted = " ".join(f"'{r}'" for r in reqs)
        done = nspawn_run(tmp, f"python3 -m venv {VENV} && {VENV}/bin/pip install -q "
                               f"--no-index --find-links /wheelhouse {quoted}",
                          {wheels: "/wheelhouse"})
        if done.returncode != 0:
            raise RuntimeError(f"venv in the rootfs: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return _cached(f"ready-{_key(base.name, wheels.name)}", build)


class Gateway:
    """A booted container: `run()` executes a shell command inside it, as root."""

    def __init__(self, rootfs: Path, binds: dict[Path, str]) -> None:
        self.rootfs = rootfs
        self.binds = binds
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> Gateway:
        args = ["systemd-nspawn", "-q", "-D", str(self.rootfs), "--register=no", "--keep-unit",
                "--console=pipe", "--private-network", "-b"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        log = open(self.rootfs.parent / "nspawn.log", "wb")  # noqa: SIM115 - kept for the run
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited {self.proc.returncode}: "
                                   + (self.rootfs.parent / "nspawn.log").read_text()[-2000:])
            self.leader = _systemd_child(self.proc.pid)
            time.sleep(0.2)
        if not self.leader:
            raise RuntimeError("no systemd inside the container")
        state = self.run("systemctl is-system-running --wait", check=False,
                         timeout=max(1.0, deadline - time.monotonic()))
        if state.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"container did not boot: {state.stdout}{state.stderr}")
        return self

    def run(self, command: str, check: bool = True, timeout: float = 300,
            ) -> subprocess.CompletedProcess:
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c",
                               command], capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}"
                                 f"\n{done.stderr[-3000:]}")
        return done

    def shutdown(self) -> None:
        """poweroff inside; the nspawn process (ours, by pid) is killed if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.leader:
            self.run("systemctl poweroff --no-block", check=False, timeout=30)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # nspawn halts its container
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _systemd_child(pid: int) -> int:
    """The container's PID 1 as the host sees it: the child of nspawn running systemd."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
    return 0
