"""The two errors `keys/` raises; each message is one line naming the file and the reason."""

from __future__ import annotations


class BundleError(Exception):
    """A bundle or one of its files cannot be opened, authenticated or written."""


class KeyringError(Exception):
    """A keyring cannot be found, loaded, parsed or changed as asked."""
