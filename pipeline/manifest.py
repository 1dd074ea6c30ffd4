"""The shard manifest: which shards exist, and where every sample lives in them.

A dataset folder written by `mimpipe shard` holds

    NAME-000000.tar ...   WebDataset shards (KEY.cls, KEY.jpg, KEY.json per sample)
    NAME-000000.idx ...   DALI index per shard (what `wds2idx` writes)
    samples.npy           one row per sample, row number = sample id (SAMPLE_DTYPE)
    manifest.json         format, version, shards, class names, counts

Sample ids are dense, 0..N-1, in sorted source-path order, so they do not depend on the shuffle
seed: the plan, the mask server and the trainer all name images by these ids.

The folder may be a URL (s3://, gs://, https://; see remote.py): the manifest, table and indexes
are fetched once and checked exactly as local files are.
"""
from __future__ import annotations

import json
import os
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from mimpipe.pipeline.remote import LocalStore, RemoteStore, as_url, open_store, sizes

FORMAT = "mimpipe.shards"
# 2: per-sample crc32 of KEY.jpg and KEY.json in the table (version 1 had none: refused, re-shard)
VERSION = 2
MANIFEST = "manifest.json"
TABLE = "samples.npy"
TAR_BLOCK = 512   # tar header / padding unit (tools/tario.py writes the shards)
# Upper bounds on what is read before it is parsed (a remote file is hostile until checked):
MAX_MANIFEST = 64 << 20        # ~200 bytes per shard entry: room for 300k shards
INDEX_LINE = 256               # 3 members x (ext, offset, size, KEY.ext) is under 180 characters
TABLE_HEADER = 64 << 10        # .npy magic + header (numpy writes ~600 bytes for SAMPLE_DTYPE)

# offsets are those of the member's data (after its 512-byte tar header), as in DALI's index
SAMPLE_DTYPE = np.dtype([
    ("key", "S16"),
    ("shard", "<u4"),
    ("offset", "<u8"),       # KEY.jpg data
    ("size", "<u4"),
    ("meta_offset", "<u8"),  # KEY.json data
    ("meta_size", "<u4"),
    ("label", "<i4"),        # -1 for unlabeled inputs
    ("width", "<u4"),        # of the stored JPEG (the plan draws crop boxes in these pixels)
    ("height", "<u4"),
    ("crc", "<u4"),          # zlib.crc32 of the KEY.jpg data: checked on every read (reader.py)
    ("meta_crc", "<u4"),     # zlib.crc32 of the KEY.json data
])
EXTENSIONS = ("cls", "jpg", "json")   # the members of every sample, in tar (and index) order


class ManifestError(RuntimeError):
    """A dataset folder that cannot be trusted; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Shard:
    file: str
    index: str
    samples: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    root: Path | str   # a folder, or the URL of one
    name: str
    classes: tuple[str, ...]
    shards: tuple[Shard, ...]
    table: np.ndarray   # SAMPLE_DTYPE, row = sample id
    seed: int
    store: LocalStore | RemoteStore = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def remote(self) -> bool:
        return isinstance(self.store, RemoteStore)

    def shard_path(self, i: int) -> Path | str:
        return self.store.url(self.shards[i].file)

    def key(self, sample_id: int) -> str:
        return self.table["key"][sample_id].decode()

    def where(self, sample_id: int) -> str:
        """'shard-000003.tar: sample 'ab12..'' for error messages (the shard's URL if remote)."""
        s = int(self.table["shard"][sample_id])
        return f"{self.shard_path(s) if self.remote else self.shards[s].file}: sample {self.key(sample_id)!r}"


def write_manifest(root: Path, *, name: str, classes, shards: list[Shard], table: np.ndarray,
                   seed: int, extra: dict) -> None:
    """Write samples.npy, then manifest.json last: a folder with a manifest is complete."""
    root = Path(root)
    assert table.dtype == SAMPLE_DTYPE and len(table) == sum(s.samples for s in shards)
    _atomic_write(root / TABLE, lambda f: np.save(f, table, allow_pickle=False))
    doc = {
        "format": FORMAT, "version": VERSION, "name": name, "seed": seed,
        "num_samples": len(table), "classes": list(classes),
        "shards": [vars(s) for s in shards], "table": TABLE, **extra,
    }
    _atomic_write(root / MANIFEST, lambda f: f.write(json.dumps(doc, indent=1).encode()))


def load_manifest(root: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Load a dataset folder or URL (or its manifest.json). With `verify`, also check that every
    shard exists with its recorded size and that each DALI index agrees with the table: cheap (stat
    and small text files), and it turns a silently wrong read later into a clear error now."""
    url = as_url(root)
    folder = str(url or root)
    if folder.endswith(".json"):
        folder = folder.rsplit("/", 1)[0] if url else str(Path(folder).parent)
    store = open_store(folder)
    root, path = store.root, store.url(MANIFEST)
    try:
        doc = json.loads(store.read(MANIFEST, MAX_MANIFEST).decode())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ManifestError(f"{path}: no manifest (is this a folder written by `mimpipe shard`?)") from None
    except (OSError, ValueError) as e:   # JSON and UTF-8 errors are ValueErrors too
        raise ManifestError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a mimpipe manifest (format {doc.get('format')!r})"
                            if isinstance(doc, dict) else f"{path}: not a mimpipe manifest")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ManifestError(f"{path}: manifest format version {version!r} is newer than "
                            f"this mimpipe reads ({VERSION}); upgrade mimpipe")
    if version < VERSION:
        raise ManifestError(f"{root}: dataset format version {version} has no per-sample checksums, "
                            f"which this mimpipe checks before decoding (format {VERSION}); "
                            f"re-shard it: {reshard_command(doc, root)}")
    try:
        shards = tuple(_shard_entry(path, s) for s in doc["shards"])
        classes, name, seed = tuple(doc["classes"]), doc["name"], doc["seed"]
        num = int(doc["num_samples"])
        table_name = _plain_name(path, "sample table", doc.get("table", TABLE), ".npy")
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed manifest: {e!r}") from e
    for what, names in (("shard", [s.file for s in shards]), ("index", [s.index for s in shards])):
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ManifestError(f"{path}: {what} file {dup!r} is listed twice")
    table = _load_table(store, table_name, num, shards)
    m = Manifest(root=root, name=name, classes=classes, shards=shards, table=table, seed=seed, store=store)
    if verify:
        verify_shards(m)
    return m


def reshard_command(doc: dict, root: Path) -> str:
    """The command that rebuilds an old-format dataset folder, from what its manifest recorded."""
    source, opts, new = str(doc.get("source") or ""), doc.get("options") or {}, f"{root}-v{VERSION}"
    if source.startswith("mimpipe sample"):
        flags = source[source.index(" --"):] if " --" in source else ""
        per = opts.get("samples_per_shard")
        return f"mimpipe sample {new}{flags}" + (f" --samples-per-shard {per}" if per else "")
    cmd = [f"mimpipe shard {source or 'SRC'} {new}", f"--name {doc.get('name', 'shard')}"]
    if opts.get("samples_per_shard"):
        cmd.append(f"--samples-per-shard {opts['samples_per_shard']}")
    elif opts.get("shard_bytes"):
        cmd.append(f"--shard-size {opts['shard_bytes']}")
    if opts.get("max_side"):
        cmd.append(f"--max-side {opts['max_side']}")
    cmd.append(f"--seed {doc.get('seed', 0)}")
    return " ".join(cmd) + " (plus the --labels/--classes it was made with, if any)"


def _plain_name(path, what: str, name, suffix: str) -> str:
    """A file the manifest names must be a plain file name inside the dataset folder: no
    directory part, no '..', not absolute (a manifest must not point a trainer at other files)."""
    if not isinstance(name, str) or not name.endswith(suffix) or name in (".", "..") \
            or any(c in name for c in "/\\\0") or os.path.isabs(name) or name.startswith("."):
        raise ManifestError(f"{path}: {what} {name!r} is not a plain '*{suffix}' file name inside "
                            f"the dataset folder {str(path).rsplit('/', 1)[0]}")
    return name


def _shard_entry(path, s) -> Shard:
    if not isinstance(s, dict):
        raise TypeError(f"shard entry {s!r} is not an object")
    shard = Shard(**s)
    for field in ("samples", "bytes"):
        v = getattr(shard, field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise TypeError(f"shard {shard.file!r}: {field} {v!r} is not a count")
    _plain_name(path, "shard", shard.file, ".tar")
    _plain_name(path, "index", shard.index, ".idx")
    return shard


def _load_table(store, name: str, num: int, shards: tuple[Shard, ...]) -> np.ndarray:
    """The sample table, its .npy header checked against the manifest before any row is read (a
    hostile header could otherwise claim any shape)."""
    path = store.url(name)
    try:
        f = io.BytesIO(store.read(name, TABLE_HEADER + num * SAMPLE_DTYPE.itemsize))
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        if dtype != SAMPLE_DTYPE or len(shape) != 1:
            raise ManifestError(f"{path}: sample table has dtype {dtype}, shape {shape}, expected "
                                f"{SAMPLE_DTYPE}, one row per sample")
        if shape[0] != num or num != sum(s.samples for s in shards):
            raise ManifestError(f"{path}: {shape[0]} rows, manifest says {num} samples in "
                                f"{sum(s.samples for s in shards)} shard entries")
        table = np.frombuffer(f.getbuffer(), SAMPLE_DTYPE, count=num, offset=f.tell()).copy()
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable sample table: {e}") from e
    if len(table) and table["shard"].max() >= len(shards):
        raise ManifestError(f"{path}: sample table names shard {table['shard'].max()}, "
                            f"manifest has {len(shards)}")
    return table


def verify_shards(m: Manifest) -> None:
    """Every shard present with its recorded size; every member the table names lies inside its
    shard; every index entry (cls, jpg and json: DALI's webdataset reader uses all of them)
    matches the table. Remote shards are checked `store.parallel` at a time; the error raised is
    that of the first bad shard, as locally."""
    order = np.lexsort((m.table["offset"], m.table["shard"]))
    bounds = np.searchsorted(m.table["shard"][order], np.arange(len(m.shards) + 1))
    found = sizes(m.store, [s.file for s in m.shards])
    checks = [partial(_check_shard, m, s, found[i], m.table[order[bounds[i]:bounds[i + 1]]])
              for i, s in enumerate(m.shards)]
    if m.store.parallel == 1:
        for check in checks:
            check()
        return
    with ThreadPoolExecutor(m.store.parallel, thread_name_prefix="mimpipe-verify") as pool:
        for _ in pool.map(lambda check: check(), checks):
            pass


def _check_shard(m: Manifest, s: Shard, found: int | None, rows: np.ndarray) -> None:
    tar = m.store.url(s.file)
    if found is None:
        raise ManifestError(f"{tar}: shard missing")
    if found != s.bytes:
        raise ManifestError(f"{tar}: shard is {found} bytes, manifest says "
                            f"{s.bytes} (truncated or replaced)")
    if len(rows) != s.samples:
        raise ManifestError(f"{tar}: table lists {len(rows)} samples, manifest says {s.samples}")
    body = s.bytes - 2 * TAR_BLOCK   # a tar ends with two zero blocks
    for off, size in (("offset", "size"), ("meta_offset", "meta_size")):
        out = (rows[off] < TAR_BLOCK) | (rows[off].astype(np.int64) + rows[size] > body)
        if out.any():
            r = rows[np.argmax(out)]
            raise ManifestError(f"{tar}: sample {r['key'].decode()!r}: the table's {off} "
                                f"{r[off]} + {r[size]} bytes lies outside the shard")
    _check_index(m.store, s.index, rows)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _check_index(store, name: str, rows: np.ndarray) -> None:
    idx = store.url(name)
    try:
        lines = store.read(name, INDEX_LINE * (len(rows) + 1)).decode().splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{idx}: DALI index missing") from None
    except (OSError, ValueError) as e:   # UnicodeDecodeError, or over the size bound
        raise ManifestError(f"{idx}: unreadable DALI index: {e}") from e
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or head[1] != str(len(rows)) or len(lines) != len(rows) + 1:
        raise ManifestError(f"{idx}: index header {lines[:1]} does not describe {len(rows)} samples")
    for n, (line, row) in enumerate(zip(lines[1:], rows), 2):
        key = row["key"].decode()
        label = str(int(row["label"]))
        # the members of a sample are contiguous: KEY.cls's data ends (padded) where KEY.jpg's
        # header starts
        cls_offset = int(row["offset"]) - TAR_BLOCK - _padded(len(label))
        want = [("cls", cls_offset, len(label), f"{key}.cls"),
                ("jpg", int(row["offset"]), int(row["size"]), f"{key}.jpg"),
                ("json", int(row["meta_offset"]), int(row["meta_size"]), f"{key}.json")]
        f = line.split()
        try:
            got = [(f[j], int(f[j + 1]), int(f[j + 2]), f[j + 3]) for j in range(0, len(f), 4)]
        except (ValueError, IndexError):
            got = None
        if got != want:
            bad = (f"entry {line!r} is malformed" if got is None else
                   f"entries {[g[0] for g in got]} are not {list(EXTENSIONS)}" if len(got) != len(want)
                   else next(f"{g[0]} entry {g[1:]} does not match the table {w[1:]}"
                             for g, w in zip(got, want) if g != w))
            raise ManifestError(f"{idx}: sample {key!r} (line {n}): {bad}")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
