"""``avloc keys --out DIR``: CURVE keypairs for an authenticated pipeline (``--keys DIR``; docs/protocol.md).

Writes ``server.key`` / ``server.key_secret`` (every binding socket), ``client.key`` / ``client.key_secret``
(every connecting socket) and ``authorized/client.key`` (the client public keys the ZAP authenticator admits;
add a third party's public key there to let it subscribe). The folder is 0700 and the secret files 0600.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from avloc.core.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the keys (created, mode 0700)")
    parser.add_argument(
        "--force", action="store_true", help="replace keys already in --out (and drop every authorized client key)"
    )


def make_keys(out: Path, force: bool = False) -> dict[str, Path]:
    """Create the server and client keypairs in ``out``; returns their secret-key paths."""
    import zmq.auth

    from avloc.stream.wire.security import load_keys, private_dir

    if (out / "server.key_secret").exists() and not force:
        raise UserError(f"--out {out}: already holds keys (pass --force to replace them)")
    private_dir(out)
    authorized = private_dir(out / "authorized")
    # new keys replace the old ones everywhere: a client key authorized before (a third party's too) would
    # otherwise still be admitted by every pipeline using this folder
    for old in authorized.iterdir():
        if old.is_file() or old.is_symlink():
            old.unlink()
    paths = {}
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(out, name)
        Path(secret).chmod(0o600)
        paths[name] = Path(secret)
        if name == "client":
            shutil.copy(public, authorized / "client.key")
    load_keys(out)  # what the pipeline will read back
    return paths


def main(args: argparse.Namespace) -> int:
    paths = make_keys(args.out, args.force)
    print(
        f"CURVE keys in {args.out} (server: {paths['server'].name}, client: {paths['client'].name}); "
        f"use them with --keys {args.out}"
    )
    return 0
