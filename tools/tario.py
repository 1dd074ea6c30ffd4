"""Byte-reproducible tar shards and their DALI index, written in one pass.

We write the tar stream ourselves (headers from `tarfile.TarInfo.tobuf`, fixed mtime/uid/gid/mode)
instead of going through `tarfile.TarFile.addfile`, because then every member's offset is known
before the shard is written: the shard layout, the DALI index and the sample table all come from
the same arithmetic, and the index equals what `wds2idx` computes from the finished tar.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterable

BLOCK = 512
RECORD = 20 * BLOCK     # tarfile's default blocking factor: a finished tar is a multiple of this
MTIME = 0               # fixed member metadata makes shards byte-reproducible


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def sample_members(key: str, parts: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Members of one sample in the order webdataset's ShardWriter uses (sorted extensions)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    return [(f"{key}.{ext}", parts[ext]) for ext in sorted(parts)]


def member_sizes_bytes(sizes: Iterable[int]) -> int:
    """Bytes a run of members with these data sizes occupies inside a tar."""
    return sum(BLOCK + padded(s) for s in sizes)


def finished_size(body: int) -> int:
    """Size of a finished tar whose members take `body` bytes (end marker + record padding)."""
    return -(-(body + 2 * BLOCK) // RECORD) * RECORD


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> list[list[tuple]]:
    """Write a shard under a temporary name, fsync, and rename it into place.

    Returns, per sample, [(ext, data_offset, size, member_name), ...] for the index. A crash leaves
    only `path.tmp`, never a file under the final name that looks finished.
    """
    tmp = path.with_name(path.name + ".tmp")
    entries, pos = [], 0
    with open(tmp, "wb") as f:
        for key, parts in samples:
            bundle = []
            for name, data in sample_members(key, parts):
                f.write(header(name, len(data)))
                pos += BLOCK
                bundle.append((name.split(".", 1)[1], pos, len(data), name))
                f.write(data)
                f.write(b"\0" * (padded(len(data)) - len(data)))
                pos += padded(len(data))
            entries.append(bundle)
        end = finished_size(pos)
        f.write(b"\0" * (end - pos))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return entries


def index_text(entries: list[list[tuple]]) -> str:
    """DALI webdataset index v1.2, byte for byte as `wds2idx` writes it."""
    lines = [f"v1.2 {len(entries)}"]
    lines += [" ".join(" ".join(map(str, c)) for c in bundle) for bundle in entries]
    return "\n".join(lines) + "\n"
