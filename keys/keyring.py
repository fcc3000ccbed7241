"""The keyring: versioned key-encryption keys (KEKs), where they come from, how they rotate.

On disk it is JSON, `{"current": kid, "keys": {kid: base64}}`, readable by its owner only.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from keys import sealed
from keys._fs import write_private
from keys.errors import KeyringError

log = structlog.get_logger("keys")

KEY_BYTES = 32
_KID = re.compile(r"^k\d{8}-[0-9a-f]{6}$")


def new_key_id(taken: frozenset[str] | set[str] = frozenset()) -> str:
    """A fresh key id like `k20261124-1a2b3c`: the date says how old a key is at a glance."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    while True:
        kid = f"k{today}-{secrets.token_hex(3)}"
        if kid not in taken:
            return kid


class Keyring:
    """Key-encryption keys by id, one of them current (the one new wraps use)."""

    __slots__ = ("_keys", "_current")

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise KeyringError(f"keyring: current key {current} is not in the ring")
        self._keys = dict(keys)
        self._current = current

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(current={self._current!r}, ids={self.ids()!r})"

    # -- making and changing ------------------------------------------------------------

    @classmethod
    def generate(cls) -> Keyring:
        """A new ring with one random current key."""
        kid = new_key_id()
        return cls({kid: secrets.token_bytes(KEY_BYTES)}, kid)

    def rotate(self) -> str:
        """Add a new random key and make it current; return its id."""
        kid = new_key_id(set(self._keys))
        self._keys[kid] = secrets.token_bytes(KEY_BYTES)
        self._current = kid
        return kid

    def retire(self, kid: str) -> None:
        """Drop key `kid`; the current key cannot be retired (rotate first)."""
        if kid not in self._keys:
            raise KeyringError(f"keyring: no key {kid} (have {', '.join(self.ids())})")
        if kid == self._current:
            raise KeyringError(f"keyring: {kid} is the current key; rotate before retiring it")
        del self._keys[kid]

    # -- reading ------------------------------------------------------------------------

    @property
    def current_id(self) -> str:
        """The id new wraps are made under."""
        return self._current

    def ids(self) -> list[str]:
        """Every key id in the ring, oldest first (ids sort by date)."""
        return sorted(self._keys)

    def key(self, kid: str) -> bytes:
        """The key bytes for `kid`; KeyringError when the ring lacks it."""
        try:
            return self._keys[kid]
        except KeyError:
            raise KeyringError(f"keyring: no key {kid} (have {', '.join(self.ids())})") from None

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    # -- serialising --------------------------------------------------------------------

    def to_json(self) -> str:
        """The on-disk JSON form (holds key material: write it only 0600)."""
        keys = {kid: base64.b64encode(k).decode("ascii") for kid, k in sorted(self._keys.items())}
        return json.dumps({"current": self._current, "keys": keys}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Keyring:
        """Parse the JSON form; `source` names where it came from, for error messages."""
        try:
            doc = json.loads(text)
            current, raw = doc["current"], doc["keys"]
            keys = {str(kid): base64.b64decode(v, validate=True) for kid, v in raw.items()}
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise KeyringError(f"{source}: not a keyring ({type(exc).__name__}: {exc})") from None
        bad = sorted(kid for kid, k in keys.items() if len(k) != KEY_BYTES)
        if bad:
            raise KeyringError(f"{source}: key {bad[0]} is not {KEY_BYTES} bytes")
        if current not in keys:
            raise KeyringError(f"{source}: current key {current} is not in the ring")
        return cls(keys, current)

    def save(self, path: Path) -> None:
        """Write the ring to `path` (0600, temp file + fsync + rename)."""
        write_private(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def load_file(cls, path: Path) -> Keyring:
        """Load a key file; refuses one that group or others may read."""
        path = Path(path)
        try:
            st = os.stat(path)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyringError(
                    f"{path}: key file is accessible by group/others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
            text = path.read_text("utf-8")
        except OSError as exc:
            raise KeyringError(f"{path}: cannot read key file ({exc.strerror})") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_env_value(cls, text: str) -> Keyring:
        """Parse a ring given in an environment variable (development only; caller warns)."""
        return cls.from_json(text, "keyring from environment")

    def seal_for(self, recipient_public_key: X25519PublicKey,
                 signing_key: Ed25519PrivateKey) -> bytes:
        """This ring sealed to one gateway's X25519 public key and signed by the fleet key
        (safe to send over MQTT: only that gateway opens it, and only a pinned signer's ring
        is installed)."""
        return sealed.seal(self.to_json().encode("utf-8"), recipient_public_key, signing_key)

    @classmethod
    def open_sealed(cls, data: bytes, private_key: X25519PrivateKey,
                    pinned: Sequence[Ed25519PublicKey] = (),
                    allow_unsigned: bool = False) -> tuple[Keyring, sealed.SealInfo]:
        """Open a ring made by `seal_for` with the gateway's private key, after checking its
        signature against the `pinned` signers (see `keys.sealed.unseal` for what is refused)."""
        plain, info = sealed.unseal(data, private_key, pinned, allow_unsigned)
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyringError("sealed keyring: the ring inside is not UTF-8 JSON") from None
        return cls.from_json(text, "sealed keyring"), info

    @classmethod
    def from_sources(cls, credentials_dir: Path | None, file: Path | None,
                     env_value: str | None, credential_name: str = "edge-keyring") -> Keyring:
        """The ring every present source agrees on: systemd credential, key file (or its
        stamp), environment value; refuses when two disagree (see `keys.delivery.resolve`)."""
        from keys.delivery import resolve  # delivery builds on Keyring

        return resolve(credentials_dir, file, env_value, credential_name)


def load_ring(source: Any) -> Keyring:
    """The gateway's keyring from its sources: the systemd credential named
    `source.credential` (in $CREDENTIALS_DIRECTORY), the key file `source.file`, and (for
    development only, with a warning) the environment variable `source.env`. When more than
    one is present they must hold the same ring, else KeyringError names both.

    `source` is the daemon config's `[keyring]` section (edge.config.KeyringConfig).
    """
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    env_value = os.environ.get(source.env) if source.env else None
    if env_value and not creds and not (source.file and Path(source.file).exists()):
        log.warning("keyring_from_environment", variable=source.env,
                    note="for development only; use a systemd credential in production")
    return Keyring.from_sources(Path(creds) if creds else None, source.file, env_value,
                                credential_name=source.credential)
