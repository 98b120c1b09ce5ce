"""``avloc keys --out DIR``: CURVE keypairs for an authenticated pipeline (``--keys DIR``; docs/protocol.md).

Writes ``server.key`` / ``server.key_secret`` (every binding socket), ``client.key`` / ``client.key_secret``
(every connecting socket) and ``authorized/client.key`` (the client public keys the ZAP authenticator admits;
add a third party's public key there to let it subscribe). The folder is 0700 and the secret files 0600.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avloc.stream.wire.security import make_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the keys (created, mode 0700)")
    parser.add_argument(
        "--force", action="store_true", help="replace keys already in --out (and drop every authorized client key)"
    )


def main(args: argparse.Namespace) -> int:
    paths = make_keys(args.out, args.force)
    print(
        f"CURVE keys in {args.out} (server: {paths['server'].name}, client: {paths['client'].name}); "
        f"use them with --keys {args.out}"
    )
    return 0
