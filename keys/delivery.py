"""How a keyring reaches a worker: its sources, the check that they agree, the credential.

A gateway may hold its ring in up to three places: the systemd credential the worker is
given (`LoadCredentialEncrypted=`), the key file (`[keyring] file`, root's 0600 master copy)
and, for development, an environment variable. A copy left behind by an install or a rotation
must never be the one a worker serves with, so `resolve` loads every source that is present
and refuses to start when two of them hold different rings, naming both.

A worker usually cannot read the key file itself (root, 0600). Every write of a key file
therefore writes a public *stamp* beside it first (`keyring.json.digest`, 0644: the current
key id, the key ids and a digest of the ring; no key material), and a worker that cannot read
the file compares the credential with the stamp instead.

The credential is made on the gateway itself, by `systemd-creds encrypt` (host key and/or
TPM2), because a credential made elsewhere is bound to the host that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from keys._fs import fsync_dir
from keys.errors import KeyringError
from keys.keyring import Keyring

STAMP_SUFFIX = ".digest"
WITH_KEY_CHOICES = ("auto", "host", "tpm2", "host+tpm2")
_DIGEST_CONTEXT = b"edge-keyring-digest/1\0"


def digest(ring: Keyring) -> str:
    """A short public name for the ring's exact content (ids, current id and keys).

    SHA-256 over 256-bit random keys reveals nothing usable about them; 16 hex digits are
    enough to tell two rings apart in a log line.
    """
    return hashlib.sha256(_DIGEST_CONTEXT + ring.to_json().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Summary:
    """What a source says about its ring, without key material."""

    source: str  # "credential /run/credentials/…/edge-keyring", "key file …", …
    current: str
    digest: str

    def describe(self) -> str:
        """One line for a refusal: where, which current key, which digest."""
        return f"{self.source} (current key {self.current}, digest {self.digest})"


def summarize(ring: Keyring, source: str) -> Summary:
    """The summary of a ring loaded from `source`."""
    return Summary(source, ring.current_id, digest(ring))


# -- the stamp beside a key file ----------------------------------------------------------


def stamp_path(key_file: Path) -> Path:
    """Where the public stamp of `key_file` lives."""
    return Path(key_file).with_name(Path(key_file).name + STAMP_SUFFIX)


def write_stamp(key_file: Path, ring: Keyring) -> None:
    """Write `key_file`'s stamp (0644, atomic). Called *before* the key file is replaced, so a
    crash in between leaves stamp and credential disagreeing: workers refuse, never serve a
    stale ring."""
    path = stamp_path(key_file)
    doc = {"current": ring.current_id, "ids": ring.ids(), "digest": digest(ring)}
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(doc) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # whatever the umask: workers of another user read it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_stamp(key_file: Path) -> Summary | None:
    """The stamp of `key_file`, or None when there is none."""
    path = stamp_path(key_file)
    try:
        doc = json.loads(path.read_text("utf-8"))
        return Summary(f"key file {key_file} (by its stamp {path.name})", str(doc["current"]),
                       str(doc["digest"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyringError(f"{path}: unreadable keyring stamp ({type(exc).__name__}: {exc}); "
                           f"run `edgectl keys install` to rewrite it") from None


def save_key_file(ring: Keyring, key_file: Path) -> None:
    """Install `ring` as the key file: stamp first, then the file (both atomic)."""
    write_stamp(key_file, ring)
    ring.save(key_file)


# -- resolving the sources ---------------------------------------------------------------


def resolve(credentials_dir: Path | None, key_file: Path | None, env_value: str | None,
            credential_name: str = "edge-keyring") -> Keyring:
    """The ring a worker serves with. Every present source is read: credential, key file
    (or its stamp when this process may not read the file), environment value. They must all
    hold the same ring; when two differ it refuses, naming both. With several, the ring
    comes from the first in that order (they are equal anyway)."""
    found: list[tuple[Summary, Keyring | None]] = []
    tried: list[str] = []
    if credentials_dir is not None:
        cred = Path(credentials_dir) / credential_name
        if cred.is_file():
            # systemd owns the access control of $CREDENTIALS_DIRECTORY (ramfs, 0400,
            # service user only), so its mode is not second-guessed here.
            try:
                text = cred.read_text("utf-8")
            except OSError as exc:
                raise KeyringError(f"{cred}: cannot read credential ({exc.strerror})") from None
            ring = Keyring.from_json(text, str(cred))
            found.append((summarize(ring, f"credential {cred}"), ring))
        else:
            tried.append(f"credential {cred}")
    if key_file is not None:
        key_file = Path(key_file)
        if _present(key_file):
            found.append(_key_file_source(key_file, others=bool(found) or bool(env_value)))
        else:
            tried.append(f"key file {key_file}")
    if env_value:
        ring = Keyring.from_env_value(env_value)
        found.append((summarize(ring, "the keyring environment variable"), ring))
    else:
        tried.append("environment value")
    rings = [ring for _, ring in found if ring is not None]
    if not rings:
        raise KeyringError(f"no keyring found (tried {', '.join(tried)})")
    first = found[0][0]
    for summary, _ in found[1:]:
        if summary.digest != first.digest:
            raise KeyringError(
                f"keyring sources disagree: {first.describe()} vs {summary.describe()}; "
                f"refusing to serve a possibly stale ring: if the credential file is older, "
                f"run `edgectl keys install` on the gateway; then restart the worker (systemd "
                f"hands a service its credential at start only, a reload sees the old one; "
                f"docs/keys.md, \"Where a worker gets its ring\")")
    return rings[0]


def _present(path: Path) -> bool:
    """Whether `path` exists; a folder this process may not search counts as "exists but
    unreadable" (never as absent, which would skip the comparison)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except PermissionError:
        return True
    return True


def _key_file_source(key_file: Path, others: bool) -> tuple[Summary, Keyring | None]:
    if os.access(key_file, os.R_OK) or not others:
        ring = Keyring.load_file(key_file)  # refuses a group/world readable file
        return summarize(ring, f"key file {key_file}"), ring
    # The usual case under systemd: the worker's user may not read root's master copy.
    stamp = read_stamp(key_file)
    if stamp is None:
        raise KeyringError(f"{key_file}: exists but this process may not read it, and it has "
                           f"no stamp ({stamp_path(key_file).name}) to check the other keyring "
                           f"source against; run `edgectl keys install` on the gateway")
    return stamp, None


# -- the host-bound credential -----------------------------------------------------------


class CredentialTool(Protocol):
    """What makes and opens a host-bound credential (systemd-creds; a fake in tests)."""

    def encrypt(self, name: str, plaintext: bytes, out: Path) -> None:
        """Encrypt `plaintext` as credential `name` into the file `out`."""

    def decrypt(self, name: str, path: Path) -> bytes:
        """Decrypt credential `name` from the file `path`."""


@dataclass(frozen=True, slots=True)
class SystemdCreds:
    """`systemd-creds` on this host: the plaintext goes through a pipe, never a file."""

    with_key: str = "auto"  # auto = tpm2 when the host has one, else the host key
    binary: str = "systemd-creds"

    def _run(self, verb: str, argv: list[str], stdin: bytes | None) -> bytes:
        argv = [*argv[:-2], verb, *argv[-2:]]
        try:
            done = subprocess.run([self.binary, *argv], input=stdin, capture_output=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeyringError(f"{self.binary}: cannot run ({exc})") from None
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise KeyringError(f"{self.binary} {verb} failed (exit {done.returncode}): "
                               f"{err[-1] if err else 'no message'}")
        return done.stdout

    def encrypt(self, name: str, plaintext: bytes, out: Path) -> None:
        """`systemd-creds encrypt --with-key=… --name=NAME - OUT`."""
        self._run("encrypt", [f"--with-key={self.with_key}", f"--name={name}", "-", str(out)],
                  plaintext)

    def decrypt(self, name: str, path: Path) -> bytes:
        """`systemd-creds decrypt --name=NAME PATH -`."""
        return self._run("decrypt", [f"--name={name}", str(path), "-"], None)


@dataclass(frozen=True, slots=True)
class PendingCredential:
    """A credential made and checked beside its final path, not yet in place."""

    tmp: Path
    final: Path

    def commit(self) -> None:
        """Move it into place (atomic rename, directory fsync)."""
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)

    def discard(self) -> None:
        """Remove it (the step that needed it failed)."""
        self.tmp.unlink(missing_ok=True)


def make_credential(ring: Keyring, final: Path, name: str, tool: CredentialTool) -> PendingCredential:
    """Encrypt `ring` as credential `name` next to `final`, decrypt it again on this host and
    check it holds exactly `ring`; the caller commits it when the rest of its step is done."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    pending = PendingCredential(final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}"),
                                final)
    try:
        tool.encrypt(name, ring.to_json().encode("utf-8"), pending.tmp)
        os.chmod(pending.tmp, 0o600)
        back = Keyring.from_json(tool.decrypt(name, pending.tmp).decode("utf-8", "replace"),
                                 f"credential {pending.tmp}")
    except BaseException:
        pending.discard()
        raise
    if digest(back) != digest(ring):
        pending.discard()
        raise KeyringError(f"{final}: the credential just made does not decrypt to the ring "
                           f"it was made from ({digest(back)} != {digest(ring)})")
    return pending
