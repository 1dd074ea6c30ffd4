"""The loader: DALI (CPU) vs PIL agreement, identical pixels across processes and thread counts,
resume, corrupt and truncated data."""
from __future__ import annotations

import shutil
import struct
from dataclasses import replace
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from mimpipe.pipeline.color import blur_radius, color_augment, gaussian_blur
from mimpipe.pipeline.decode import DecodeError, finish
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, ViewConfig
from mimpipe.pipeline.reader import ChecksumError, ReadError, ShardReader

CFG = PlanConfig(seed=2, batch_size=16, img_size=48, views=(ViewConfig(), ViewConfig(crop="src", color=True)))


@pytest.fixture(scope="module")
def m(sample_ds):
    return load_manifest(sample_ds)


def batches(m, cfg=CFG, epoch=0, start=0, **kw):
    """All batches of an epoch, images cloned (the loader recycles its output tensors)."""
    loader = Loader(m, cfg, **kw)
    try:
        return [replace(b, images=b.images.clone(), view2=b.view2.clone()) for b in loader.epoch(epoch, start)]
    finally:
        loader.close()


def test_dali_and_pil_agree_on_the_same_crops(m):
    for a, b in zip(batches(m, decoder="dali"), batches(m, decoder="pil")):
        assert torch.equal(a.sample_ids, b.sample_ids)
        for x, y in ((a.images, b.images), (a.view2, b.view2)):
            assert x.shape == y.shape == (16, 3, 48, 48)
            mad = (x - y).abs().mean().item()
            assert mad < 0.02, f"epoch 0 step {a.step}: mean |DALI - PIL| = {mad:.4f} (normalized units)"


def test_batches_carry_plan_ids_labels_and_padding(m):
    out = batches(m, epoch=1)
    assert [b.step for b in out] == list(range(8))           # ceil(120 / 16)
    ids = torch.cat([b.sample_ids[b.valid] for b in out])
    assert sorted(ids.tolist()) == list(range(len(m)))
    assert int(sum((~b.valid).sum() for b in out)) == 8 * 16 - 120
    for b in out:
        assert torch.equal(b.labels, torch.from_numpy(m.table["label"][b.sample_ids.numpy()]).long())
        assert b.read_s >= 0 and b.decode_s > 0


def test_resume_from_cursor_gives_the_same_images(m):
    full, rest = batches(m, epoch=3), batches(m, epoch=3, start=5)
    assert [b.step for b in rest] == [5, 6, 7]
    for a, b in zip(full[5:], rest):
        assert torch.equal(a.images, b.images) and torch.equal(a.view2, b.view2)


def test_a_batch_stays_valid_while_the_next_is_used(m):
    loader = Loader(m, CFG, prefetch=2)
    it = loader.epoch(0)
    prev = next(it)
    prev_copy = prev.images.clone()
    for b in it:
        time.sleep(0.15)   # a slow consumer: the producer runs as far ahead as it may
        assert torch.equal(prev.images, prev_copy), f"batch {prev.step} overwritten at {b.step}"
        prev, prev_copy = b, b.images.clone()
    loader.close()


def test_a_held_batch_survives_an_abandoned_epoch_and_no_stale_batch_leaks(m):
    """An epoch left early (break, close) has batches decoded and in flight: the batch the
    consumer holds must stay valid while the next epoch's first batch is taken and used, and that
    batch must be the new epoch's, not a leftover of the old one (real DALI, pipelined)."""
    loader = Loader(m, CFG, prefetch=2)
    it = loader.epoch(0)
    held = next(it)
    held_copy = held.images.clone()
    time.sleep(0.3)   # the producer fills its queue and DALI's
    it.close()
    it = loader.epoch(1)
    first = next(it)
    first_copy = first.images.clone()
    time.sleep(0.3)
    assert torch.equal(held.images, held_copy), "the held batch was overwritten by the next epoch"
    nxt = next(it)
    assert torch.equal(first.images, first_copy)
    want = batches(m, epoch=1)
    assert (first.epoch, first.step, nxt.step) == (1, 0, 1)
    assert torch.equal(first.images, want[0].images) and torch.equal(nxt.images, want[1].images)
    it.close()
    loader.close()


def test_dali_executor_config_reaches_the_pipeline(m):
    loader = Loader(m, CFG, threads=1, dali_prefetch=3, hw_decoder_load=0.4)
    pipe = loader.decoder.pipe
    assert (pipe.exec_pipelined, pipe.exec_async, pipe.exec_dynamic) == (True, True, True)
    assert (pipe.prefetch_queue_depth, pipe.num_threads, pipe.device_id) == (3, 1, None)
    graph = pipe.serialize()
    assert b"hw_decoder_load" in graph and struct.pack("<f", 0.4) in graph
    loader.close()
    with pytest.raises(ValueError, match="dali_prefetch 0: must be at least 1"):
        Loader(m, CFG, dali_prefetch=0)
    with pytest.raises(ValueError, match=r"hw_decoder_load 1.5: must be in \[0, 1\]"):
        Loader(m, CFG, hw_decoder_load=1.5)


def test_dali_prefetch_depth_does_not_change_pixels(m):
    """Inputs fed ahead to DALI's pipelined executor: each output still belongs to its batch."""
    ref = batches(m, epoch=1, dali_prefetch=1)
    for depth in (2, 3):
        for a, b in zip(ref, batches(m, epoch=1, dali_prefetch=depth), strict=True):
            assert a.step == b.step and torch.equal(a.sample_ids, b.sample_ids)
            assert torch.equal(a.images, b.images) and torch.equal(a.view2, b.view2), \
                f"depth {depth} step {a.step}"


def test_an_epoch_shorter_than_the_dali_prefetch(m):
    """A resume at the last step leaves one batch, fewer than DALI's first run needs (it starts
    `depth` runs at once): padding starts it, and nothing of the padding reaches a later epoch."""
    full = batches(m, epoch=3)
    loader = Loader(m, CFG, dali_prefetch=3)
    try:
        last = [b.images.clone() for b in loader.epoch(3, 7)]
        again = [(b.step, b.images.clone()) for b in loader.epoch(3, 6)]
    finally:
        loader.close()
    assert len(last) == 1 and torch.equal(last[0], full[7].images)
    assert [s for s, _ in again] == [6, 7]
    assert all(torch.equal(x, full[s].images) for s, x in again)


def test_thread_count_does_not_change_pixels(m):
    for a, b in zip(batches(m, threads=1), batches(m, threads=2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.view2, b.view2)


CHILD = """
import sys, numpy as np
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from tests.test_loader import CFG
loader = Loader(load_manifest(sys.argv[1]), CFG, threads=1)
b = next(iter(loader.epoch(2, 4)))
np.save(sys.argv[2], np.concatenate([b.images.numpy(), b.view2.numpy()]))
np.save(sys.argv[3], b.sample_ids.numpy())
"""


def test_another_process_decodes_identical_pixels(m, sample_ds, tmp_path):
    """What the mask server relies on: batch (epoch, step) is the same tensor in every process."""
    subprocess.run([sys.executable, "-c", CHILD, str(sample_ds), str(tmp_path / "x.npy"),
                    str(tmp_path / "ids.npy")], check=True, capture_output=True)
    b = batches(m, epoch=2, start=4)[0]
    assert np.array_equal(np.load(tmp_path / "ids.npy"), b.sample_ids.numpy())
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.concatenate([b.images.numpy(), b.view2.numpy()]))


def _overwrite(m, sample_id: int, data: bytes) -> None:
    """Replace the jpg bytes of one sample in its shard, keeping the size (the manifest still
    verifies: damage only the bytes themselves reveal)."""
    assert len(data) <= int(m.table["size"][sample_id])
    with open(m.shard_path(m.table["shard"][sample_id]), "r+b") as f:
        f.seek(int(m.table["offset"][sample_id]))
        f.write(data)


@pytest.fixture
def damaged(sample_ds, tmp_path):
    """A copy of the dataset whose sample 7 no longer starts with a JPEG header."""
    shutil.copytree(sample_ds, tmp_path / "ds")
    m = load_manifest(tmp_path / "ds")
    _overwrite(m, 7, b"\0" * 64)
    return m


@pytest.fixture
def garbage(sample_ds, tmp_path):
    """Sample 7 = FF D8 FF + random bytes, same size: what crashed DALI (SIGSEGV) before the
    reader checked each sample's crc32."""
    shutil.copytree(sample_ds, tmp_path / "ds")
    m = load_manifest(tmp_path / "ds")
    bad = b"\xff\xd8\xff" + np.random.default_rng(0).bytes(int(m.table["size"][7]) - 3)
    _overwrite(m, 7, bad)
    return m, bad


def spied_batches(m, never: bytes, **kw):
    """batches(), with a decoder that fails the test if it is ever handed `never`."""
    loader = Loader(m, CFG, **kw)
    real = loader.decoder.submit

    def submit(encoded, views):
        assert all(e.tobytes() != never for e in encoded), "bytes that fail their checksum reached the decoder"
        return real(encoded, views)
    loader.decoder.submit = submit
    try:
        return [replace(b, images=b.images.clone(), view2=b.view2.clone()) for b in loader.epoch(0)]
    finally:
        loader.close()


def test_corrupt_sample_raises_naming_shard_and_key(damaged):
    with pytest.raises(DecodeError, match=rf"sample-00000\d\.tar: sample '{damaged.key(7)}': jpg bytes "
                                          r"fail their checksum"):
        batches(damaged, epoch=0)


def steps_before_error(m, match, **kw):
    """The steps of epoch 0 delivered before the loader raises, and the step of sample 7."""
    loader = Loader(m, CFG, **kw)
    bad_step = next(pb.step for pb in loader.plan.batches(0) if 7 in pb.sample_ids)
    got = []
    try:
        with pytest.raises(DecodeError, match=match):
            for b in loader.epoch(0):
                got.append(b.step)
    finally:
        loader.close()
    return got, bad_step


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_a_bad_sample_raises_after_every_batch_before_it(damaged, decoder):
    """With batches in flight in the decoder, the error still comes where the bad batch would."""
    got, bad_step = steps_before_error(damaged, "fail their checksum", decoder=decoder)
    assert bad_step > 0 and got == list(range(bad_step))


def test_corrupt_sample_skipped_is_replaced_the_same_way_everywhere(damaged):
    runs = [batches(damaged, epoch=0, on_error="skip", decoder=d) for d in ("dali", "pil", "dali")]
    for run in runs:
        ids = torch.cat([b.sample_ids for b in run]).tolist()
        assert 7 not in ids and ids.count(8) >= 2 and sum(b.replaced for b in run) == 1
    assert all(torch.equal(a.sample_ids, b.sample_ids) for a, b in zip(runs[0], runs[2]))
    assert all(torch.equal(a.images, b.images) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_garbage_bytes_never_reach_the_decoder(garbage, decoder):
    m, bad = garbage
    with pytest.raises(DecodeError, match=rf"sample-00000\d\.tar: sample '{m.key(7)}': jpg bytes fail"):
        spied_batches(m, bad, decoder=decoder)
    run = spied_batches(m, bad, decoder=decoder, on_error="skip")
    ids = torch.cat([b.sample_ids for b in run]).tolist()
    assert 7 not in ids and ids.count(8) >= 2 and sum(b.replaced for b in run) == 1


def test_damage_that_passes_the_checksum_still_takes_the_decode_error_path(damaged):
    """A table whose crc matches undecodable bytes (a sharder bug, not damage): the decoder's
    failure is traced to the sample by PIL and handled the same way."""
    import zlib
    t = damaged.table.copy()
    with open(damaged.shard_path(t["shard"][7]), "rb") as f:
        f.seek(int(t["offset"][7]))
        t["crc"][7] = zlib.crc32(f.read(int(t["size"][7])))
    np.save(damaged.root / "samples.npy", t, allow_pickle=False)
    m = load_manifest(damaged.root)
    got, bad_step = steps_before_error(m, rf"sample '{m.key(7)}': cannot decode")
    assert bad_step > 0 and got == list(range(bad_step))
    # DALI fails with batches in flight in its pipeline: after the replacement every batch is
    # still the one of its step (the PIL run is the reference)
    runs = {d: batches(m, epoch=0, on_error="skip", decoder=d) for d in ("dali", "pil")}
    for run in runs.values():
        assert 7 not in torch.cat([b.sample_ids for b in run]).tolist() and sum(b.replaced for b in run) == 1
    for a, b in zip(runs["dali"], runs["pil"], strict=True):
        assert torch.equal(a.sample_ids, b.sample_ids)
        assert (a.images - b.images).abs().mean() < 0.02 and (a.view2 - b.view2).abs().mean() < 0.02


def test_a_damaged_json_fails_its_checksum_on_read(sample_ds, tmp_path):
    shutil.copytree(sample_ds, tmp_path / "ds")
    m = load_manifest(tmp_path / "ds")
    with open(m.shard_path(m.table["shard"][3]), "r+b") as f:
        f.seek(int(m.table["meta_offset"][3]) + 2)
        f.write(b"#")
    with ShardReader(m) as r:
        assert r.read_one(3).size == m.table["size"][3]                   # the jpg is intact
        with pytest.raises(ChecksumError, match=rf"sample '{m.key(3)}': json bytes fail their checksum"):
            r.read_one(3, meta=True)


@pytest.fixture(scope="module")
def one_big(tmp_path_factory):
    """16 images of 64x48 and one of 300x200 (sample id 0: 'a/big.jpg')."""
    from tests.conftest import jpeg_bytes, picture
    from mimpipe.tools.shard import ShardConfig, scan_folder, shard_items
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    (root / "src" / "a").mkdir(parents=True)
    (root / "src" / "a" / "big.jpg").write_bytes(jpeg_bytes(picture(rng, 300, 200)))
    for i in range(16):
        (root / "src" / "a" / f"s{i:02d}.jpg").write_bytes(jpeg_bytes(picture(rng, 64, 48)))
    items, classes, _ = scan_folder(root / "src")
    shard_items(items, classes, root / "ds", ShardConfig(name="b", shard_bytes=None, samples_per_shard=6),
                progress=False)
    m = load_manifest(root / "ds")
    assert (m.table["width"][0], m.table["height"][0]) == (300, 200)
    return m


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(one_big):
    m = one_big
    cfg = PlanConfig(seed=0, batch_size=8, img_size=32, views=(ViewConfig(),))
    big = bytes(ShardReader(m).read_one(0))

    def run(**kw):
        loader = Loader(m, cfg, decoder="pil", max_pixels=64 * 48, **kw)
        real = loader.decoder.submit

        def submit(encoded, views):
            assert all(e.tobytes() != big for e in encoded), "an image over the cap reached the decoder"
            return real(encoded, views)
        loader.decoder.submit = submit
        try:
            return list(loader.epoch(0))
        finally:
            loader.close()
    with pytest.raises(DecodeError, match=rf"b-00000\d\.tar: sample '{m.key(0)}': 300x200 = 60000 pixels, "
                                          r"more than the decode cap of 3072"):
        run()
    out = run(on_error="skip")
    ids = torch.cat([b.sample_ids for b in out]).tolist()
    assert 0 not in ids and sum(b.replaced for b in out) == 1 and ids.count(1) >= 2
    assert sum(b.replaced for b in batches_of(m, cfg)) == 0          # the default cap (16 MP) lets it in


def batches_of(m, cfg):
    loader = Loader(m, cfg, decoder="pil")
    try:
        return list(loader.epoch(0))
    finally:
        loader.close()


def test_truncated_shard_read_names_shard_and_key(sample_ds, tmp_path):
    shutil.copytree(sample_ds, tmp_path / "ds")
    m = load_manifest(tmp_path / "ds")
    last = int(np.argmax(m.table["offset"] * (m.table["shard"] == 0)))
    with open(m.shard_path(0), "r+b") as f:
        f.truncate(int(m.table["offset"][last]) + 10)
    with ShardReader(load_manifest(tmp_path / "ds", verify=False)) as r:
        with pytest.raises(ReadError, match=rf"sample-000000\.tar: sample '{m.key(last)}': truncated shard"):
            r.read([last])
    (m.shard_path(1)).unlink()
    with ShardReader(load_manifest(tmp_path / "ds", verify=False)) as r:
        with pytest.raises(ReadError, match=r"sample-000001\.tar: cannot open shard"):
            r.read(np.flatnonzero(m.table["shard"] == 1)[:1])


def test_a_truncated_shard_raises_after_every_batch_before_it(sample_ds, tmp_path):
    """The last sample of a shard cut off: reading its batch fails, the batches in flight before
    it still reach the consumer first."""
    shutil.copytree(sample_ds, tmp_path / "ds")
    m = load_manifest(tmp_path / "ds")
    loader = Loader(load_manifest(tmp_path / "ds", verify=False), CFG)
    step_of = {int(i): pb.step for pb in loader.plan.batches(0) for i in pb.sample_ids[pb.valid]}
    t = m.table
    lasts = [int(np.flatnonzero(t["shard"] == s)[np.argmax(t["offset"][t["shard"] == s])])
             for s in range(len(m.shards))]
    victim = max(lasts, key=step_of.get)
    with open(m.shard_path(t["shard"][victim]), "r+b") as f:
        f.truncate(int(t["offset"][victim]) + 10)
    got = []
    try:
        with pytest.raises(ReadError, match=rf"sample '{m.key(victim)}': truncated shard"):
            for b in loader.epoch(0):
                got.append(b.step)
    finally:
        loader.close()
    assert step_of[victim] > 0 and got == list(range(step_of[victim]))


def test_color_augment_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=g)
    p = torch.tensor([[1, 1.3, 0.7, 1.1, 0.05, 0, 0.5], [1, 0.8, 1.2, 0.9, -0.08, 1, 0.5],
                      [1, 1.0, 1.0, 1.0, 0.0, 2, 1.5], [0, 1, 1, 1, 0, 2, 0.3],
                      [1, 1.1, 0.9, 0.0, 0.1, 1, 1.0], [1, 0.6, 1.4, 1.2, -0.1, 2, 2.0]])
    got = color_augment(x, p.numpy())
    for i in range(6):
        b, c, s, h, op, sigma = p[i, 1:].tolist()
        y = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s), h)
        if op == 0:
            y = TF.rgb_to_grayscale(y, 3)
        elif op == 1:
            y = TF.solarize(y, 0.5)
        else:
            r = int(np.ceil(3 * float(p[:, 6].max())))
            y = TF.gaussian_blur(y, [2 * r + 1] * 2, [sigma, sigma])
        assert torch.allclose(got[i], y, atol=2e-5), f"image {i}: max diff {(got[i] - y).abs().max():.2e}"


def test_gaussian_blur_per_image_sigma():
    x = torch.rand(2, 3, 16, 16)
    y = gaussian_blur(x, torch.tensor([0.5, 2.0]), blur_radius(np.array([[1, 1, 1, 1, 0, 2, 0.5], [1, 1, 1, 1, 0, 2, 2.0]])))
    for i, s in enumerate((0.5, 2.0)):
        assert torch.allclose(y[i], TF.gaussian_blur(x[i], [13, 13], [s, s]), atol=1e-5)


def test_color_views_read_nothing_from_the_device():
    """On a GPU a host read of a device value (bool(), float(), .item()) stalls the producer
    until the GPU has caught up; on the meta device every such read raises, so this run shows
    there is none (the blur's kernel size comes from the plan's numbers on the CPU)."""
    p = np.array([[1, 1.3, 0.7, 1.1, 0.05, 2, 1.5], [1, 0.8, 1.2, 0.9, -0.08, 1, 0.5]], np.float32)
    y = finish(torch.empty(2, 3, 16, 16, device="meta"), p)
    assert y.device.type == "meta" and y.shape == (2, 3, 16, 16)
