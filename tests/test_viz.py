"""mimpipe viz: foreground bookkeeping through crops, recall of random masking = its ratio."""
from __future__ import annotations

import argparse

import numpy as np

from mimpipe.tools import viz
from mimpipe.tools.sample import decode_fg, fg_cells, fg_patches


def test_fg_patches_follow_crop_and_flip():
    fg = np.zeros((32, 32), bool)
    fg[0:8, 0:16] = True            # top-left object, 8 rows x 16 cols
    meta = {"fg": fg_cells(fg)}
    assert np.array_equal(decode_fg(meta), fg.reshape(8, 4, 8, 4).mean((1, 3)) >= 0.25)
    full = fg_patches(meta, (0, 0, 32, 32), False, 16, 4).reshape(4, 4)   # 2x downscale, patch 4
    assert full.tolist() == [[True, True, False, False]] + [[False] * 4] * 3
    flipped = fg_patches(meta, (0, 0, 32, 32), True, 16, 4).reshape(4, 4)
    assert flipped.tolist() == [[False, False, True, True]] + [[False] * 4] * 3
    corner = fg_patches(meta, (0, 0, 16, 16), False, 16, 4).reshape(4, 4)   # crop the top-left
    assert corner[:2].all() and not corner[2:].any()


def test_viz_draws_and_random_recall_is_the_ratio(sample_ds, tmp_path):
    p = argparse.ArgumentParser()
    viz.add_arguments(p)
    args = p.parse_args([str(sample_ds), "--model", "mae_vit_micro_patch8_64", "--strategies",
                         "random,sbam,gpa,idm", "--recall-images", "100", "--n", "3", "--gpa-shots", "10",
                         "--out", str(tmp_path / "v.png")])
    r = viz.run(args)
    assert r["images"] >= 100 and (tmp_path / "v.png").stat().st_size > 10_000
    assert abs(r["recall"]["random"] - 0.75) < 0.05, r["recall"]
    assert set(r["recall"]) == {"random", "sbam", "gpa", "idm"}
    f = r["gpa_few_shot"]
    assert f["shots"] == 10 and 0 <= f["block"] < 2 and 0 <= f["head"] < 2 and 0 < f["shot_recall"] <= 1
    # the pick is scored on the images that did not pick it, and printed as the flags that serve it
    assert f["held_out_images"] == r["images"] and 0 < f["held_out_recall"] <= 1
    assert f"--strategy gpa --block {f['block']} --option head={f['head']}" in viz.table(r)


def test_viz_on_data_without_foreground_and_a_trained_checkpoint(image_folder, sample_ds, tmp_path):
    """User data has no `fg`: pictures, no recall (was KeyError 'fg'); --weights takes a training
    checkpoint and its model from the checkpoint's config (no --model); --attention on image files."""
    from mimpipe.tools.shard import ShardConfig, scan_folder, shard_items
    from mimpipe.train.trainer import TrainConfig, train
    src, _ = image_folder
    items, classes, _ = scan_folder(src)
    shard_items(items, classes, tmp_path / "ds", ShardConfig(shard_bytes=None, samples_per_shard=50), progress=False)
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path / "run"), model="mae_vit_micro_patch8_64",
                      batch_size=8, max_steps=1, threads=1))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    p = argparse.ArgumentParser()
    viz.add_arguments(p)
    r = viz.run(p.parse_args([str(tmp_path / "ds"), "--weights", ckpt, "--strategies", "random,sbam,idm", "--n", "2",
                              "--gpa-shots", "10", "--out", str(tmp_path / "v.png")]))
    assert r["recall"] is None and r["gpa_few_shot"] is None and (tmp_path / "v.png").stat().st_size > 10_000
    assert "no object recall" in viz.table(r)
    files = [str(src / "cat/img.v2.jpg"), str(src / "dog/rgb.png")]
    a = viz.run(p.parse_args(["--weights", ckpt, "--attention", *files, "--out", str(tmp_path / "a.png")]))
    assert a["heads"] == 2 and a["images"] == 2 and (tmp_path / "a.png").stat().st_size > 10_000
