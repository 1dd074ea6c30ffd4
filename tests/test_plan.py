"""The plan: a pure function; per-sample crops independent of batching; exact partitions; resume."""
from __future__ import annotations

import numpy as np
import pytest

from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import (Plan, PlanConfig, ViewConfig, center_boxes, epoch_order, rrc_boxes,
                           src_boxes, uniforms)

TWO_VIEWS = (ViewConfig(), ViewConfig(crop="src", color=True))


@pytest.fixture(scope="module")
def m(sample_ds):
    return load_manifest(sample_ds)


def per_sample(m, cfg: PlanConfig, epoch: int) -> dict:
    """sample id -> (crop, flip, color) of every view, over all ranks and steps, valid slots only."""
    out = {}
    for r in range(cfg.world_size):
        for b in Plan(m, cfg, r).batches(epoch):
            for j in np.flatnonzero(b.valid):
                out[int(b.sample_ids[j])] = tuple(
                    (tuple(v.crop[j]), bool(v.flip[j]), None if v.color is None else tuple(v.color[j]))
                    for v in b.views)
    return out


def test_crops_do_not_depend_on_batch_size_or_world_size(m):
    a = per_sample(m, PlanConfig(seed=3, batch_size=8, img_size=64, views=TWO_VIEWS), epoch=2)
    b = per_sample(m, PlanConfig(seed=3, batch_size=5, world_size=3, img_size=64, views=TWO_VIEWS), epoch=2)
    assert len(a) == len(m) and a == b
    c = per_sample(m, PlanConfig(seed=3, batch_size=8, img_size=64, views=TWO_VIEWS), epoch=3)
    assert sum(a[i] != c[i] for i in a) > 0.9 * len(a)   # new epoch, new crops


@pytest.mark.parametrize("world,batch", [(1, 7), (3, 5), (4, 30), (2, 60)])
def test_ranks_partition_each_epoch_exactly_with_pad(m, world, batch):
    cfg = PlanConfig(seed=1, batch_size=batch, world_size=world, img_size=64)
    plans = [Plan(m, cfg, r) for r in range(world)]
    assert len({p.steps for p in plans}) == 1
    valid_ids, padded = [], 0
    for p in plans:
        for b in p.batches(epoch=0):
            assert len(b.sample_ids) == batch
            valid_ids += b.sample_ids[b.valid].tolist()
            padded += int((~b.valid).sum())
    assert sorted(valid_ids) == list(range(len(m)))
    assert padded == plans[0].steps * world * batch - len(m)


def test_drop_remainder_never_repeats(m):
    cfg = PlanConfig(seed=1, batch_size=7, world_size=3, img_size=64, remainder="drop")
    ids = [i for r in range(3) for b in Plan(m, cfg, r).batches(0) for i in b.sample_ids.tolist()]
    assert len(ids) == len(set(ids)) == (len(m) // 21) * 21
    assert all(b.valid.all() for b in Plan(m, cfg, 0).batches(0))


def test_resume_from_cursor_yields_exactly_the_rest(m):
    cfg = PlanConfig(seed=5, batch_size=9, world_size=2, img_size=64, views=TWO_VIEWS)
    full = list(Plan(m, cfg, 1).batches(epoch=4))
    rest = list(Plan(m, cfg, 1).batches(epoch=4, start_step=5))
    assert [(b.epoch, b.step) for b in rest] == [(4, s) for s in range(5, len(full))]
    for a, b in zip(full[5:], rest):
        assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.valid, b.valid)
        for va, vb in zip(a.views, b.views):
            assert np.array_equal(va.crop, vb.crop) and np.array_equal(va.flip, vb.flip)
            assert np.array_equal(va.color, vb.color)


def test_order_is_a_permutation_that_changes_with_epoch_and_seed():
    a, b, c = epoch_order(0, 0, 1000), epoch_order(0, 1, 1000), epoch_order(1, 0, 1000)
    assert sorted(a) == list(range(1000))
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9
    assert np.array_equal(a, epoch_order(0, 0, 1000))


def test_uniforms_are_uniform_and_counter_based():
    u = uniforms(7, 2, 3, np.arange(20000), 4)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 0.2887) < 0.01
    assert np.array_equal(u[5000:5010], uniforms(7, 2, 3, np.arange(5000, 5010), 4))
    assert np.corrcoef(u[:, 0], u[:, 1])[0, 1] < 0.05


def test_rrc_boxes_follow_torchvision_rules():
    rng = np.random.default_rng(0)
    n = 5000
    # aspect within 2:1, so even the fallback crop covers more than half the image
    W, H = rng.integers(200, 400, n).astype(float), rng.integers(200, 400, n).astype(float)
    u = rng.random((n, 22))
    x, y, w, h = rrc_boxes(u, W, H, (0.2, 1.0), (3 / 4, 4 / 3)).T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= W).all() and (y + h <= H).all()
    area = w * h / (W * H)
    assert area.min() > 0.18 and area.max() <= 1.0
    assert ((w / h > 0.70) & (w / h < 1.42)).all()   # ratio range, up to pixel rounding
    # a 10:1 panorama cannot fit any attempt at scale 0.9+: center crop clamped to ratio 4/3
    x, y, w, h = rrc_boxes(np.full((1, 22), 0.99), np.array([1000.0]), np.array([100.0]),
                           (0.9, 1.0), (3 / 4, 4 / 3))[0]
    assert (w, h, x, y) == (133, 100, 433, 0)


def test_src_and_center_boxes():
    W, H = np.array([300.0, 224.0]), np.array([200.0, 400.0])
    b = src_boxes(np.array([[0.0, 0.999], [0.5, 0.5]]), W, H, 224)
    assert (b[:, 2] == b[:, 3]).all() and (b[:, 0] + b[:, 2] <= W).all() and (b[:, 1] + b[:, 3] <= H).all()
    assert b[0, 2] == 200 - 2 * round(4 * 200 / 224)
    c = center_boxes(None, W, H, 224)
    assert c.tolist() == [[62, 12, 175, 175], [14, 102, 196, 196]]


def test_plan_hash_names_the_config_not_the_rank(m):
    cfg = PlanConfig(seed=0, batch_size=8, img_size=64)
    assert Plan(m, cfg, 0).hash == Plan(m, cfg, 0).hash
    other = [PlanConfig(seed=1, batch_size=8, img_size=64), PlanConfig(seed=0, batch_size=9, img_size=64),
             PlanConfig(seed=0, batch_size=8, img_size=64, views=TWO_VIEWS),
             PlanConfig(seed=0, batch_size=8, img_size=96)]
    assert len({Plan(m, c).hash for c in other} | {Plan(m, cfg).hash}) == 5
    assert Plan(m, PlanConfig(seed=0, batch_size=8, world_size=2, img_size=64), 1).hash == \
        Plan(m, PlanConfig(seed=0, batch_size=8, world_size=2, img_size=64), 0).hash


def test_bad_config_and_cursor_are_clear_errors(m):
    with pytest.raises(ValueError, match="unknown crop 'rcc'; choose from rrc, src, center"):
        ViewConfig(crop="rcc")
    with pytest.raises(ValueError, match="remainder"):
        PlanConfig(remainder="keep")
    p = Plan(m, PlanConfig(batch_size=8, img_size=64), 0)
    with pytest.raises(IndexError, match=r"rank 0: step 99 outside epoch of 15 steps"):
        p.batch(0, 99)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        Plan(m, PlanConfig(batch_size=8, world_size=2, img_size=64), 2).batch(0, 0)


def tv_get_params(u, W, H, scale, ratio):
    """torchvision RandomResizedCrop.get_params, transcribed, with its random draws taken from u."""
    import math
    area = H * W
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for a in range(10):
        target_area = area * (scale[0] + u[a] * (scale[1] - scale[0]))
        aspect = math.exp(lr[0] + u[10 + a] * (lr[1] - lr[0]))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(u[20] * (W - w + 1)), int(u[21] * (H - h + 1)), w, h
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (W - w) // 2, (H - h) // 2, w, h


def test_rrc_boxes_equal_torchvision_get_params_for_the_same_draws():
    rng = np.random.default_rng(1)
    n = 3000
    W, H = rng.integers(20, 700, n), rng.integers(20, 700, n)
    u = rng.random((n, 22))
    u[:100, :10] = 0.999   # force some fallbacks on wide/tall images
    for scale in ((0.2, 1.0), (0.08, 1.0), (0.9, 1.0)):
        ours = rrc_boxes(u, W.astype(float), H.astype(float), scale, (3 / 4, 4 / 3))
        ref = np.array([tv_get_params(u[k], int(W[k]), int(H[k]), scale, (3 / 4, 4 / 3)) for k in range(n)])
        assert np.array_equal(ours, ref), np.flatnonzero((ours != ref).any(1))[:5]


@pytest.mark.parametrize("before, after", [((2, 8), (1, 16)), ((1, 16), (2, 8)), ((2, 8), (3, 5)), ((1, 7), (4, 3))])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(m, before, after):
    """A run interrupted mid-epoch on one layout continues on another (world size, per-rank batch)
    from the samples the epoch consumed: none lost, none repeated; the next epoch is whole."""
    (w0, b0), (w1, b1) = before, after
    old = PlanConfig(seed=5, batch_size=b0, world_size=w0, img_size=64, views=TWO_VIEWS)
    new = PlanConfig(seed=5, batch_size=b1, world_size=w1, img_size=64, views=TWO_VIEWS)
    plans = [Plan(m, old, r) for r in range(w0)]
    done = 3   # global batches of the old layout
    seen = [i for p in plans for s in range(done) for i in p.batch(1, s).sample_ids[p.batch(1, s).valid].tolist()]
    consumed = plans[0].consumed(1, done)
    assert consumed == done * w0 * b0 == len(seen)
    resumed = [Plan(m, new, r) for r in range(w1)]
    assert resumed[0].data_hash == plans[0].data_hash and resumed[0].hash != plans[0].hash
    for p in resumed:
        p.resume_at(1, consumed)
    rest = [i for p in resumed for b in p.batches(1) for i in b.sample_ids[b.valid].tolist()]
    assert sorted(seen + rest) == list(range(len(m)))
    assert per_sample(m, new, 2) == per_sample(m, old, 2)   # the next epoch: whole, the same crops
    # the crops of the resumed samples are the ones the old layout would have given them
    full = per_sample(m, old, 1)
    for p in resumed:
        for b in p.batches(1):
            for j in np.flatnonzero(b.valid):
                assert (tuple(b.views[0].crop[j]), bool(b.views[0].flip[j])) == full[int(b.sample_ids[j])][0][:2]
    assert resumed[0].progress(1, 0) == pytest.approx(1 + consumed / (consumed + resumed[0].steps_in(1) * w1 * b1))
