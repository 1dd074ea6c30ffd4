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
VERSION = 1
MANIFEST = "manifest.json"
TABLE = "samples.npy"

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
])


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
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise ManifestError(f"{path}: manifest format version {doc.get('version')!r} is newer than "
                            f"this mimpipe reads ({VERSION}); upgrade mimpipe")
    try:
        shards = tuple(Shard(**s) for s in doc["shards"])
        classes, name, seed = tuple(doc["classes"]), doc["name"], doc["seed"]
        num = int(doc["num_samples"])
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{path}: malformed manifest: {e!r}") from e
    table = _load_table(root / doc.get("table", TABLE), num, shards)
    m = Manifest(root=root, name=name, classes=classes, shards=shards, table=table, seed=seed)
    if verify:
        verify_shards(m)
    return m


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
    """Every shard present with its recorded size; every index line matches the table."""
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
        _check_index(m.root / s.index, rows)


def _check_index(idx: Path, rows: np.ndarray) -> None:
    if not idx.is_file():
        raise ManifestError(f"{idx}: DALI index missing")
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or head[1] != str(len(rows)) or len(lines) != len(rows) + 1:
        raise ManifestError(f"{idx}: index header {lines[:1]} does not describe {len(rows)} samples")
    for line, row in zip(lines[1:], rows):
        f = line.split()
        comps = {f[j]: (int(f[j + 1]), int(f[j + 2]), f[j + 3]) for j in range(0, len(f) - 3, 4)}
        key = row["key"].decode()
        if comps.get("jpg") != (int(row["offset"]), int(row["size"]), f"{key}.jpg"):
            raise ManifestError(f"{idx}: sample {key!r}: index entry {comps.get('jpg')} does not "
                                f"match the table (offset {row['offset']}, size {row['size']})")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
