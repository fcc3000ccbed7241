"""Encrypted model bundles and the keyring that opens them. Knows nothing of tasks."""

from keys.bundle import Bundle, open_all, pack_bundle, verify_bundle
from keys.errors import BundleError, KeyringError
from keys.keyring import Keyring, load_ring
from keys.legacy import import_openssl
from keys.rotation import bundles_needing, rewrap_bundle

__all__ = [
    "Bundle",
    "BundleError",
    "Keyring",
    "KeyringError",
    "bundles_needing",
    "import_openssl",
    "load_ring",
    "open_all",
    "pack_bundle",
    "rewrap_bundle",
    "verify_bundle",
]
