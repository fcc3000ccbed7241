"""No model plaintext reaches the disk: every file a serving worker writes is scanned for it.

The worker runs under `strace -f`, which records every path it (or any of its threads and
children) opens for writing, creates, renames or links. After it has loaded the bundles and
answered jobs, each of those files, and everything new in its TMPDIR and ~/.cache, is searched
for the plaintext of the prepared tokenizer IRs (XML header, 64-byte windows of XML and weights).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge import constants as C
from edgectl.localdaemon import ROOT, Daemon
from tests.conftest import PREPARED
from tests.keysops.conftest import TOKENIZERS, find_plaintext, plaintext_signatures

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")]

_SYSCALLS = "openat,open,creat,rename,renameat,renameat2,link,linkat,write"
_WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT")
# `-y` prints a dirfd as 3</dir>; the path argument is the quoted string after it.
_DIRFD = r'(?:AT_FDCWD(?:<[^>]*>)?|\d+<(?P<dir>[^>]*)>), '
_OPEN = re.compile(r'\b(?:openat|open)\((?:' + _DIRFD + r')?"(?P<path>[^"]*)", '
                   r'(?P<flags>[A-Z_|0-9]+)')
_NAMED = re.compile(r'\b(?:creat|rename|renameat2?|link|linkat)\((?P<args>.*)')
_QUOTED = re.compile(r'(?:' + _DIRFD + r')?"(?P<path>[^"]*)"')


def written_paths(trace: str, cwd: Path) -> tuple[set[Path], int]:
    """Paths the traced processes opened for writing or created by name; and opens seen."""
    paths, opens = set(), 0
    for line in trace.splitlines():
        m = _OPEN.search(line)
        if m:
            opens += 1
            if _WRITE_FLAGS.search(m["flags"]):
                paths.add(_resolve(m["dir"], m["path"], cwd))
            continue
        m = _NAMED.search(line)
        if m:  # every name a creat/rename/link touches, source and target
            paths.update(_resolve(q["dir"], q["path"], cwd) for q in _QUOTED.finditer(m["args"]))
    return paths, opens


def _resolve(dirfd: str | None, path: str, cwd: Path) -> Path:
    return Path(path) if path.startswith("/") else Path(dirfd or cwd) / path


def _same_device(path: Path, device: int) -> bool:
    try:
        return path.lstat().st_dev == device
    except OSError:
        return False


def _new_files(root: Path, since: float, skip: Path | None = None) -> list[Path]:
    found = []
    device = root.stat().st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
        # another filesystem mounted below (a container's /proc, a tmpfs) is not the disk
        dirnames[:] = [d for d in dirnames if _same_device(Path(dirpath) / d, device)]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if path.is_file() and path.stat().st_mtime >= since:
                    found.append(path)
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory, tokenizer_bundles, keyring_file):
    """A daemon whose worker ran under strace, loaded every bundle and answered jobs."""
    work = tmp_path_factory.mktemp("traced")
    tmpdir = work / "worker-tmp"
    tmpdir.mkdir()
    trace = work / "worker.strace"
    started = time.time() - 1  # mtimes have coarse granularity on some file systems
    daemon = Daemon(work, tokenizer_bundles, keyring_file)
    env = dict(os.environ, EDGE_CONFIG=str(daemon.config), PYTHONUNBUFFERED="1", TMPDIR=str(tmpdir))
    log = open(work / "worker-CPU.log", "ab")
    proc = subprocess.Popen(["strace", "-f", "-y", "-qq", "--seccomp-bpf", "-e",
                             f"trace={_SYSCALLS}", "-o", str(trace), sys.executable, "-m",
                             "workers.worker", "--device", "CPU"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        daemon.wait_worker("edge.tokenize.CPU", proc, timeout=300)
        daemon.start_agent()
        with daemon.device("dev-trace") as dev:
            answers = [dev.request("tokenize", text="plaintext stays in memory",
                                   params={"model": m}) for m in TOKENIZERS]
            answers.append(dev.request("detokenize", ids=[101, 102],
                                       params={"model": "all-minilm-l6-v2"}))
        # Stop the worker itself (not strace) so that it exits the way systemd stops it.
        names = [k.decode() for k in daemon.conn.keys(C.WORKER_KEY.format(worker="*"))]
        pid = json.loads(daemon.conn.get(names[0]))["pid"]
        os.kill(pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        daemon.stop()
        log.close()
    return {"answers": answers, "trace": trace.read_text(errors="replace"), "tmpdir": tmpdir,
            "started": started, "workdir": work, "bundles": tokenizer_bundles}


def test_signatures_find_plaintext_where_it_is():
    # The scanner's positive control: it must see the plaintext in the prepared folders.
    sigs = plaintext_signatures()
    for name in TOKENIZERS:
        folder = PREPARED / f"tokenizer-{name}"
        for path in folder.glob("*.bin"):
            assert find_plaintext(path, sigs), path
        assert "IR XML header" in find_plaintext(folder / "tokenizer_plain.xml", sigs)


def test_trace_parser_sees_writes_creates_and_renames(tmp_path):
    trace = "\n".join([
        '7 openat(AT_FDCWD</w>, "rel/a", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3</w/rel/a>',
        '7 openat(AT_FDCWD</w>, "/x/read-only", O_RDONLY|O_CLOEXEC) = 3</x/read-only>',
        '8 openat(5</d>, "b", O_RDWR|O_CLOEXEC <unfinished ...>',
        '8 renameat2(AT_FDCWD</w>, "/t/.tmp", AT_FDCWD</w>, "/t/final", RENAME_NOREPLACE) = 0',
        '9 creat("/c", 0600) = 4</c>'])
    paths, opens = written_paths(trace, Path("/w"))
    assert opens == 3
    assert paths == {Path("/w/rel/a"), Path("/d/b"), Path("/t/.tmp"), Path("/t/final"),
                     Path("/c")}


def test_no_file_the_worker_wrote_holds_model_plaintext(traced_run):
    assert all(a.ok for a in traced_run["answers"]), [a.body for a in traced_run["answers"]]
    paths, opens = written_paths(traced_run["trace"], ROOT)
    # The trace really covers the load: the worker opened every encrypted file it decrypted.
    encrypted = {str(p) for p in traced_run["bundles"].rglob("*.enc")}
    assert opens > 100 and all(p in traced_run["trace"] for p in encrypted)
    sigs = plaintext_signatures()
    leaks, vanished = {}, []
    paths.add(traced_run["workdir"] / "worker-CPU.log")  # its stdout/stderr: inherited, not opened
    for path in sorted(paths):
        if str(path).startswith(("/dev/", "/proc/", "/sys/")) or path.is_dir():
            continue
        if not path.exists():
            vanished.append(path)  # written then deleted: cannot be scanned after the fact
            continue
        hits = find_plaintext(path, sigs)
        if hits:
            leaks[str(path)] = hits[:3]
    assert leaks == {}
    assert vanished == [], f"files written and deleted during the run (unscannable): {vanished}"


def test_temp_and_cache_dirs_hold_no_model_plaintext(traced_run):
    sigs = plaintext_signatures()
    tmp_files = _new_files(traced_run["tmpdir"], 0)
    cache_files = _new_files(Path.home() / ".cache", traced_run["started"], skip=PREPARED)
    leaks = {str(p): find_plaintext(p, sigs) for p in tmp_files + cache_files}
    assert {p: h for p, h in leaks.items() if h} == {}
    assert tmp_files == [], f"the worker left files in its TMPDIR: {tmp_files}"
