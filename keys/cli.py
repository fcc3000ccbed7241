"""`keys` and `bundle` command groups for the operator CLI (`edgectl`).

`add_subcommands(subparsers, resolve)` registers them; each command's handler is set as
`func` (and `keys_func`) on its parser and returns an exit code. `resolve(args)` (or
`resolve()`) gives `(keyring_path, load_ring, bundle_dir, pinned_signer_path[, settings])`
from the config, `settings` being the `[keyring]` table (mode, credential, credential_file).
Never prints secret keys (a signing key's *public* half is printed to be pinned).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from keys.bundle import SUFFIX, ManifestCheck, bundle_dirs, open_all, pack_bundle, verify_bundle
from keys.delivery import (
    WITH_KEY_CHOICES,
    CredentialTool,
    SystemdCreds,
    digest,
    make_credential,
    save_key_file,
    write_stamp,
)
from keys.errors import BundleError, KeyringError
from keys.keyring import Keyring
from keys.legacy import import_openssl
from keys.rotation import bundles_needing, file_key_ids, rewrap_all, rotate_keyring
from keys.sealed import MAX_SEALED, load_private_key, load_public_key, write_identity
from keys.signer import fingerprint, load_pinned, load_signing_key, public_pem, write_signer

Resolved = tuple[Any, ...]
Resolve = Callable[..., Resolved]
log = structlog.get_logger("keys")


def credential_tool(with_key: str) -> CredentialTool:
    """The tool that makes host-bound credentials (tests replace this function)."""
    return SystemdCreds(with_key=with_key)


def add_subcommands(subparsers: argparse._SubParsersAction, resolve: Resolve,
                    check: ManifestCheck | None = None) -> None:
    """Register `keys generate|rotate|rewrap|retire|ls|identity|signer generate|seal|unseal|
    install` and `bundle pack|verify|ls|import-openssl`; `bundle pack|verify` run `check` on
    each manifest (the tasks' schema, which keys/ does not know)."""
    keys = subparsers.add_parser("keys", help="keyring: generate, rotate, retire, list")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser("generate", help="write a new keyring (refuses to overwrite)")
    p.add_argument("--out", type=Path, help="key file (default: the configured one)")
    _bind(p, resolve, _generate)
    p = ksub.add_parser("rotate", help="new current key, rewrap every bundle, refresh the "
                        "credential (single-gateway mode only)")
    p.add_argument("--scheduled", action="store_true",
                   help="run by the rotation timer: in fleet mode, log and do nothing")
    _with_key(p)
    _bind(p, resolve, _rotate)
    _bind(ksub.add_parser("rewrap", help="rewrap every bundle under the ring's current key "
                          "(a gateway after installing a rotated fleet ring)"), resolve, _rewrap)
    p = ksub.add_parser("retire", help="drop an old key no bundle needs any more (and "
                        "refresh the credential)")
    p.add_argument("kid")
    _with_key(p)
    _bind(p, resolve, _retire)
    _bind(ksub.add_parser("ls", help="key ids and how many files each wraps"), resolve, _keys_ls)
    p = ksub.add_parser("identity", help="new X25519 key pair for a gateway (OUT and OUT.pub)")
    p.add_argument("--out", type=Path, required=True, help="private key file (written 0600)")
    _bind(p, resolve, _identity)
    signer = ksub.add_parser("signer", help="the fleet signing key that sealed rings carry")
    ssub = signer.add_subparsers(dest="signer_command", required=True)
    p = ssub.add_parser("generate", help="new Ed25519 fleet signing key (OUT and OUT.pub)")
    p.add_argument("--out", type=Path, required=True,
                   help="private key file (written 0600; stays on the key host)")
    _bind(p, resolve, _signer_generate)
    p = ksub.add_parser("seal", help="seal the keyring to one gateway's public key, signed")
    p.add_argument("--recipient", type=Path, required=True, help="the gateway's OUT.pub")
    p.add_argument("--sign-key", type=Path, required=True,
                   help="the fleet signing key (from `keys signer generate`)")
    p.add_argument("--out", type=Path, required=True)
    _bind(p, resolve, _seal)
    p = ksub.add_parser("unseal", help="verify a sealed keyring's signature against the pinned "
                        "fleet signer, then install it as this gateway's key file")
    p.add_argument("sealed", type=Path)
    p.add_argument("--identity", type=Path, required=True, help="this gateway's private key")
    p.add_argument("--out", type=Path, help="key file (default: the configured one)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="development only: install a ring without a pinned signer's signature "
                        "(unsigned format-1 rings, or no `[keyring] signer` configured)")
    _bind(p, resolve, _unseal)
    p = ksub.add_parser("install", help="make this gateway's host-bound keyring credential "
                        "(systemd-creds) from the key file, or from a sealed fleet ring first")
    p.add_argument("sealed", type=Path, nargs="?",
                   help="a sealed fleet ring to unseal and install first (as `keys unseal`)")
    p.add_argument("--identity", type=Path, help="this gateway's private key (with SEALED)")
    p.add_argument("--allow-unsigned", action="store_true", help="as for `keys unseal`")
    p.add_argument("--credential", type=Path,
                   help="credential file (default: [keyring] credential_file)")
    _with_key(p)
    _bind(p, resolve, _install)

    bundle = subparsers.add_parser("bundle", help="encrypted model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    p = bsub.add_parser("pack", help="encrypt a prepared folder into the bundle directory")
    p.add_argument("dir", type=Path)
    p.add_argument("--name")
    p.add_argument("--out", type=Path, help="bundle root (default: the configured one)")
    p.set_defaults(manifest_check=check)
    _bind(p, resolve, _pack)
    p = bsub.add_parser("verify", help="authenticate every chunk (default: every bundle)")
    p.add_argument("dirs", type=Path, nargs="*")
    p.set_defaults(manifest_check=check)
    _bind(p, resolve, _verify)
    _bind(bsub.add_parser("ls", help="bundles, versions, sizes, key ids"), resolve, _bundle_ls)
    p = bsub.add_parser("import-openssl", help="import `openssl enc -aes-128-cbc` files")
    p.add_argument("src", type=Path)
    p.add_argument("--key", required=True, help="hex key, or - to read it from stdin")
    p.add_argument("--iv", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--task", required=True)
    _bind(p, resolve, _import)


def _bind(parser: argparse.ArgumentParser, resolve: Resolve,
          command: Callable[[argparse.Namespace, Resolved], int]) -> None:
    def run(args: argparse.Namespace) -> int:
        try:
            wants_args = len(inspect.signature(resolve).parameters) > 0
            return command(args, resolve(args) if wants_args else resolve())
        except (BundleError, KeyringError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    parser.set_defaults(func=run, keys_func=run)


def _with_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--with-key", choices=WITH_KEY_CHOICES, default="auto",
                   help="what binds the credential to this host (systemd-creds --with-key; "
                        "auto: TPM2 when present, else the host key)")


def _settings(resolved: Resolved) -> Any:
    """The `[keyring]` settings, or defaults for callers that resolve only four things."""
    if len(resolved) > 4 and resolved[4] is not None:
        return resolved[4]
    return argparse.Namespace(mode="single", credential="edge-keyring", credential_file=None)


def _key_file(resolved: Resolved) -> Path:
    path = resolved[0]
    if path is None:
        raise KeyringError("this command changes the keyring: configure a key file "
                           "(a credential or environment keyring cannot be rewritten)")
    return path


def _generate(args: argparse.Namespace, resolved: Resolved) -> int:
    out = args.out or _key_file(resolved)
    if out.exists():
        raise KeyringError(f"{out}: exists; refusing to overwrite a keyring")
    out.parent.mkdir(parents=True, exist_ok=True)
    ring = Keyring.generate()
    save_key_file(ring, out)
    print(f"wrote {out} (mode 0600), current key {ring.current_id}")
    if _settings(resolved).credential_file is not None:
        print("next: `edgectl keys install` makes the workers' credential from it")
    return 0


def _rotate(args: argparse.Namespace, resolved: Resolved) -> int:
    settings = _settings(resolved)
    if settings.mode == "fleet":
        why = ("[keyring] mode = \"fleet\": this gateway's ring comes sealed from the KMS, "
               "which alone makes keys; rotate there and `edgectl keys install` the new ring here")
        if args.scheduled:  # the timer: a no-op with a log line, not a failed unit each month
            log.info("key_rotation_skipped", reason=why)
            print(f"nothing done: {why}", file=sys.stderr)
            return 0
        raise KeyringError(f"refusing to make a new key: {why}")
    cred = settings.credential_file
    maker = None
    if cred is not None:
        tool = credential_tool(args.with_key)

        def maker(ring: Keyring):
            return make_credential(ring, cred, settings.credential, tool)
    kid, count = rotate_keyring(_key_file(resolved), resolved[2], maker)
    print(f"new current key {kid}; rewrapped {count} files under {resolved[2]}"
          + (f"; credential {cred} refreshed" if cred is not None else ""))
    print("restart the workers (reload is enough where they read the key file itself), then "
          "`keys retire` the old key ids")
    return 0


def _install(args: argparse.Namespace, resolved: Resolved) -> int:
    settings = _settings(resolved)
    cred = args.credential or settings.credential_file
    if cred is None:
        raise KeyringError("no credential file: pass --credential or set [keyring] "
                           "credential_file (e.g. /etc/edge/keyring.cred)")
    path = _key_file(resolved)
    if args.sealed is not None:
        if args.identity is None:
            raise KeyringError("installing a sealed ring needs --identity (this gateway's "
                               "private key)")
        ring, info = _open_checked(args, resolved)
    else:
        ring, info = Keyring.load_file(path), None
    # Made and checked (decrypted again here) before anything is replaced: a host that cannot
    # make a credential keeps its key file and credential as they were.
    pending = make_credential(ring, cred, settings.credential, credential_tool(args.with_key))
    try:
        if info is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_key_file(ring, path)
        else:
            write_stamp(path, ring)
    except BaseException:
        pending.discard()
        raise
    pending.commit()
    print(f"wrote {cred} (credential {settings.credential}, bound to this host with "
          f"--with-key={args.with_key}) from {path}: current key {ring.current_id}, "
          f"keys {', '.join(ring.ids())}, digest {digest(ring)}"
          + (f"; {info.describe()}" if info is not None else ""))
    print("next: `edgectl keys rewrap` if the current key changed, then "
          "`systemctl try-restart 'edge-worker@*'` (systemd hands a worker its credential at "
          "start only: a reload would see the old one)")
    return 0


def _rewrap(args: argparse.Namespace, resolved: Resolved) -> int:
    ring = resolved[1]()
    count = rewrap_all(resolved[2], ring)
    print(f"rewrapped {count} files under {resolved[2]} with key {ring.current_id}")
    return 0


def _retire(args: argparse.Namespace, resolved: Resolved) -> int:
    path = _key_file(resolved)
    needing = bundles_needing(resolved[2], args.kid)
    if needing:
        print(f"error: {args.kid} still wraps files of {len(needing)} bundle(s); "
              f"run `keys rotate` first:", file=sys.stderr)
        for bundle in needing:
            print(f"  {bundle}", file=sys.stderr)
        return 1
    ring = Keyring.load_file(path)
    ring.retire(args.kid)
    cred = _save_with_credential(ring, path, _settings(resolved), args.with_key)
    print(f"retired {args.kid}; keys left: {', '.join(ring.ids())}"
          + (f"; credential {cred} refreshed" if cred is not None else ""))
    return 0


def _save_with_credential(ring: Keyring, path: Path, settings: Any, with_key: str) -> Path | None:
    """Save the key file and, when one is configured, remake its credential in the same step
    (made and checked first, moved into place last); returns the credential path."""
    cred = settings.credential_file
    if cred is None:
        save_key_file(ring, path)
        return None
    pending = make_credential(ring, cred, settings.credential, credential_tool(with_key))
    try:
        save_key_file(ring, path)
    except BaseException:
        pending.discard()
        raise
    pending.commit()
    return cred


def _identity(args: argparse.Namespace, resolved: Resolved) -> int:
    pub = write_identity(args.out)
    print(f"wrote {args.out} (mode 0600) and {pub}; send only {pub.name} to the key host")
    return 0


def _signer_generate(args: argparse.Namespace, resolved: Resolved) -> int:
    pub = write_signer(args.out)
    key = load_signing_key(args.out)
    print(f"wrote {args.out} (mode 0600; keep it on the key host, never commit it) and {pub}")
    print(f"pin {pub.name} on every gateway (`signer = ...` under [keyring]); "
          f"fingerprint {fingerprint(key.public_key())}")
    sys.stdout.write(public_pem(key.public_key()).decode("ascii"))
    return 0


def _seal(args: argparse.Namespace, resolved: Resolved) -> int:
    signing_key = load_signing_key(args.sign_key)
    sealed = resolved[1]().seal_for(load_public_key(args.recipient), signing_key)
    args.out.write_bytes(sealed)  # safe to store and send: only the recipient opens it
    print(f"sealed the keyring for {args.recipient} into {args.out}, signed by "
          f"{fingerprint(signing_key.public_key())}")
    return 0


def _read_sealed(path: Path) -> bytes:
    """At most MAX_SEALED + 1 bytes of `path`: a huge file is refused, not read whole."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SEALED + 1)
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read the sealed keyring ({exc.strerror})") from None


def _open_checked(args: argparse.Namespace, resolved: Resolved):
    """Open `args.sealed` as `keys unseal` does: pinned signer, recipient, no missing key."""
    # The signature is checked against the pinned signer before anything is decrypted or
    # written; a refused ring leaves the installed key file as it was.
    pin = resolved[3]
    pinned = load_pinned(pin) if pin is not None else ()
    try:
        ring, info = Keyring.open_sealed(_read_sealed(args.sealed),
                                         load_private_key(args.identity), pinned,
                                         allow_unsigned=args.allow_unsigned)
    except KeyringError as exc:
        raise KeyringError(f"{args.sealed}: refused: {exc}") from None
    if not info.verified:
        print(f"warning: --allow-unsigned: installing a ring nobody vouched for "
              f"({info.describe()})", file=sys.stderr)
    # The fleet ring replaces the local one; a ring that lacks a key some local bundle still
    # needs would leave that bundle unreadable at the next reload, so it is refused.
    missing = sorted(k for k in _usage(resolved[2]) if k not in ring)
    if missing:
        raise KeyringError(f"{args.sealed}: the new keyring lacks {', '.join(missing)}, which "
                           f"bundles under {resolved[2]} still need; ship the ring before "
                           f"retiring keys, or rewrap the bundles first")
    return ring, info


def _unseal(args: argparse.Namespace, resolved: Resolved) -> int:
    ring, info = _open_checked(args, resolved)
    out = args.out or _key_file(resolved)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_key_file(ring, out)
    print(f"wrote {out} (mode 0600), current key {ring.current_id}, keys {', '.join(ring.ids())}"
          f"; {info.describe()}")
    if _settings(resolved).credential_file is not None:
        print("the credential is now older than the key file, and workers refuse to start "
              "until they agree: run `edgectl keys install`", file=sys.stderr)
    return 0


def _usage(root: Path) -> Counter[str]:
    uses: Counter[str] = Counter()
    for bundle in bundle_dirs(root):
        for path in bundle.rglob("*" + SUFFIX):
            try:
                uses.update(file_key_ids(path))
            except (BundleError, OSError):
                uses["(unreadable)"] += 1
    return uses


def _keys_ls(args: argparse.Namespace, resolved: Resolved) -> int:
    ring = resolved[1]()
    uses = _usage(resolved[2])
    for kid in ring.ids():
        mark = "*" if kid == ring.current_id else " "
        print(f"{mark} {kid}  files: {uses.pop(kid, 0)}")
    for kid, n in sorted(uses.items()):
        print(f"! {kid}  files: {n}  (not in the keyring)")
    return 0


def _pack(args: argparse.Namespace, resolved: Resolved) -> int:
    path = pack_bundle(args.dir, args.out or resolved[2], resolved[1](), name=args.name,
                       check=args.manifest_check)
    print(f"packed {path}")
    return 0


def _verify(args: argparse.Namespace, resolved: Resolved) -> int:
    ring, failed = resolved[1](), 0
    for path in args.dirs or bundle_dirs(resolved[2]):
        try:
            verify_bundle(path, ring, check=args.manifest_check)
            print(f"ok {path}")
        except BundleError as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _bundle_ls(args: argparse.Namespace, resolved: Resolved) -> int:
    opened, failed = open_all(resolved[2], resolved[1]())
    for b in opened:
        size = sum(b.file_path(n).stat().st_size for n in b.files)
        kids = set().union(*(file_key_ids(b.file_path(n)) for n in b.files)) if b.files else set()
        print(f"{b.id}  version {b.version}  {len(b.files)} files  "
              f"{size / 1e6:.1f} MB  keys {','.join(sorted(kids))}")
    for path, exc in failed:
        print(f"{path.relative_to(resolved[2])}  UNAVAILABLE: {exc}")
    return 1 if failed else 0


def _import(args: argparse.Namespace, resolved: Resolved) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    path = import_openssl(args.src, resolved[2], resolved[1](), key, args.iv,
                          name=args.name, task=args.task)
    print(f"imported {path}")
    return 0
