"""Per-epoch mask statistics: the formulas on hand-made masks, and a run's epoch rows."""
from __future__ import annotations

import json
import math

import numpy as np

from mimpipe.train.mask_quality import RATIO_BINS, MaskQuality
from mimpipe.train.trainer import TrainConfig, train


def bin_of(ratio: float) -> int:
    return int(np.histogram([ratio], RATIO_BINS)[0].argmax())


def test_hand_made_masks():
    q = MaskQuality(n_samples=4, num_patches=8)
    same = np.array([[1, 1, 0, 0, 1, 1, 0, 0]] * 4, bool)
    fg = np.array([[1, 0, 1, 0, 0, 0, 0, 0]] * 4, bool)
    q.add(same, np.arange(4), np.array([True, True, True, False]), fg[:3], np.arange(3))
    e0 = q.epoch_end()
    assert e0["mask_recall"] == 0.5 and e0["mask_entropy"] == 0.0 and e0["mask_overlap_prev"] is None
    assert sum(e0["mask_ratio_hist"]) == 3 and e0["mask_ratio_hist"][bin_of(0.5)] == 3
    flipped = ~same
    flipped[0] = same[0]          # image 0 keeps its mask, images 1, 2 get the complement
    q.add(flipped, np.arange(4), np.array([True, True, True, True]))
    e1 = q.epoch_end()
    assert e1["mask_recall"] is None                              # no foreground given
    assert math.isclose(e1["mask_overlap_prev"], 1 / 3)           # IoU 1, 0, 0 over the 3 seen before
    # each position masked in 1 or 3 of the 4 images: H(1/4) = 0.811 bits everywhere
    assert math.isclose(e1["mask_entropy"], -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_a_run_reports_mask_quality_on_each_epochs_last_row(sample_ds, tmp_path):
    """Random masks at 0.75 on the sample set (which knows its foreground): recall about the
    ratio, entropy about H(0.75) = 0.811, overlap with the last epoch about 0.75 / 1.25 = 0.6."""
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path), model="mae_vit_micro_patch8_64", batch_size=16,
                      epochs=2, threads=1))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    ends = [r for r in rows if "mask_entropy" in r]
    assert [r["it"] for r in ends] == [8, 16]
    for r in ends:
        assert abs(r["mask_recall"] - 0.75) < 0.05 and abs(r["mask_entropy"] - 0.811) < 0.02
        assert sum(r["mask_ratio_hist"]) == 120 and r["mask_ratio_hist"][bin_of(0.75)] == 120
    assert ends[0]["mask_overlap_prev"] is None and abs(ends[1]["mask_overlap_prev"] - 0.6) < 0.05


def test_a_batch_of_padding_only_reads_no_foreground(sample_ds):
    """A rank's last batch may hold only padding (valid all False): nothing to read, no crash."""
    from types import SimpleNamespace

    import torch

    from mimpipe.pipeline.loader import Loader
    from mimpipe.pipeline.manifest import load_manifest
    from mimpipe.pipeline.plan import PlanConfig
    from mimpipe.train.mask_quality import foreground
    loader = Loader(load_manifest(sample_ds), PlanConfig(batch_size=4, img_size=64), decoder="pil", threads=1)
    try:
        batch = SimpleNamespace(valid=torch.zeros(4, dtype=torch.bool), sample_ids=torch.arange(4), epoch=0, step=0)
        fg, rows = foreground(loader.reader, loader.plan, batch, 64, 8)
        assert fg.shape == (0, 64) and len(rows) == 0
        q = MaskQuality(len(loader.plan.W), 64)
        q.add(np.ones((4, 64), bool), np.arange(4), np.zeros(4, bool), fg, rows)
        assert q.epoch_end()["mask_recall"] is None
    finally:
        loader.close()
