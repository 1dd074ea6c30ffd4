"""`mimpipe keys DIR`: CURVE key pairs for the mask server and its trainers (pyzmq zmq.auth).

Layout written:
    DIR/server.key               server public key (give to trainers)
    DIR/private/server.key_secret
    DIR/clients/client<i>.key    trainer public keys: the server admits exactly these
    DIR/private/client<i>.key_secret
Server: `mimpipe maskserver --curve DIR ...`; trainer: MaskClient(curve=(DIR/private/client0.key_secret,
DIR/server.key)). Removing a file from DIR/clients revokes that trainer (at the server's next start).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import zmq.auth


def create_keys(root: str | os.PathLike, clients: int = 1) -> Path:
    root = Path(root)
    for d in (root, root / "clients", root / "private"):
        d.mkdir(parents=True, exist_ok=True)
    names = ["server"] + [f"client{i}" for i in range(clients)]
    for name in names:
        public, secret = zmq.auth.create_certificates(str(root / "private"), name)
        dest = root / ("server.key" if name == "server" else f"clients/{name}.key")
        shutil.move(public, dest)
        os.chmod(secret, 0o600)
    return root


def server_keys(root: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of the server, from DIR/private/server.key_secret."""
    path = Path(root) / "private" / "server.key_secret"
    if not path.is_file():
        raise ValueError(f"{path}: no server secret key (run `mimpipe keys {root}`)")
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder for the keys")
    p.add_argument("--clients", type=int, default=1, help="number of trainer key pairs")


def main(args: argparse.Namespace) -> int:
    root = create_keys(args.dir, args.clients)
    print(f"keys in {root}: server.key (public), clients/ ({args.clients} public), private/ (secrets)")
    return 0
