"""Where a dataset folder lives: a local path, or a URL (s3://, gs://, https://) read through fsspec.

Both kinds of `Store` answer the same three questions (a file's size, its bytes, byte ranges of
it), so the manifest checks and the reader are one code path. The remote one is built for
latency: `read_ranges` sends every range of a batch at once (fsspec's async `cat_ranges`, one
event loop, many connections), after `coalesce` has merged ranges that lie close together in a
shard, so a batch costs a few round trips however many samples it holds.

Every byte from the network is treated as hostile: sizes are checked against what was asked for
(a server that ignores `Range` is an error, not a 1 GB sample), and callers check checksums.
Credentials and endpoints come from where each library looks (AWS_* variables and ~/.aws profiles
for s3fs, including AWS_ENDPOINT_URL for S3-compatible stores; Application Default Credentials
for gcsfs), never from command-line flags, which land in logs and shell histories.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCHEMES = ("s3", "gs", "gcs", "http", "https")
EXTRA = "pip install 'mimpipe[remote]'"
RETRIES = 5             # attempts per request (transient errors only)
BACKOFF_S = 0.1         # first wait; doubled per attempt, capped at BACKOFF_MAX_S
BACKOFF_MAX_S = 3.0
# Samples next to each other in a shard are ~2 KB apart (KEY.json and tar headers): merged. A
# whole sample in between (ImageNet: ~110 KB) is not read for nothing: with requests in flight at
# once a gap costs bytes and CPU, not a round trip (`mimpipe bench remote`, 20 ms per request:
# 1.06x local with no gap, 0.77x with 1 MiB gaps, which read ~10x the bytes). The cap keeps one
# merged read from holding a whole shard in memory.
MERGE_GAP = 16 << 10
MAX_BLOCK = 64 << 20
# transient errors are retried; these mean the object or the permission is not there
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


def as_url(root) -> str | None:
    """The URL `root` names, or None for a local path. A URL that went through pathlib
    (`type=Path` in an argparse option) has lost a slash ('s3:/bucket/x'): restored."""
    s = os.fspath(root)
    scheme, sep, rest = s.partition(":/")
    if not sep or scheme.lower() not in SCHEMES:
        return None
    return f"{scheme.lower()}://{rest.lstrip('/')}"


def open_store(root) -> "LocalStore | RemoteStore":
    url = as_url(root)
    return LocalStore(Path(root)) if url is None else RemoteStore(url)


def coalesce(spans, *, gap: int = MERGE_GAP, max_block: int = MAX_BLOCK) -> list[tuple]:
    """spans: [(file, offset, size)] -> blocks [(file, start, end, [span indices])], each block
    one read covering its spans; spans of one file merge when at most `gap` bytes apart and the
    block stays within `max_block` (a single larger span is a block of its own)."""
    blocks: list[tuple] = []
    for i in sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1])):
        name, off, size = spans[i]
        last = blocks[-1] if blocks else None
        if last and last[0] == name and off - last[2] <= gap and off + size - last[1] <= max_block:
            blocks[-1] = (name, last[1], max(last[2], off + size), last[3] + [i])
        else:
            blocks.append((name, off, off + size, [i]))
    return blocks


class LocalStore:
    parallel = 1   # a local stat or read is cheaper than a thread hand-off

    def __init__(self, root: Path):
        self.root = root

    def url(self, name: str) -> Path:
        return self.root / name

    def size(self, name: str) -> int | None:
        p = self.root / name
        return p.stat().st_size if p.is_file() else None

    def read(self, name: str, limit: int) -> bytes:
        with open(self.root / name, "rb") as f:
            data = f.read(limit + 1)
        _check_size(self.url(name), len(data), limit)
        return data


class RemoteStore:
    parallel = 16   # requests in flight while checking shards (HEADs and index reads)

    def __init__(self, url: str):
        self.root = url.rstrip("/")
        try:
            import fsspec   # the remote extra; a local user needs none of it
            self.fs, self._base = fsspec.core.url_to_fs(self.root)
        except ImportError as e:   # a RuntimeError: the CLI prints it as one line
            raise RuntimeError(f"{self.root}: reading this needs the remote extra: {EXTRA} ({e})") from e

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _path(self, name: str) -> str:
        return f"{self._base}/{name}"

    def size(self, name: str) -> int | None:
        try:
            info = retried(self.url(name), lambda: self.fs.info(self._path(name)))
        except FileNotFoundError:
            return None
        if info.get("type") not in (None, "file") or not isinstance(info.get("size"), int):
            raise OSError(f"{self.url(name)}: not a file of known size ({info.get('type')}, "
                          f"size {info.get('size')!r})")
        return info["size"]

    def read(self, name: str, limit: int) -> bytes:
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(f"{self.url(name)}: not found")
        _check_size(self.url(name), size, limit)
        data = retried(self.url(name), lambda: self.fs.cat_file(self._path(name)))
        _check_size(self.url(name), len(data), limit)   # the body may differ from what HEAD said
        return data

    def read_ranges(self, ranges) -> list:
        """ranges: [(file, start, end)] -> for each, its bytes or the exception that ended its
        last attempt (the caller names the samples). All in flight at once; transient failures
        are retried with capped exponential backoff."""
        out: list = [None] * len(ranges)
        todo = list(range(len(ranges)))
        for attempt in range(RETRIES):
            got = self.fs.cat_ranges([self._path(ranges[i][0]) for i in todo],
                                     [ranges[i][1] for i in todo], [ranges[i][2] for i in todo],
                                     on_error="return")
            for i, r in zip(todo, got):
                out[i] = _checked_range(self.url(ranges[i][0]), ranges[i][1], ranges[i][2], r)
            todo = [i for i in todo if isinstance(out[i], Exception)
                    and not isinstance(out[i], PERMANENT)]
            if not todo:
                break
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt))
        return out


def sizes(store, names) -> list[int | None]:
    """Sizes of many files, `store.parallel` requests at a time (order kept)."""
    if store.parallel == 1:
        return [store.size(n) for n in names]
    with ThreadPoolExecutor(store.parallel, thread_name_prefix="mimpipe-stat") as pool:
        return list(pool.map(store.size, names))


def retried(url: str, call):
    """call() until it succeeds, a permanent error, or RETRIES attempts; the error names the URL."""
    for attempt in range(RETRIES):
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - network libraries raise many kinds; retried, then named
            if attempt == RETRIES - 1:
                raise OSError(f"{url}: failed after {RETRIES} attempts: {e!r}") from e
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt))


def _checked_range(url: str, start: int, end: int, got):
    if isinstance(got, Exception):
        return got
    if not isinstance(got, (bytes, bytearray, memoryview)) or len(got) != end - start:
        n = len(got) if hasattr(got, "__len__") else type(got).__name__
        # not retried: a server that ignores Range, or an object shorter than the manifest says
        return ValueError(f"{url}: wanted bytes {start}-{end - 1} ({end - start} bytes), got {n}")
    return got


def _check_size(url, n: int, limit: int) -> None:
    if n > limit:
        raise ValueError(f"{url}: {n} bytes, more than the {limit} this file can hold")


def upload(folder: Path, url: str, shard_files: list[str], last: list[str]) -> None:
    """Copy a finished dataset folder to url: the shards and indexes (`store.parallel` at a time),
    then `last` in order (table, manifest: a URL with a manifest is complete). Each object appears
    only when its upload completes (S3 and GCS PUTs are atomic). A file already there with its size
    is skipped, so a rerun completes an interrupted upload; layout and bytes are deterministic
    (tools/shard.py), so the size is the check that matters."""
    store = RemoteStore(url)

    def put(name: str) -> None:
        local = folder / name
        if store.size(name) != local.stat().st_size:
            retried(store.url(name), lambda: store.fs.put_file(str(local), store._path(name)))

    with ThreadPoolExecutor(store.parallel, thread_name_prefix="mimpipe-upload") as pool:
        list(pool.map(put, shard_files))
    for name in last:
        put(name)
