"""Encoded sample bytes by (shard, offset, size): positional reads on a small thread pool.

`os.pread` releases the GIL and needs no seek, so one open file per shard serves every thread;
`prefetch` starts the next batch's reads while the current one decodes.

Remote shards (remote.py) are read a batch at a time: the batch's byte ranges are coalesced per
shard and all sent at once, so a batch waits for about one round trip, not one per sample per
thread; the loader's one-batch read-ahead then hides that round trip behind the decode.

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

from mimpipe.pipeline.remote import coalesce


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

    def _span(self, sample_id: int, meta: bool) -> tuple[int, int, int, int]:
        """(shard, offset, size, crc32) of KEY.jpg, or of KEY.json with meta."""
        row = self.m.table[sample_id]
        off, size, crc = ((row["meta_offset"], row["meta_size"], row["meta_crc"]) if meta
                          else (row["offset"], row["size"], row["crc"]))
        return int(row["shard"]), int(off), int(size), int(crc)

    def read_one(self, sample_id: int, *, meta: bool = False) -> np.ndarray:
        """KEY.jpg (or KEY.json with meta=True) of one sample as a uint8 array, verified against
        the table's crc32 (ChecksumError if it differs)."""
        if self.m.remote:
            return self._read_remote([sample_id], meta)[0].result()
        shard, off, size, _ = self._span(sample_id, meta)
        try:
            data = os.pread(self._fd(shard), size, off)
        except OSError as e:
            raise ReadError(f"{self.m.where(sample_id)}: read failed: {e.strerror}") from None
        return self._verified(sample_id, meta, data)

    def _verified(self, sample_id: int, meta: bool, data) -> np.ndarray:
        _, off, size, crc = self._span(sample_id, meta)
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
        if self.m.remote:
            futures = [Future() for _ in sample_ids]
            self._pool.submit(self._read_remote, [int(i) for i in sample_ids], False, futures)
            return Pending(futures)
        return Pending([self._pool.submit(self.read_one, int(i)) for i in sample_ids])

    def _read_remote(self, ids: list[int], meta: bool, futures: list[Future] | None = None) -> list[Future]:
        """Read `ids` from a remote store in one round of coalesced range requests; each future
        gets its sample's verified bytes or the ReadError naming its shard URL and key."""
        futures = futures if futures is not None else [Future() for _ in ids]
        try:
            spans = [self._span(i, meta) for i in ids]
            blocks = coalesce([(shard, off, size) for shard, off, size, _ in spans])
            got = self.m.store.read_ranges([(self.m.shards[b[0]].file, b[1], b[2]) for b in blocks])
            for (_, start, _, members), data in zip(blocks, got):
                for j in members:
                    try:
                        if isinstance(data, Exception):
                            raise ReadError(f"{self.m.where(ids[j])}: read failed: {data}")
                        off, size = spans[j][1] - start, spans[j][2]
                        futures[j].set_result(self._verified(ids[j], meta, memoryview(data)[off:off + size]))
                    except ReadError as e:
                        futures[j].set_exception(e)
        except BaseException as e:  # noqa: BLE001 - no future may stay unresolved: a reader would hang
            for f in futures:
                if not f.done():
                    f.set_exception(e)
        return futures

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
