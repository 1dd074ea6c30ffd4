"""mimpipe shard: round trip through the real readers, validation, determinism, resume."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mimpipe.pipeline.manifest import ManifestError, load_manifest
from tests.conftest import jpeg_bytes, make_image_folder, picture
from mimpipe.tools.shard import ShardConfig, ShardError, parse_size, sample_key, scan_folder, shard_items

CFG = ShardConfig(name="t", shard_bytes=None, samples_per_shard=3, seed=7)


def shard(src, out, cfg=CFG, **kw):
    items, classes, _ = scan_folder(src, **kw)
    return shard_items(items, classes, out, cfg, source=str(src), progress=False)


@pytest.fixture(scope="module")
def sharded(image_folder, tmp_path_factory):
    src, outcome = image_folder
    out = tmp_path_factory.mktemp("out")
    report = shard(src, out)
    return src, outcome, out, report, load_manifest(out)


def read_member(m, shard: int, offset: int, size: int) -> bytes:
    with open(m.shard_path(shard), "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_report_balances_and_lists_reasons(sharded):
    src, outcome, out, report, m = sharded
    assert report["inputs"] == len(outcome) == report["written"] + len(report["skipped"])
    assert report["converted"] == sum(v == "converted" for v in outcome.values())
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {k for k, v in outcome.items() if v == "skip"}
    assert skipped["fish/empty.jpg"] == "empty file"
    assert "truncated" in skipped["fish/truncated.jpg"] or "corrupt" in skipped["fish/truncated.jpg"]
    assert "not an image" in skipped["fish/notes.txt"]
    assert json.loads((out / "report.json").read_text())["skipped"] == report["skipped"]
    assert len(m) == report["written"] and m.classes == ("cat", "dog", "fish")


def test_webdataset_library_reads_every_sample(sharded):
    src, outcome, out, report, m = sharded
    urls = [str(m.shard_path(i)) for i in range(len(m.shards))]
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        assert set(s) >= {"__key__", "jpg", "cls", "json"}, s.keys()
        seen[s["__key__"]] = s
    assert sorted(seen) == sorted(m.key(i) for i in range(len(m)))
    for i in range(len(m)):
        s = seen[m.key(i)]
        meta = json.loads(s["json"])
        assert int(s["cls"]) == m.table["label"][i] == m.classes.index(meta["class"])
        assert s["jpg"] == read_member(m, m.table["shard"][i], m.table["offset"][i], m.table["size"][i])
        assert Image.open(io.BytesIO(s["jpg"])).size == (m.table["width"][i], m.table["height"][i])
        raw = (src / meta["source"]).read_bytes()
        if outcome[meta["source"]] == "as_is":
            assert s["jpg"] == raw, f"{meta['source']} was re-encoded"
        else:
            im = Image.open(io.BytesIO(s["jpg"]))
            assert (im.format, im.mode) == ("JPEG", "RGB"), meta["source"]
        w, h = Image.open(src / meta["source"]).size
        assert (meta["width"], meta["height"]) == (w, h)


def test_dali_reader_reads_every_sample_with_our_index(sharded):
    from nvidia.dali import fn, pipeline_def, types
    src, outcome, out, report, m = sharded
    tars = [str(m.shard_path(i)) for i in range(len(m.shards))]

    @pipeline_def(batch_size=4, num_threads=2, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"],
            dtypes=[types.UINT8, types.UINT8], missing_component_behavior="error",
            random_shuffle=False, name="r")
        return jpg, cls, fn.decoders.image(jpg, device="cpu")

    p = pipe()
    p.build()
    got = {}
    for _ in range(-(-len(m) // 4)):
        jpg, cls, img = p.run()
        for j in range(len(jpg)):
            tar, offset, name = jpg[j].source_info().rsplit(":", 2)
            got[name.split(".")[0]] = (np.array(jpg[j]).tobytes(), int(bytes(np.array(cls[j]))),
                                       np.array(img[j]).shape)
    assert len(got) == len(m)
    for i in range(len(m)):
        data, label, shape = got[m.key(i)]
        assert data == read_member(m, m.table["shard"][i], m.table["offset"][i], m.table["size"][i])
        assert label == m.table["label"][i]
        assert shape[2] == 3


def test_index_is_what_wds2idx_writes(sharded, tmp_path):
    src, outcome, out, report, m = sharded
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for s in m.shards:
        subprocess.run([str(wds2idx), str(out / s.file), str(tmp_path / "x.idx")],
                       check=True, capture_output=True)
        assert (tmp_path / "x.idx").read_bytes() == (out / s.index).read_bytes(), s.file


def test_keys_have_no_dots_and_shards_are_class_mixed(sharded):
    src, outcome, out, report, m = sharded
    keys = [m.key(i) for i in range(len(m))]
    assert all("." not in k for k in keys) and len(set(keys)) == len(keys)
    assert sample_key("cat/img.v2.jpg") in keys
    # sample ids follow source-path order, independent of the shuffle
    sources = [json.loads(read_member(m, m.table["shard"][i], m.table["meta_offset"][i],
                                      m.table["meta_size"][i]))["source"] for i in range(len(m))]
    assert sources == sorted(sources)
    first = m.table["label"][m.table["shard"] == 0]
    assert len(set(first.tolist())) > 1


def test_same_input_same_bytes_other_seed_same_keys(image_folder, sharded, tmp_path):
    src, outcome, out, report, m = sharded
    shard(src, tmp_path / "again")
    for f in sorted(p.name for p in out.iterdir() if p.name != "report.json"):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    shard(src, tmp_path / "seed8", ShardConfig(name="t", shard_bytes=None, samples_per_shard=3, seed=8))
    m8 = load_manifest(tmp_path / "seed8")
    assert (m8.table["key"] == m.table["key"]).all() and (m8.table["label"] == m.table["label"]).all()
    assert (m8.table["shard"] != m.table["shard"]).any()


def test_byte_budget_and_max_side(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(8):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "a" / f"{i}.jpg").write_bytes(jpeg_bytes(picture(rng, 300, 200)))
    report = shard(tmp_path / "src", tmp_path / "out",
                   ShardConfig(name="b", shard_bytes=parse_size("40KB"), max_side=100))
    m = load_manifest(tmp_path / "out")
    assert report["converted"] == 8 and len(m.shards) > 1
    assert all(s.bytes <= 40_000 or s.samples == 1 for s in m.shards)
    for i in range(len(m)):
        data = read_member(m, m.table["shard"][i], m.table["offset"][i], m.table["size"][i])
        assert Image.open(io.BytesIO(data)).size == (100, 67)


def test_flat_folder_with_imagenet_val_labels(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "val"
    src.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n02", "n01", "n02", "n03"]):
        (src / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg_bytes(picture(rng, 40, 30)))
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 30 40")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    items, classes, layout = scan_folder(src, labels=tmp_path / "LOC_val_solution.csv")
    assert layout == "labels" and classes == ["n01", "n02", "n03"]
    assert [i.label for i in items] == [1, 0, 1, 2]


def test_unknown_class_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.jpg").write_bytes(b"")
    (tmp_path / "l.csv").write_text("x.jpg,zebra\n")
    (tmp_path / "classes.txt").write_text("horse\n")
    with pytest.raises(ShardError, match=r"x\.jpg.*zebra"):
        scan_folder(tmp_path / "src", labels=tmp_path / "l.csv", classes=tmp_path / "classes.txt")


def test_refuses_to_overwrite_without_resume(sharded):
    src, outcome, out, report, m = sharded
    with pytest.raises(ShardError, match="--resume"):
        shard(src, out)


def _run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "mimpipe.tools.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("when", ["checking", "writing"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, when):
    src = tmp_path / "src"
    make_image_folder(src, n_good=150, seed=3, size=(320, 240))
    opts = ["--samples-per-shard", "2", "--name", "k", "--seed", "5"]
    subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", "shard", src, tmp_path / "ref", *opts],
                   check=True, capture_output=True)
    out = tmp_path / "out"
    proc = _run_cli("shard", src, out, *opts)
    journal = out / ".mimpipe-partial" / "checked.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (when == "checking" and journal.exists() and journal.stat().st_size > 2000) or \
                (when == "writing" and any(out.glob("k-*.tar"))):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "run finished before it could be interrupted"
    for tar in out.glob("k-*.tar"):   # whatever carries a final name is complete
        assert tar.stat().st_size % 10240 == 0
    with pytest.raises(ManifestError):
        load_manifest(out)
    done = subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", "shard", src, out, *opts, "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref
    for f in ref:
        if f != "report.json":
            assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "ref"))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_resume_with_other_options_is_refused(sharded, tmp_path):
    src, outcome, out, report, m = sharded
    items, classes, _ = scan_folder(src)
    with pytest.raises(ShardError, match="other inputs or options"):
        shard_items(items, classes, out, ShardConfig(name="t", samples_per_shard=4), resume=True,
                    progress=False)


def test_parallel_workers_give_identical_shards(image_folder, sharded, tmp_path):
    src, outcome, out, report, m = sharded
    shard(src, tmp_path / "w2", ShardConfig(name="t", shard_bytes=None, samples_per_shard=3, seed=7,
                                            workers=2))
    for f in sorted(p.name for p in out.iterdir() if p.name != "report.json"):
        assert (out / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12XB")
