"""`mimpipe bench cache`: the measures by hand, and one tiny run of the whole stage."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from mimpipe.tools import bench, bench_cache


def test_average_ranks_share_ties():
    assert bench_cache.average_ranks(torch.tensor([1.0, 2.0, 2.0, 3.0])).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_spearman_hand_computed():
    # ranks a 1 2 3 4 5, b 1 2 3.5 5 3.5 (a tie); centred: a -2 -1 0 1 2, b -2 -1 .5 2 .5
    # -> sum of products 8, sums of squares 10 and 9.5: rho = 8 / sqrt(95)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    assert bench_cache.spearman(a, b).item() == pytest.approx(8 / math.sqrt(95))
    # along the last axis of a batch: a monotone map is 1, a reversal -1, a constant row undefined
    x = torch.tensor([[[0.1, 0.5, 0.3]], [[3.0, 2.0, 1.0]], [[1.0, 1.0, 1.0]]])
    y = torch.tensor([[[1.0, 9.0, 4.0]], [[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]])
    rho = bench_cache.spearman(x, y)
    assert rho.shape == (3, 1)
    assert rho[0, 0].item() == pytest.approx(1.0) and rho[1, 0].item() == pytest.approx(-1.0)
    assert math.isnan(rho[2, 0].item())


def test_iou_and_amortized():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = bench_cache.iou(a, b)
    assert out[0].item() == pytest.approx(1 / 3) and math.isnan(out[1].item())   # nothing masked: no IoU
    assert bench_cache.amortized(100.0, 50.0, 1) == pytest.approx(100 / 3)
    assert bench_cache.amortized(100.0, 50.0, 2) == pytest.approx(50.0)


def test_registered():
    assert bench.STAGES["cache"] == "mimpipe.tools.bench_cache"
    assert bench_cache.__doc__.splitlines()[0]


def test_run_tiny(sample_ds, tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench_cache.add_arguments(p)
    args = p.parse_args(["--shards", str(sample_ds), "--checkpoint", str(tmp_path / "missing.pt"),
                         "--epochs", "1", "--steps", "1", "--batches", "1", "--vit-b-batches", "0",
                         "--served-epochs", "2"])
    r = bench_cache.run(args)
    assert "not found" in capsys.readouterr().err
    assert json.loads(json.dumps(r)) == r
    assert r["setup"]["teachers"] == ["fresh"] and set(r["fidelity"]) == {"fresh"}

    cases = r["fidelity"]["fresh"]
    assert set(cases) == {label for label, _, _ in bench_cache.CASES}
    for label, x in cases.items():
        assert x["images"] == 64   # one batch of 64, all valid (120 images)
        assert -1 <= x["spearman"] <= 1 and 0 <= x["iou"] <= 1
        assert 0 <= x["recall_exact"] <= 1 and 0 <= x["recall_cached"] <= 1
        assert sum(b["images"] for b in x["by_area"].values()) == x["images"]
        assert 0 < x["masked_images"] <= x["images"]
        if not label.startswith("attmask"):   # only attmask leaves images unmasked
            assert x["masked_images"] == x["images"]
    # the scores do not depend on progress: one rank correlation for both gpa rows
    assert cases["gpa t=1"]["spearman"] == cases["gpa t=0"]["spearman"]

    assert "vit_b" not in r["cost"]
    c = r["cost"]["tiny"]
    assert c["student_img_s"] > 0
    for s, x in c["strategies"].items():
        assert x["exact"]["forwards_per_image"] == 1 and x["cached"]["forwards_per_image"] == 0
        for k in bench_cache.KS:
            assert x[f"k={k}"]["forwards_per_image"] == pytest.approx(1 / k)
        for E in bench_cache.FROZEN_EPOCHS:
            assert x[f"E={E}"]["forwards_per_image"] == pytest.approx(1 / E)
        amortized = [x[f"k={k}"]["img_s"] for k in bench_cache.KS] + [x[f"E={E}"]["img_s"]
                                                                     for E in bench_cache.FROZEN_EPOCHS]
        assert all(a < b for a, b in zip(amortized, amortized[1:])) and amortized[-1] < x["cached"]["img_s"]
        assert x["exact"]["vs_exact"] == pytest.approx(1.0)
        assert x["k=2"]["feeds"] == pytest.approx(x["k=2"]["img_s"] / c["student_img_s"])
        # the formula the table prints is the one the cache allocates with
        assert x["bytes_per_image"] == r["storage"]["mae_vit_tiny_patch8_64"][s]["bytes_per_image"]
    assert r["storage"]["mae_vit_base_patch16"]["idm"]["bytes_per_image"] == 12 * 14 * 14 * 2 + 20
    assert r["storage"]["mae_vit_base_patch16"]["gpa"]["imagenet_bytes"] == (14 * 14 * 2 + 20) * 1_281_167

    sv = r["served"]   # real server processes, 2 epochs each: the cached one skips decoding after epoch 0
    assert len(sv["exact"]) == len(sv["cached"]) == 2 and all(v > 0 for v in sv["exact"] + sv["cached"])
    assert sv["ratio_after_first_epoch"] == sv["cached"][1] / sv["exact"][1]

    text = bench_cache.table(r)
    assert "not found" in text and "E=800" in text and "attmask" in text
