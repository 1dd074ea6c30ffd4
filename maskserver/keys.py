"""`mimpipe keys DIR`: CURVE key pairs for the mask server and its trainers (pyzmq zmq.auth).

Layout written:
    DIR/server.key               server public key (give to trainers)
    DIR/private/server.key_secret
    DIR/clients/client<i>.key    trainer public keys: the server admits exactly these
    DIR/private/client<i>.key_secret
Server: `mimpipe maskserver --curve DIR ...`; trainer: MaskClient(curve=(DIR/private/client0.key_secret,
DIR/server.key)). Removing a file from DIR/clients revokes that trainer (at the server's next start).
Secret keys must be readable by their owner only (mode 600): both ends refuse others.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import zmq.auth

from mimpipe.tools.argtypes import positive_int


def create_keys(root: str | os.PathLike, clients: int = 1, *, force: bool = False) -> Path:
    """Key pairs in root. A folder that already holds keys is refused unless force: trainers that
    were given its keys would be locked out. force replaces every key, stale client keys included."""
    root = Path(root)
    held = [p for p in (root / "server.key", root / "clients", root / "private") if p.exists()]
    if held and not force:
        raise ValueError(f"{root}: already holds keys ({', '.join(p.name for p in held)}); trainers holding "
                         f"them would be locked out. Pass --force to replace them all")
    for d in (root / "clients", root / "private"):
        if d.is_dir():
            shutil.rmtree(d)
    for d in (root, root / "clients", root / "private"):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(root / "private", 0o700)
    names = ["server"] + [f"client{i}" for i in range(clients)]
    for name in names:
        public, secret = zmq.auth.create_certificates(str(root / "private"), name)
        dest = root / ("server.key" if name == "server" else f"clients/{name}.key")
        shutil.move(public, dest)
        os.chmod(secret, 0o600)
    return root


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file that only its owner may read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such secret key file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path}: secret key is readable by group/others (mode {mode:o}); "
                         f"chmod 600 {path}")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path}: holds no secret key")
    return public, secret


def server_keys(root: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of the server, from DIR/private/server.key_secret."""
    path = Path(root) / "private" / "server.key_secret"
    if not path.is_file():
        raise ValueError(f"{path}: no server secret key (run `mimpipe keys {root}`)")
    return load_secret(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder for the keys")
    p.add_argument("--clients", type=positive_int, default=1, help="number of trainer key pairs")
    p.add_argument("--force", action="store_true", help="replace the keys of a folder that holds some")


def main(args: argparse.Namespace) -> int:
    root = create_keys(args.dir, args.clients, force=args.force)
    print(f"keys in {root}: server.key (public), clients/ ({args.clients} public), private/ (secrets)")
    return 0
