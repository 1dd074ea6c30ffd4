"""`mimpipe keys DIR`: CURVE key pairs for the mask server and its trainers (pyzmq zmq.auth).

Layout written:
    DIR/server.key               server public key (give to trainers)
    DIR/private/server.key_secret
    DIR/clients/client<i>.key    trainer public keys: the server admits exactly these
    DIR/private/client<i>.key_secret
Server: `mimpipe maskserver --curve DIR ...`; trainer: `mimpipe train --curve DIR ...`, where
rank r uses DIR/private/client{r % n}.key_secret of the n client secrets that folder holds
(`client_curve`): give every trainer host the whole folder, or only its own secret and server.key
(n = 1: every rank of that host uses it). Removing a file from DIR/clients revokes that trainer
(at the server's next start). Secret keys must be readable by their owner only (mode 600): both
ends refuse others. The server logs every refused login with the key (`KeyList`).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import time
from pathlib import Path

import zmq.auth

from mimpipe.tools.argtypes import positive_int

log = logging.getLogger("mimpipe.maskserver")


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


def client_curve(root: str | os.PathLike, rank: int) -> tuple[str, str]:
    """(secret key file, server public key file) of trainer rank `rank`: the (rank % n)-th of the n
    DIR/private/client<i>.key_secret, in order of i."""
    root = Path(root)
    secrets = sorted((int(m.group(1)), p) for p in (root / "private").glob("client*.key_secret")
                     if (m := re.fullmatch(r"client(\d+)\.key_secret", p.name)))
    if not secrets:
        raise ValueError(f"--curve {root}: no client secret keys in {root / 'private'} (run `mimpipe keys {root}` "
                         f"and copy its private/client<i>.key_secret here)")
    server = root / "server.key"
    if not server.is_file():
        raise ValueError(f"--curve {root}: no {server} (the server's public key)")
    return str(secrets[rank % len(secrets)][1]), str(server)


class KeyList:
    """The server's ZAP credentials provider (zmq.auth configure_curve_callback): admits the public
    keys in DIR/clients and logs each refused login with the key, at most once per key every
    `quiet` seconds (a refused DEALER retries forever), with the count of refusals in between."""

    def __init__(self, clients: Path, quiet: float = 10.0):
        self.clients, self.quiet = clients, quiet
        self.allowed = set(zmq.auth.load_certificates(str(clients)))
        self.refused: dict[bytes, list] = {}  # key -> [count since logged, last logged]

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        now = time.monotonic()
        seen = self.refused.setdefault(key, [0, -self.quiet])
        seen[0] += 1
        if now - seen[1] >= self.quiet:
            log.warning("CURVE login refused: client key %s is not in %s (%d refusals)", key.decode(),
                        self.clients, seen[0])
            seen[:] = [0, now]
        if len(self.refused) > 10000:  # bounded memory under a flood of made-up keys
            self.refused.clear()
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder for the keys")
    p.add_argument("--clients", type=positive_int, default=1, help="number of trainer key pairs")
    p.add_argument("--force", action="store_true", help="replace the keys of a folder that holds some")


def main(args: argparse.Namespace) -> int:
    root = create_keys(args.dir, args.clients, force=args.force)
    print(f"keys in {root}: server.key (public), clients/ ({args.clients} public), private/ (secrets)")
    return 0
