"""The shard manifest: which shards exist, and where every sample lives in them.

A dataset folder written by `mimpipe shard` holds

    NAME-000000.tar ...   WebDataset shards (KEY.cls, KEY.jpg, KEY.json per sample)
    NAME-000000.idx ...   DALI index per shard (what `wds2idx` writes)
    samples.npy           one row per sample, row number = sample id (SAMPLE_DTYPE)
    manifest.json         format, version, shards, class names, counts

Sample ids are dense, 0..N-1, in sorted source-path order, so they do not depend on the shuffle
seed: the plan, the mask server and the trainer all name images by these ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "mimpipe.shards"
# 2: per-sample crc32 of KEY.jpg and KEY.json in the table (version 1 had none: refused, re-shard)
VERSION = 2
MANIFEST = "manifest.json"
TABLE = "samples.npy"
TAR_BLOCK = 512   # tar header / padding unit (tools/tario.py writes the shards)

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
    root: Path
    name: str
    classes: tuple[str, ...]
    shards: tuple[Shard, ...]
    table: np.ndarray   # SAMPLE_DTYPE, row = sample id
    seed: int

    def __len__(self) -> int:
        return len(self.table)

    def shard_path(self, i: int) -> Path:
        return self.root / self.shards[i].file

    def key(self, sample_id: int) -> str:
        return self.table["key"][sample_id].decode()

    def where(self, sample_id: int) -> str:
        """'shard-000003.tar: sample 'ab12..'' for error messages."""
        return f"{self.shards[self.table['shard'][sample_id]].file}: sample {self.key(sample_id)!r}"


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
    """Load a dataset folder (or its manifest.json). With `verify`, also check that every shard
    exists with its recorded size and that each DALI index agrees with the table: cheap (stat and
    small text files), and it turns a silently wrong read later into a clear error now."""
    root = Path(root)
    path = root if root.suffix == ".json" else root / MANIFEST
    root = path.parent
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is this a folder written by `mimpipe shard`?)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
    table = _load_table(root / table_name, num, shards)
    m = Manifest(root=root, name=name, classes=classes, shards=shards, table=table, seed=seed)
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


def _plain_name(path: Path, what: str, name, suffix: str) -> str:
    """A file the manifest names must be a plain file name inside the dataset folder: no
    directory part, no '..', not absolute (a manifest must not point a trainer at other files)."""
    if not isinstance(name, str) or not name.endswith(suffix) or name in (".", "..") \
            or any(c in name for c in "/\\\0") or os.path.isabs(name) or name.startswith("."):
        raise ManifestError(f"{path}: {what} {name!r} is not a plain '*{suffix}' file name inside "
                            f"the dataset folder {path.parent}")
    return name


def _shard_entry(path: Path, s) -> Shard:
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


def _load_table(path: Path, num: int, shards: tuple[Shard, ...]) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable sample table: {e}") from e
    if table.dtype != SAMPLE_DTYPE or table.ndim != 1:
        raise ManifestError(f"{path}: sample table has dtype {table.dtype}, expected {SAMPLE_DTYPE}")
    if len(table) != num or num != sum(s.samples for s in shards):
        raise ManifestError(f"{path}: {len(table)} rows, manifest says {num} samples in "
                            f"{sum(s.samples for s in shards)} shard entries")
    if len(table) and table["shard"].max() >= len(shards):
        raise ManifestError(f"{path}: sample table names shard {table['shard'].max()}, "
                            f"manifest has {len(shards)}")
    return table


def verify_shards(m: Manifest) -> None:
    """Every shard present with its recorded size; every member the table names lies inside its
    shard; every index entry (cls, jpg and json: DALI's webdataset reader uses all of them)
    matches the table."""
    order = np.lexsort((m.table["offset"], m.table["shard"]))
    bounds = np.searchsorted(m.table["shard"][order], np.arange(len(m.shards) + 1))
    for i, s in enumerate(m.shards):
        tar = m.root / s.file
        if not tar.is_file():
            raise ManifestError(f"{tar}: shard missing")
        if tar.stat().st_size != s.bytes:
            raise ManifestError(f"{tar}: shard is {tar.stat().st_size} bytes, manifest says "
                                f"{s.bytes} (truncated or replaced)")
        rows = m.table[order[bounds[i]:bounds[i + 1]]]
        if len(rows) != s.samples:
            raise ManifestError(f"{tar}: table lists {len(rows)} samples, manifest says {s.samples}")
        body = s.bytes - 2 * TAR_BLOCK   # a tar ends with two zero blocks
        for off, size in (("offset", "size"), ("meta_offset", "meta_size")):
            out = (rows[off] < TAR_BLOCK) | (rows[off].astype(np.int64) + rows[size] > body)
            if out.any():
                r = rows[np.argmax(out)]
                raise ManifestError(f"{tar}: sample {r['key'].decode()!r}: the table's {off} "
                                    f"{r[off]} + {r[size]} bytes lies outside the shard")
        _check_index(m.root / s.index, rows)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _check_index(idx: Path, rows: np.ndarray) -> None:
    if not idx.is_file():
        raise ManifestError(f"{idx}: DALI index missing")
    try:
        lines = idx.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
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
