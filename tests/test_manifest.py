"""Manifest loading: every way a dataset folder can be broken is a clear error naming the file."""
from __future__ import annotations

import json
import shutil

import pytest

from mimpipe.pipeline.manifest import ManifestError, load_manifest
from mimpipe.tools.sample import SampleItem, CLASSES
from mimpipe.tools.shard import ShardConfig, shard_items


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    items = [SampleItem(0, i, 32) for i in range(12)]
    shard_items(items, CLASSES, out, ShardConfig(name="m", shard_bytes=None, samples_per_shard=5),
                progress=False)
    return out


@pytest.fixture
def ds(good, tmp_path):
    shutil.copytree(good, tmp_path / "ds")
    return tmp_path / "ds"


def test_good_folder_loads(ds):
    m = load_manifest(ds)
    assert len(m) == 12 and [s.samples for s in m.shards] == [5, 5, 2]


def test_missing_shard(ds):
    (ds / "m-000001.tar").unlink()
    with pytest.raises(ManifestError, match=r"m-000001\.tar: shard missing"):
        load_manifest(ds)


def test_truncated_shard(ds):
    with open(ds / "m-000002.tar", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ManifestError, match=r"m-000002\.tar: shard is 4096 bytes"):
        load_manifest(ds)


def test_index_offset_mismatch(ds):
    idx = ds / "m-000000.idx"
    lines = idx.read_text().splitlines()
    f = lines[2].split()
    f[5] = str(int(f[5]) + 512)   # the jpg's offset
    lines[2] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"m-000000\.idx: sample '[0-9a-f]{16}'.*does not match"):
        load_manifest(ds)


def test_missing_index(ds):
    (ds / "m-000000.idx").unlink()
    with pytest.raises(ManifestError, match=r"m-000000\.idx: DALI index missing"):
        load_manifest(ds)


def test_newer_format_version(ds):
    doc = json.loads((ds / "manifest.json").read_text())
    doc["version"] = 99
    (ds / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"manifest\.json: manifest format version 99 is newer"):
        load_manifest(ds)


def test_not_a_dataset(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        load_manifest(tmp_path)


def test_table_disagrees_with_manifest(ds):
    doc = json.loads((ds / "manifest.json").read_text())
    doc["num_samples"] = 13
    (ds / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"samples\.npy: 12 rows, manifest says 13"):
        load_manifest(ds)
