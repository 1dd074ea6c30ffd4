"""Shards behind a URL: the same bytes, plan and errors as on local disk, over a real HTTP server
with Range support and a real S3-compatible server (moto), both on 127.0.0.1."""
from __future__ import annotations

import argparse
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mimpipe.pipeline.decode import DecodeError
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import ManifestError, load_manifest
from mimpipe.pipeline.plan import Plan, PlanConfig, ViewConfig
from mimpipe.pipeline.reader import ReadError, ShardReader
from mimpipe.pipeline.remote import RemoteStore, as_url, coalesce
from mimpipe.tools.bench_remote import RangeServer
from mimpipe.tools.shard import add_arguments, main as shard_main

CFG = PlanConfig(seed=2, batch_size=16, img_size=48, views=(ViewConfig(), ViewConfig(crop="src", color=True)))
BACKENDS = ["http", "s3"]


@pytest.fixture
def serve(request, tmp_path):
    """serve(folder, backend) -> the URL the folder is served at (a fresh prefix per call)."""
    stack = ExitStack()
    request.addfinalizer(stack.close)

    def serve(folder: Path, backend: str) -> str:
        if backend == "http":
            return stack.enter_context(RangeServer(folder))
        url = f"{request.getfixturevalue('s3_endpoint')}/{uuid.uuid4().hex[:8]}"
        store = RemoteStore(url)   # every file as it is, damaged or not (upload_dataset is tested below)
        for f in sorted(folder.iterdir()):
            store.fs.put_file(str(f), f"{url}/{f.name}")
        return url
    return serve


def copy_of(sample_ds, tmp_path) -> tuple[Path, object]:
    shutil.copytree(sample_ds, tmp_path / "ds")
    return tmp_path / "ds", load_manifest(tmp_path / "ds")


def batches(m, **kw):
    loader = Loader(m, CFG, decoder="pil", **kw)
    try:
        return [replace(b, images=b.images.clone(), view2=b.view2.clone()) for b in loader.epoch(0)]
    finally:
        loader.close()


def test_coalesce_merges_near_ranges_of_one_shard_only():
    spans = [(0, 5000, 100), (1, 0, 10), (0, 0, 100), (0, 200, 50), (0, 10**7, 5)]
    blocks = coalesce(spans, gap=1000, max_block=10**6)
    assert blocks == [(0, 0, 250, [2, 3]), (0, 5000, 5100, [0]), (0, 10**7, 10**7 + 5, [4]), (1, 0, 10, [1])]
    assert coalesce(spans, gap=10**8, max_block=300) == [(0, 0, 250, [2, 3]), (0, 5000, 5100, [0]),
                                                         (0, 10**7, 10**7 + 5, [4]), (1, 0, 10, [1])]
    assert [b[3] for b in coalesce(spans, gap=10**8, max_block=10**8)] == [[2, 3, 0, 4], [1]]


def test_urls_are_recognised_even_after_pathlib():
    assert as_url("s3://b/p") == "s3://b/p" and as_url(Path("s3://b/p")) == "s3://b/p"
    assert as_url(Path("https://h:1/x")) == "https://h:1/x"
    assert as_url("shards/sample") is None and as_url("/data/s3:/x") is None and as_url("c:/x") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_manifest_bytes_and_batches_as_local(sample_ds, serve, backend):
    local = load_manifest(sample_ds)
    url = serve(sample_ds, backend)
    m = load_manifest(Path(url))   # as viz's `type=Path` argument hands it over
    assert m.root == url and m.remote and not local.remote
    assert m.shards == local.shards and m.classes == local.classes and np.array_equal(m.table, local.table)
    assert Plan(m, CFG).batch(0, 1).sample_ids.tolist() == Plan(local, CFG).batch(0, 1).sample_ids.tolist()
    with ShardReader(m) as r, ShardReader(local) as rl:
        ids = np.arange(len(m))
        assert all(np.array_equal(a, b) for a, b in zip(r.read(ids), rl.read(ids)))
        assert bytes(r.read_one(5, meta=True)) == bytes(rl.read_one(5, meta=True))
    got, want = batches(m), batches(local)
    assert len(got) == len(want) and all(torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.images, b.images)
                                         and torch.equal(a.view2, b.view2) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_sample_names_url_and_key_and_is_skipped_alike(sample_ds, tmp_path, serve, backend):
    folder, lm = copy_of(sample_ds, tmp_path)
    with open(lm.shard_path(lm.table["shard"][7]), "r+b") as f:
        f.seek(int(lm.table["offset"][7]))
        f.write(b"\0" * 64)
    url = serve(folder, backend)
    m = load_manifest(url)
    shard = f"{url}/{m.shards[m.table['shard'][7]].file}"
    with pytest.raises(DecodeError, match=rf"{shard}: sample '{m.key(7)}': jpg bytes fail their checksum"):
        batches(m)
    got, want = batches(m, on_error="skip"), batches(lm, on_error="skip")
    assert all(torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.images, b.images) for a, b in zip(got, want))
    assert sum(b.replaced for b in got) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_and_truncated_shards_name_the_url(sample_ds, tmp_path, serve, backend):
    folder, lm = copy_of(sample_ds, tmp_path)
    last = int(np.argmax(lm.table["offset"] * (lm.table["shard"] == 0)))
    with open(lm.shard_path(0), "r+b") as f:
        f.truncate(int(lm.table["offset"][last]) + 10)
    lm.shard_path(1).unlink()
    url = serve(folder, backend)
    with pytest.raises(ManifestError, match=rf"{url}/sample-000000\.tar: shard is \d+ bytes, manifest says"):
        load_manifest(url)
    m = load_manifest(url, verify=False)
    with ShardReader(m) as r:
        with pytest.raises(ReadError, match=rf"{url}/sample-000000\.tar: sample '{m.key(last)}': read failed: "
                                            r".*wanted bytes"):
            r.read([last])
        first = int(np.flatnonzero(m.table["shard"] == 1)[0])
        with pytest.raises(ReadError, match=rf"{url}/sample-000001\.tar: sample '{m.key(first)}': read failed"):
            r.read([first])
    with pytest.raises(ManifestError, match=rf"{url}/nowhere/manifest\.json: no manifest"):
        load_manifest(f"{url}/nowhere")


def test_http_errors_are_retried_with_backoff(http_server):
    m = load_manifest(http_server.url)
    with ShardReader(m) as r:
        http_server.fail_next(3)   # 503s, then the server recovers
        assert r.read_one(4).size == m.table["size"][4]
        http_server.fail_next(100)
        try:
            with pytest.raises(ReadError, match=rf"{http_server.url}/sample-00000\d\.tar: sample '{m.key(4)}': "
                                                r"read failed.*503"):
                r.read_one(4)
        finally:
            http_server.fail_next(0)


def test_a_server_that_ignores_range_is_an_error_not_a_big_read(sample_ds):
    class WholeFile:   # what a server that ignores Range sends: the whole object
        def cat_ranges(self, paths, starts, ends, on_error):
            return [b"x" * 10_000 for _ in paths]
    store = RemoteStore("http://127.0.0.1:1/ds")
    store.fs = WholeFile()
    got = store.read_ranges([("a.tar", 512, 612)])
    assert isinstance(got[0], ValueError) and "http://127.0.0.1:1/ds/a.tar: wanted bytes 512-611 (100 bytes), " \
                                                  "got 10000" in str(got[0])


def test_a_hostile_table_header_is_refused_before_it_is_read(sample_ds, tmp_path):
    """A header claiming 10^12 rows (the file holds 120) is an error, not a 10^12-row allocation."""
    folder, lm = copy_of(sample_ds, tmp_path)
    data = (folder / "samples.npy").read_bytes()
    head = data.index(b"\n") + 1
    new = data[:head].replace(f"({len(lm)},)".encode(), b"(1000000000000,)").replace(b"          \n", b"\n")
    assert len(new) == head - (len(f"({len(lm)},)") + 10 - len("(1000000000000,)"))
    (folder / "samples.npy").write_bytes(new.ljust(head, b" ")[:head - 1] + b"\n" + data[head:])
    with pytest.raises(ManifestError, match=r"samples\.npy: 1000000000000 rows, manifest says 120 samples"):
        load_manifest(folder)


def test_shard_uploads_to_s3_the_same_dataset(image_folder, tmp_path, s3_endpoint):
    src, _ = image_folder
    p = argparse.ArgumentParser()
    add_arguments(p)
    url = f"{s3_endpoint}/up-{uuid.uuid4().hex[:8]}"
    opts = ["--samples-per-shard", "4", "--name", "img"]
    assert shard_main(p.parse_args([str(src), url, "--staging", str(tmp_path / "stage"), *opts])) == 0
    assert shard_main(p.parse_args([str(src), str(tmp_path / "local"), *opts])) == 0
    m, local = load_manifest(url), load_manifest(tmp_path / "local")
    assert np.array_equal(m.table, local.table) and m.shards == local.shards
    with ShardReader(m) as r, ShardReader(local) as rl:
        assert all(np.array_equal(a, b) for a, b in zip(r.read(range(len(m))), rl.read(range(len(m)))))
    with pytest.raises(Exception, match=rf"{url}: already holds a complete dataset"):
        shard_main(p.parse_args([str(src), url, "--staging", str(tmp_path / "stage2"), *opts]))
    # an upload cut short (no manifest yet, a shard missing): the same command with --resume completes it
    store = RemoteStore(url)
    for name in ("manifest.json", m.shards[1].file):
        store.fs.rm_file(f"{url}/{name}")
    store.fs.invalidate_cache()
    with pytest.raises(ManifestError, match=rf"{url}/manifest\.json: no manifest"):
        load_manifest(url)
    assert shard_main(p.parse_args([str(src), url, "--staging", str(tmp_path / "stage"), "--resume", *opts])) == 0
    assert np.array_equal(load_manifest(url).table, local.table)


def test_trainer_and_viz_take_a_url_for_shards(http_server, tmp_path):
    """Every command reaches the shards through load_manifest + Loader: the trainer (--shards as a
    string) and viz (whose positional SHARDS is a pathlib.Path, which drops a slash of the URL)."""
    from mimpipe.tools import viz
    from mimpipe.train.trainer import TrainConfig, train
    train(TrainConfig(shards=http_server.url, out=str(tmp_path / "run"), model="mae_vit_micro_patch8_64",
                      batch_size=8, max_steps=1, threads=1))
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    p = argparse.ArgumentParser()
    viz.add_arguments(p)
    r = viz.run(p.parse_args([http_server.url, "--model", "mae_vit_micro_patch8_64", "--strategies", "random",
                              "--recall-images", "16", "--n", "2", "--out", str(tmp_path / "v.png")]))
    assert r["images"] >= 16 and (tmp_path / "v.png").stat().st_size > 10_000
