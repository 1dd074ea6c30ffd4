"""Manifest loading: every way a dataset folder can be broken is a clear error naming the file."""
from __future__ import annotations

import json
import re
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


def _edit_manifest(ds, **changes):
    doc = json.loads((ds / "manifest.json").read_text())
    doc.update(changes)
    (ds / "manifest.json").write_text(json.dumps(doc))
    return doc


def test_old_format_without_checksums_names_folder_and_command(ds):
    import numpy as np
    from numpy.lib import recfunctions as rfn
    old = rfn.drop_fields(np.load(ds / "samples.npy"), ["crc", "meta_crc"], usemask=False)
    np.save(ds / "samples.npy", old, allow_pickle=False)
    _edit_manifest(ds, version=1, source="/data/photos",
                   options={"name": "m", "shard_bytes": None, "samples_per_shard": 5, "max_side": 512, "seed": 0})
    with pytest.raises(ManifestError) as e:
        load_manifest(ds)
    msg = str(e.value)
    assert msg.startswith(f"{ds}: dataset format version 1 has no per-sample checksums") and "\n" not in msg
    assert f"mimpipe shard /data/photos {ds}-v2 --name m --samples-per-shard 5 --max-side 512 --seed 0" in msg
    _edit_manifest(ds, source="mimpipe sample v2 --n 2000 --size 96 --seed 0",
                   options={"samples_per_shard": 250})
    with pytest.raises(ManifestError, match=rf"re-shard it: mimpipe sample {ds}-v2 --n 2000 --size 96 --seed 0 "
                                            r"--samples-per-shard 250"):
        load_manifest(ds)


@pytest.mark.parametrize("field, name", [
    ("file", "../outside/stolen.tar"), ("file", "/etc/stolen.tar"), ("file", "sub/m-000000.tar"),
    ("file", ".."), ("file", "m-000000.idx"), ("index", "../m-000000.idx"), ("index", "/tmp/x.idx"),
])
def test_shard_names_must_be_plain_names_in_the_folder(ds, tmp_path, field, name):
    doc = json.loads((ds / "manifest.json").read_text())
    doc["shards"][1][field] = name
    (ds / "manifest.json").write_text(json.dumps(doc))
    what = "shard" if field == "file" else "index"
    with pytest.raises(ManifestError, match=rf"manifest\.json: {what} {re.escape(repr(name))} is not a plain"):
        load_manifest(ds)


def test_table_name_must_be_plain_and_shards_unique(ds):
    _edit_manifest(ds, table="../samples.npy")
    with pytest.raises(ManifestError, match=r"sample table '\.\./samples\.npy' is not a plain"):
        load_manifest(ds)
    doc = _edit_manifest(ds, table="samples.npy")
    doc["shards"][2]["file"] = doc["shards"][0]["file"]
    (ds / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"shard file 'm-000000\.tar' is listed twice"):
        load_manifest(ds)


def _edit_index(ds, line: int, fn):
    idx = ds / "m-000001.idx"
    lines = idx.read_text().splitlines()
    lines[line] = fn(lines[line].split())
    idx.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, says", [
    (lambda f: " ".join(f[:1] + [str(int(f[1]) + 512)] + f[2:]), r"cls entry .* does not match the table"),
    (lambda f: " ".join(f[:2] + [str(int(f[2]) + 1)] + f[3:]), r"cls entry .* does not match the table"),
    (lambda f: " ".join(f[:9] + [str(int(f[9]) - 512)] + f[10:]), r"json entry .* does not match the table"),
    (lambda f: " ".join(f[:11] + ["x.json"]), r"json entry .* does not match the table"),
    (lambda f: " ".join(f + ["txt", "1", "2", "k.txt"]), r"entries \['cls', 'jpg', 'json', 'txt'\]"),
    (lambda f: " ".join(f[4:]), r"entries \['jpg', 'json'\]"),
    (lambda f: " ".join(f[:-1]), r"entry '.*' is malformed"),
    (lambda f: " ".join(f[:1] + ["x"] + f[2:]), r"entry '.*' is malformed"),
])
def test_every_index_entry_is_checked(ds, edit, says):
    _edit_index(ds, 2, edit)
    with pytest.raises(ManifestError, match=r"m-000001\.idx: sample '[0-9a-f]{16}' \(line 3\): " + says):
        load_manifest(ds)


def test_table_offsets_outside_the_shard(ds):
    import numpy as np
    t = np.load(ds / "samples.npy")
    t["meta_offset"][t["shard"] == 2] += 10**6
    np.save(ds / "samples.npy", t, allow_pickle=False)
    with pytest.raises(ManifestError, match=r"m-000002\.tar: sample '[0-9a-f]{16}': the table's meta_offset "
                                            r"\d+ \+ \d+ bytes lies outside the shard"):
        load_manifest(ds)
