"""The score cache (maskserver/score_cache.py): crop geometry, refresh, storage, and the same masks
through the mask server and in the training loop."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimpipe.maskserver.score_cache import (CachedMasks, CacheKey, ScoreCache, due, patch_centres, refresh_phase,
                                            resample)
from mimpipe.maskserver.teacher import Teacher
from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, batch_generator
from mimpipe.train.model import create_model
from mimpipe.train.trainer import TrainConfig, train
from tests.maskserver_helpers import MODEL, kill, start_server

KEY = CacheKey("m", "gpa", None, (), 64, "bicubic", "d", "momentum")


# ---- geometry ----
def test_the_whole_image_resamples_to_the_reference_grid_and_a_flip_mirrors_it():
    ref = torch.randn(2, 3, 8, 8)
    box, W, H = np.array([[0, 0, 96, 96], [0, 0, 50, 70]]), np.array([96, 50]), np.array([96, 70])
    same = resample(ref, patch_centres(box, np.zeros(2, bool), W, H, 8))
    assert torch.allclose(same, ref.flatten(2), atol=1e-6)
    mirrored = resample(ref, patch_centres(box, np.ones(2, bool), W, H, 8))
    assert torch.allclose(mirrored, ref.flip(-1).flatten(2), atol=1e-6)


def test_a_crop_samples_the_reference_at_its_patch_centres():
    """A horizontal ramp (value = reference column) is linear, so bilinear resampling is exact:
    crop column j of the left half at g = G = 8 sits at reference column (j + 0.5) / 2 - 0.5."""
    G = 8
    ref = torch.arange(G, dtype=torch.float32).repeat(G, 1)[None, None]   # [1, 1, G, G], value = column
    got = resample(ref, patch_centres(np.array([[0, 0, 48, 96]]), np.zeros(1, bool), np.array([96]),
                                      np.array([96]), G)).view(G, G)
    want = torch.clamp((torch.arange(G) + 0.5) / 2 - 0.5, min=0)   # the left border clamps
    assert torch.allclose(got, want.repeat(G, 1), atol=1e-5)
    # rows: the crop's full height, so row r of the crop is row r of the reference
    ref_t = ref.transpose(-1, -2).contiguous()
    rows = resample(ref_t, patch_centres(np.array([[0, 0, 48, 96]]), np.zeros(1, bool), np.array([96]),
                                         np.array([96]), G)).view(G, G)
    assert torch.allclose(rows, torch.arange(G, dtype=torch.float32)[:, None].expand(G, G), atol=1e-5)


# ---- refresh ----
def test_refresh_every_k_epochs_is_staggered_over_the_images():
    n, k = 4000, 4
    phase = refresh_phase(0, np.arange(n), k)
    stamp = np.full(n, -1)
    computed = []
    for epoch in range(13):
        d = due(stamp, epoch, k, phase)
        computed.append(int(d.sum()))
        stamp[d] = epoch
        assert (epoch - stamp < k).all()   # no entry older than k epochs
    assert computed[0] == n                # the first epoch computes everything
    assert all(abs(c - n / k) < 0.1 * n for c in computed[k:])   # then about 1/k a epoch, not all at once
    assert due(stamp, 20, 1, refresh_phase(0, np.arange(n), 1)).all()   # k = 1: every epoch
    assert not due(stamp, 99, None, None).any() and due(np.array([-1]), 0, None, None).all()   # frozen


# ---- storage ----
def test_memory_is_bounded_and_a_folder_is_reloaded_only_for_the_same_key(tmp_path):
    with pytest.raises(ValueError, match="--score-cache-dir"):
        ScoreCache(10**7, 12, 14, key=KEY, every=1)
    c = ScoreCache(10, 2, 4, key=KEY, every=None, folder=tmp_path)
    scores = torch.randn(3, 2, 16)
    c.put(np.array([1, 5, 7]), scores, 0, 0, -1)
    c.stamp.flush()
    c.scores.flush()
    again = ScoreCache(10, 2, 4, key=KEY, every=None, folder=tmp_path, reload=True)
    assert again.loaded == 3 and not again.due(np.array([1, 5, 7]), 3).any() and again.due(np.array([2]), 3).all()
    assert torch.equal(again.get(np.array([5])).float(), scores[1:2].view(1, 2, 4, 4).half().float())
    other = ScoreCache(10, 2, 4, key=CacheKey(**{**KEY.__dict__, "data": "other"}), every=None, folder=tmp_path,
                       reload=True)
    assert other.loaded == 0 and other.due(np.array([1, 5, 7]), 0).all()
    not_frozen = ScoreCache(10, 2, 4, key=CacheKey(**{**KEY.__dict__, "data": "other"}), every=1,
                            folder=tmp_path, reload=False)
    assert not_frozen.loaded == 0


@pytest.fixture(scope="module")
def frozen_ckpt(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sd = create_model(MODEL, encoder_only=True).state_dict()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("strategy", ["gpa", "idm", "attmask"])
def test_on_whole_images_cached_masks_are_the_exact_masks(sample_ds, frozen_ckpt, strategy):
    """When the crop is the whole image the resampling is the identity: what is left of the cache
    is float16 storage, so the scores agree to its precision and the masks, drawn with the same
    noise by the same stochastic step, agree (gpa at t = 1: hard masks, all from the scores)."""
    m = load_manifest(sample_ds)
    loader = Loader(m, PlanConfig(batch_size=16, img_size=64), 0, decoder="pil", threads=1)
    try:
        t = Teacher(MODEL, f"frozen:{frozen_ckpt}", strategy=strategy, projector_hidden=None)
        cached = CachedMasks(t, strategy, table=m.table, every=1)
        ids = np.arange(16)
        images = loader.whole_images(ids)
        box = np.stack([0 * m.table["width"][ids], 0 * ids, m.table["width"][ids], m.table["height"][ids]], 1)
        flip = np.zeros(16, bool)
        got, version, _ = cached.scores(ids, box, flip, 0, loader.whole_images)
        want = t.scores(images, strategy)
        assert version == 0 and torch.allclose(got, want, rtol=2e-3, atol=1e-5 * want.abs().max().item())
        exact = t.compute(images, strategy, ratio=0.75, generator=batch_generator(0, 0, 3, 0), progress=1.0)
        out, _, _ = cached.masks(ids, box, flip, 0, ratio=0.75, generator=batch_generator(0, 0, 3, 0), progress=1.0,
                                 head_probs=None, whole_images=loader.whole_images)
        agree = (exact.mask == out.mask).float().mean().item()
        assert agree > 0.97, agree
        assert cached.cache.counts["forwards"] == 16   # the second call found every entry fresh
    finally:
        loader.close()


def test_a_new_run_empties_a_momentum_cache_but_not_a_frozen_one(sample_ds, frozen_ckpt):
    m = load_manifest(sample_ds)
    ids = np.arange(4)
    for source, kept in ((f"frozen:{frozen_ckpt}", True), ("momentum", False)):
        t = Teacher(MODEL, source, strategy="gpa", projector_hidden=None)
        c = CachedMasks(t, "gpa", table=m.table, every=4)
        c.cache.put(ids, torch.zeros(4, 1, 64), 0, 0, 0)
        c.reset()
        assert (not c.cache.due(ids, 1).any()) == kept, source


def test_strategies_without_a_score_are_refused(sample_ds):
    t = Teacher(MODEL, "online", strategy="sbam", projector_hidden=None)
    with pytest.raises(ValueError, match="sbam.*no per-patch score"):
        CachedMasks(t, "sbam", table=load_manifest(sample_ds).table, every=1)


# ---- across processes ----
def rows(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


def test_the_server_and_the_training_loop_share_one_cache(sample_ds, frozen_ckpt, tmp_path):
    """Like for like: with a frozen teacher the mask server's cache and the in-loop one give the
    same masks, so the same losses; each image costs one teacher forward for the whole run; and a
    restarted server reloads its cache folder instead of running the teacher again."""
    source = f"frozen:{frozen_ckpt}"
    common = dict(shards=str(sample_ds), model=MODEL, batch_size=16, epochs=2, threads=1, teacher_source=source,
                  strategy="gpa", mask_quality=False)
    train(TrainConfig(out=str(tmp_path / "inloop"), masks="inloop:gpa", score_cache=1, **common))
    folder, stats = tmp_path / "cache", tmp_path / "stats.json"
    server_args = ["--source", source, "--score-cache", 1, "--score-cache-dir", folder, "--epochs", 2,
                   "--stats-file", stats, "--stats-every", 0.3]   # heartbeat 1 s, as the trainer's
    for launch in ("first", "restarted"):
        endpoint = f"ipc://{tmp_path}/ms-{launch}"
        server = start_server(sample_ds, endpoint, tmp_path / f"{launch}.log", world_size=1, batch_size=16,
                              strategy="gpa", extra=server_args)
        try:
            train(TrainConfig(out=str(tmp_path / launch), masks=endpoint, mask_policy="fail", **common))
            assert server.wait(30) == 0   # the run is done: the server exits
        finally:
            kill(server)
        cache = json.loads(stats.read_text())["score_cache"]
        assert cache["filled"] == 120 and cache["loaded"] == (0 if launch == "first" else 120), cache
        # 2 epochs x 8 batches x 16 = 256 looked up; the teacher ran once per image, or not at all
        assert cache["forwards"] == (120 if launch == "first" else 0) and cache["hits"] == 256, cache
        served, inloop = rows(tmp_path / launch / "metrics.jsonl"), rows(tmp_path / "inloop" / "metrics.jsonl")
        assert [r["loss"] for r in served] == [r["loss"] for r in inloop]
        assert {r["teacher_version"] for r in served} == {0}
        # a frozen teacher has no student step: no staleness on either path (the in-loop cache once
        # reported its stored -1 as step -1, a staleness growing with every iteration)
        assert {r["staleness"] for r in served + inloop} == {None}


@pytest.mark.parametrize("strategy,extra", [("idm", "heads"), ("attmask", None), ("gpa", "gpa_target")])
def test_the_server_core_masks_a_planned_batch_from_the_cache(sample_ds, strategy, extra):
    """The plan-only path: a PlannedBatch (crop boxes, no pixels) becomes MASKS with the strategy's
    extras, stamped with the weights behind the cached scores, not the teacher's newer ones."""
    from mimpipe.maskserver import protocol as P
    from mimpipe.maskserver.server import MaskServer, ServerConfig
    m = load_manifest(sample_ds)
    t = Teacher(MODEL, "momentum", strategy=strategy, projector_hidden=None)
    t.load_state({k: v.clone() for k, v in t._state().items() if k in t.held}, 3, 30)
    loader = Loader(m, PlanConfig(batch_size=16, img_size=64), 0, decoder="pil", threads=1)
    try:
        cached = CachedMasks(t, strategy, table=m.table, every=2)
        srv = MaskServer(ServerConfig(strategy), t, None, "ab" * 16, loader.steps, 0, 1, cached)
        pb = loader.plan.batch(0, 1)
        decoded, whole_images = [], loader.whole_images
        loader.whole_images = lambda ids: decoded.append(len(ids)) or whole_images(ids)
        srv._masks(0, pb, loader)
        assert decoded == [16]   # once, before the teacher's lock, for the entries due
        t.load_state({k: v.clone() for k, v in t._state().items() if k in t.held}, 4, 40)
        fields, arrays = srv._masks(0, pb, loader)   # its entries are fresh: no forward
        msg = P.decode(P.encode(P.MASKS, {**fields, "seq": 0}, arrays))
        assert msg.fields["teacher_version"] == 3 and msg.fields["teacher_step"] == 30
        assert cached.scores(pb.sample_ids, pb.views[0].crop, pb.views[0].flip, 0, None)[1:] == (3, 30)
        assert msg.fields["checksum"] == P.checksum(pb.sample_ids) and cached.cache.counts["forwards"] == 16
        assert decoded == [16]
        assert set(msg.arrays) == {"mask", "len_keep", *([extra] if extra else [])}
    finally:
        loader.close()


def test_cache_flags_without_a_cache_or_a_teacher_are_refused(sample_ds):
    from mimpipe.train.trainer import make_masks
    for kw, why in ((dict(masks="inloop:gpa", score_cache_dir="d"), "without --score-cache K"),
                    (dict(masks="tcp://127.0.0.1:5555", score_cache=2), "set them on the mask server"),
                    (dict(masks="random", score_cache=2), "there is no teacher")):
        with pytest.raises(ValueError, match=why):
            make_masks(TrainConfig(shards=str(sample_ds), model=MODEL, **kw), 0, 1, 64, "ab" * 16, (0, 0),
                       torch.device("cpu"))
