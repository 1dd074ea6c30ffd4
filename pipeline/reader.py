"""Encoded sample bytes by (shard, offset, size): positional reads on a small thread pool.

`os.pread` releases the GIL and needs no seek, so one open file per shard serves every thread;
`prefetch` starts the next batch's reads while the current one decodes.

Every read is checked against the crc32 the sharder stored in the sample table, before the bytes
go anywhere: a decoder (DALI's in particular, which can crash the process on hostile bytes) only
ever sees the bytes `mimpipe shard` validated. zlib.crc32 releases the GIL too and runs at
several GB/s, a small cost next to the decode.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


class ReadError(RuntimeError):
    """Missing or truncated data; the message names the shard and the sample key."""


class ChecksumError(ReadError):
    """A sample whose bytes are not those the sharder wrote (damaged after sharding). Unlike
    other ReadErrors it concerns one sample: the loader treats it like an undecodable sample."""


class Pending:
    # one future per sample, not one per batch: a batch task waiting on its own sample tasks
    # would deadlock a pool whose threads are all such batch tasks
    def __init__(self, futures: list[Future]):
        self.futures = futures

    def result(self) -> list[np.ndarray]:
        return [f.result() for f in self.futures]

    def results(self) -> list[np.ndarray | ChecksumError]:
        """Like result(), but a sample that fails its checksum is returned as its ChecksumError
        (the caller decides about that sample); any other error is raised."""
        out = []
        for f in self.futures:
            e = f.exception()
            if e is not None and not isinstance(e, ChecksumError):
                raise e
            out.append(e if e is not None else f.result())
        return out


class ShardReader:
    def __init__(self, manifest, threads: int = 2):
        self.m = manifest
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mimpipe-read")

    def _fd(self, shard: int) -> int:
        with self._lock:
            if shard not in self._fds:
                path = self.m.shard_path(shard)
                try:
                    self._fds[shard] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise ReadError(f"{path}: cannot open shard: {e.strerror}") from None
            return self._fds[shard]

    def read_one(self, sample_id: int, *, meta: bool = False) -> np.ndarray:
        """KEY.jpg (or KEY.json with meta=True) of one sample as a uint8 array, verified against
        the table's crc32 (ChecksumError if it differs)."""
        row = self.m.table[sample_id]
        off, size, crc = ((row["meta_offset"], row["meta_size"], row["meta_crc"]) if meta
                          else (row["offset"], row["size"], row["crc"]))
        try:
            data = os.pread(self._fd(int(row["shard"])), int(size), int(off))
        except OSError as e:
            raise ReadError(f"{self.m.where(sample_id)}: read failed: {e.strerror}") from None
        if len(data) != size:
            raise ReadError(f"{self.m.where(sample_id)}: truncated shard: wanted {size} bytes at "
                            f"offset {off}, got {len(data)}")
        got = zlib.crc32(data)
        if got != crc:
            raise ChecksumError(f"{self.m.where(sample_id)}: {'json' if meta else 'jpg'} bytes fail "
                                f"their checksum (crc32 {got:08x}, the table says {int(crc):08x}): "
                                f"the shard was damaged after it was written")
        return np.frombuffer(data, np.uint8)

    def read(self, sample_ids) -> list[np.ndarray]:
        return self.prefetch(sample_ids).result()

    def prefetch(self, sample_ids) -> "Pending":
        """Start reading; `.result()` gives the list (or raises the first ReadError)."""
        return Pending([self._pool.submit(self.read_one, int(i)) for i in sample_ids])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
