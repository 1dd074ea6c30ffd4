"""mimpipe shard: round trip through the real readers, validation, determinism, resume."""
from __future__ import annotations

import io
import json
import os
import re
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


def test_refuses_to_overwrite_a_complete_dataset(sharded):
    src, outcome, out, report, m = sharded
    with pytest.raises(ShardError, match="already holds a complete dataset; choose another folder"):
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


# -- caps, odd file names, OUT inside SRC, labels, bad flags -------------------------------------

def test_fit_size_keeps_aspect_and_never_exceeds_either_cap():
    from mimpipe.tools.imagecheck import fit_size
    assert fit_size(300, 200, 100, None) == (100, 67)            # what --max-side always gave
    assert fit_size(300, 200, None, None) == (300, 200) == fit_size(300, 200, 300, 60_000)
    for w, h, side, px in [(14_700, 9_800, None, 4 * 2**20), (12_000, 12_000, None, 4 * 2**20),
                           (5_000, 3, None, 1_000), (3, 5_000, 100, 1_000), (4_001, 2_999, 1_000, 500_000),
                           (1_000_000, 1, None, 10)]:
        fw, fh = fit_size(w, h, side, px)
        assert fw * fh <= px and (side is None or max(fw, fh) <= side), (w, h, fw, fh)
        assert fw >= 1 and fh >= 1
        if min(fw, fh) > 10:
            assert abs(fw / fh - w / h) < 0.01 * (w / h), (w, h, fw, fh)   # aspect kept
    assert fit_size(14_700, 9_800, None, 4 * 2**20)[0] > 2_400   # fills the cap, not a power-of-2 cut


def test_max_pixels_downscales_counted_as_converted(tmp_path):
    from mimpipe.tools.imagecheck import fit_size
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"big.jpg": (800, 600), "tall.png": (120, 900), "small.jpg": (60, 40)}
    for name, (w, h) in sizes.items():
        a = picture(rng, w, h)
        if name.endswith(".png"):
            Image.fromarray(a).save(src / name)
        else:
            (src / name).write_bytes(jpeg_bytes(a))
    cap = 50_000
    report = shard(src, tmp_path / "out", ShardConfig(name="p", shard_bytes=None, samples_per_shard=2,
                                                      max_pixels=cap))
    m = load_manifest(tmp_path / "out")
    why = {c["path"]: c["why"] for c in report["conversions"]}
    assert report["converted"] == 2 and set(why) == {"big.jpg", "tall.png"}
    assert f"over {cap} pixels" in why["big.jpg"] and "format PNG" in why["tall.png"]
    for i in range(len(m)):
        meta = json.loads(read_member(m, m.table["shard"][i], m.table["meta_offset"][i], m.table["meta_size"][i]))
        data = read_member(m, m.table["shard"][i], m.table["offset"][i], m.table["size"][i])
        got = Image.open(io.BytesIO(data)).size
        assert got == (m.table["width"][i], m.table["height"][i]) == fit_size(*sizes[meta["source"]], None, cap)
        assert got[0] * got[1] <= cap and (meta["width"], meta["height"]) == sizes[meta["source"]]
    assert (src / "small.jpg").read_bytes() in [read_member(m, m.table["shard"][i], m.table["offset"][i],
                                                            m.table["size"][i]) for i in range(len(m))]


def test_default_pixel_cap_catches_a_huge_photo(tmp_path):
    from mimpipe.tools.imagecheck import check_image
    from mimpipe.tools.shard import DEFAULT_MAX_PIXELS
    assert ShardConfig().max_pixels == DEFAULT_MAX_PIXELS == 4 * 1024 * 1024
    raw = jpeg_bytes(np.full((1600, 3200, 3), 128, np.uint8))   # 5.1 MP, flat: small and quick
    c = check_image(raw, max_pixels=DEFAULT_MAX_PIXELS)
    assert c.converted and c.stored[0] * c.stored[1] <= DEFAULT_MAX_PIXELS and c.stored[0] == 2 * c.stored[1]
    assert Image.open(io.BytesIO(c.data)).size == c.stored and (c.width, c.height) == (3200, 1600)


def test_a_non_utf8_file_name_is_skipped_with_its_path_shown(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"ok{i}.jpg").write_bytes(jpeg_bytes(picture(rng, 40, 30)))
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as f:   # Latin-1 name
        f.write(jpeg_bytes(picture(rng, 40, 30)))
    report = shard(src, tmp_path / "out")
    assert report["inputs"] == 4 and report["written"] == 3
    assert report["skipped"] == [{"path": "caf\\xe9.jpg", "reason": "file name is not valid UTF-8; rename it"}]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == report["skipped"]
    assert len(load_manifest(tmp_path / "out")) == 3


def test_out_inside_src_is_not_scanned_so_resume_and_a_second_dataset_work(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, n_good=6, seed=6)
    out = src / "shards"
    items, classes, _ = scan_folder(src, exclude=out)
    shard_items(items, classes, out, CFG, source=str(src), progress=False)
    again, classes2, layout = scan_folder(src, exclude=out)          # what --resume rescans
    assert [i.relpath for i in again] == [i.relpath for i in items] and classes2 == classes
    assert layout == "classes" and "shards" not in classes2
    other, classes3, _ = scan_folder(src, exclude=src / "shards-v2")   # a new OUT: the old one is skipped too
    assert [i.relpath for i in other] == [i.relpath for i in items] and classes3 == classes
    with pytest.raises(ShardError, match="OUT is the source folder"):
        scan_folder(src, exclude=src)


def test_files_missing_from_labels_are_counted(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "val"
    src.mkdir()
    for i in range(4):
        (src / f"v{i}.jpg").write_bytes(jpeg_bytes(picture(rng, 40, 30)))
    (tmp_path / "l.csv").write_text("v0.jpg,a\nv1.jpg,b\nv3.jpg,a\n")
    r = _cli("shard", src, tmp_path / "out", "--labels", tmp_path / "l.csv")
    assert r.returncode == 0, r.stderr
    assert "1 of 4 files have no label" in r.stderr and "v2.jpg" in r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["unlabeled"] == 1 and report["unlabeled_paths"] == ["v2.jpg"]
    assert "1 without a label" in r.stdout
    m = load_manifest(tmp_path / "out")
    assert sorted(m.table["label"].tolist()) == [-1, 0, 0, 1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("args, says", [
    (["--samples-per-shard", "-3"], "argument --samples-per-shard: '-3' is not allowed: expected an integer >= 1"),
    (["--samples-per-shard", "0"], "argument --samples-per-shard: '0' is not allowed: expected an integer >= 1"),
    (["--max-side", "0"], "argument --max-side: '0' is not allowed: expected an integer >= 1"),
    (["--max-pixels", "x"], "argument --max-pixels: 'x' is not allowed: expected an integer >= 1"),
    (["--workers", "0"], "argument --workers: '0' is not allowed"),
    (["--shard-size", "12XB"], "argument --shard-size: bad size '12XB'"),
    (["--name", "../up"], "argument --name: '../up' is not allowed"),
])
def test_bad_shard_flags_are_one_line_and_exit_2(tmp_path, args, says):
    (tmp_path / "src").mkdir()
    r = _cli("shard", tmp_path / "src", tmp_path / "out", *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [r.stderr.splitlines()[-1]]
    assert not (tmp_path / "out").exists()


def test_a_shard_name_must_be_a_plain_file_prefix(image_folder, tmp_path):
    src, _ = image_folder
    for bad in ("../up", "a/b", ".hidden", ""):
        with pytest.raises(ShardError, match=rf"shard name {re.escape(repr(bad))}"):
            shard(src, tmp_path / "out", ShardConfig(name=bad, shard_bytes=None, samples_per_shard=3))
    assert not (tmp_path / "out").exists()


def test_a_source_without_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("shard", tmp_path / "empty", tmp_path / "out")
    assert r.returncode == 2 and "no files to shard" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("not an image")
    r = _cli("shard", tmp_path / "text", tmp_path / "out2")
    assert r.returncode == 2 and "none of the 1 files is an image" in r.stderr, r.stderr
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["skipped"][0]["path"] == "a.txt"
    assert not (tmp_path / "out2" / "manifest.json").exists()
    assert not (tmp_path / "out2" / ".mimpipe-partial").exists()   # a plain rerun starts fresh
