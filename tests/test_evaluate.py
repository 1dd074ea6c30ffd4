"""mimpipe eval: k-NN and linear probe on hand-made features, and on a real encoder."""
from __future__ import annotations

import torch

from mimpipe.pipeline.manifest import load_manifest
import numpy as np
import pytest

from mimpipe.train.evaluate import (evaluate, knn_accuracy, knn_predict, linear_probe_accuracy, linprobe_accuracy,
                                    load_encoder, moments, split, standardize)
from mimpipe.train.lars import LARS


def test_knn_and_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    y = torch.arange(200) % 4
    x = torch.nn.functional.normalize(centers[y] + 0.05 * torch.randn(200, 16, generator=g), dim=1)
    tr, te = split(200, 5)
    assert knn_accuracy(x[tr], y[tr], x[te], y[te]) == 1.0
    assert linear_probe_accuracy(x[tr], y[tr], x[te], y[te]) == 1.0
    noise = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    assert knn_accuracy(noise[tr], y[tr], noise[te], y[te]) < 0.6


def test_knn_votes_by_weighted_neighbours():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.1, 1.0], [1.0, 0.05]])
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([1, 0]), k=1) == 1.0


def test_standardize_uses_the_train_rows_only():
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [100.0, -5.0]])
    z = standardize(x, torch.tensor([True, True, False]))
    assert torch.allclose(z[:2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / 2 ** 0.5, atol=1e-5)
    assert torch.allclose(z[2], (x[2] - torch.tensor([2.0, 20.0])) / torch.tensor([2 ** 0.5, 200 ** 0.5]), atol=1e-4)


def test_a_dominant_nuisance_dimension_no_longer_decides_knn():
    """Class in small dims, large class-free ones beside: raw cosine k-NN follows the nuisance,
    standardized features find the classes (what MAE's BatchNorm-before-probe is for)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    x = torch.cat([torch.nn.functional.one_hot(y, 4) + 0.3 * torch.randn(400, 4, generator=g),
                   5 * torch.randn(400, 8, generator=g)], dim=1)
    tr, te = split(400, 5)
    z = standardize(x, tr)
    assert knn_accuracy(x[tr], y[tr], x[te], y[te]) < 0.5 < 0.9 < knn_accuracy(z[tr], y[tr], z[te], y[te])


def test_blocked_knn_equals_the_full_similarity_matrix():
    """Blocks of test rows x chunks of train rows with a running top-k: the full matrix's votes."""
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    train_y = torch.randint(0, 5, (300,), generator=g)
    full = knn_predict(train_x, train_y, test_x, k=7, block=10_000, chunk=10_000)
    blocked = knn_predict(train_x.half().numpy(), train_y, test_x.half().numpy(), k=7, block=7, chunk=33)
    assert (full == blocked).float().mean() >= 0.98   # float16 storage may flip a near tie
    assert torch.equal(knn_predict(train_x, train_y, test_x, k=7, block=7, chunk=33), full)


def test_moments_in_chunks_equal_torch():
    x = torch.randn(1000, 6, generator=torch.Generator().manual_seed(1)) * 3 + 2
    rows = np.arange(0, 1000, 3)
    mean, std = moments(x.numpy(), rows, chunk=64)
    assert torch.allclose(mean, x[rows].mean(0), atol=1e-5) and torch.allclose(std, x[rows].std(0), atol=1e-5)


def test_lars_follows_maes_update():
    """MAE util/lars.py: weights get the trust-ratio step, 1-D parameters plain momentum SGD."""
    w, b = torch.nn.Parameter(torch.tensor([[3.0, 4.0]])), torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt = LARS([w, b], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    # ||w|| = 5, ||g|| = 1: step = lr * 0.001 * 5 * g
    assert torch.allclose(w, torch.tensor([[3.0 - 0.5 * 0.005 * 0.6, 4.0 - 0.5 * 0.005 * 0.8]]))
    assert torch.allclose(b, torch.tensor([1.0 - 0.5 * 0.5]))


def test_mae_linprobe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = (centers[y] + torch.randn(400, 16, generator=g)).half().numpy()
    tr, te = split(400, 5)
    for opt, blr in (("lars", 100.0), ("sgd", 1.0)):   # LARS: trust-ratio steps, a larger lr on 150 steps
        acc = linprobe_accuracy(x[tr.numpy()], y[tr], x[te.numpy()], y[te], epochs=30, batch_size=64, blr=blr,
                                warmup_epochs=1, optimizer=opt)
        assert acc >= 0.95, (opt, acc)


def test_evaluate_a_real_encoder(sample_ds):
    r = evaluate(load_encoder("mae_vit_micro_patch8_64", None), load_manifest(sample_ds), holdout=4)
    assert (r["train"], r["test"]) == (90, 30) and 0.0 <= r["knn"] <= 1.0 and 0.0 <= r["linear"] <= 1.0
    assert 0.0 <= r["linprobe"] <= 1.0
    # features on disk (np.memmap) give the same k-NN; the full-batch logistic probe is skipped there
    m = evaluate(load_encoder("mae_vit_micro_patch8_64", None), load_manifest(sample_ds), holdout=4,
                 memmap_over=1000)
    assert m["knn"] == r["knn"] and m["linear"] is None and m["linprobe"] == r["linprobe"]


def test_val_shards_are_the_test_set(sample_ds, tmp_path):
    from tests.conftest import build_sample
    val = build_sample(tmp_path / "val", n=40, seed=1)
    r = evaluate(load_encoder("mae_vit_micro_patch8_64", None), load_manifest(sample_ds), val=load_manifest(val))
    assert (r["train"], r["test"]) == (120, 40)


def test_a_checkpoint_with_loss_heads_evaluates(sample_ds, tmp_path):
    """Training checkpoints also hold the decoder and LUT's projector/predictor: eval reads the encoder."""
    from mimpipe.train.trainer import TrainConfig, train
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path), model="mae_vit_micro_patch8_64", batch_size=8,
                      max_steps=1, threads=1, lut=1.0, views="src,src+color", head_hidden=64))
    for part in ("model", "ema"):
        enc = load_encoder("mae_vit_micro_patch8_64", str(tmp_path / "checkpoint.pt"), part)
        r = evaluate(enc, load_manifest(sample_ds), holdout=4)
        assert r["test"] == 30
    with pytest.raises(ValueError, match="written by --model mae_vit_micro_patch8_64"):
        load_encoder("mae_vit_tiny_patch8_64", str(tmp_path / "checkpoint.pt"))


def test_eval_takes_the_model_from_the_checkpoint(sample_ds, tmp_path):
    """`mimpipe eval --checkpoint RUN/checkpoint.pt` of a micro run, no --model: one result line."""
    import subprocess
    import sys
    from mimpipe.train.trainer import TrainConfig, train
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path), model="mae_vit_micro_patch8_64", batch_size=8,
                      max_steps=1, threads=1))
    r = subprocess.run([sys.executable, "-m", "mimpipe.tools.cli", "eval", "--shards", str(sample_ds),
                        "--checkpoint", str(tmp_path / "checkpoint.pt"), "--batch-size", "32", "--threads", "1",
                        "--probe-epochs", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "k-NN" in r.stdout and "MAE linear probe (lars)" in r.stdout and "(96 train / 24 test" in r.stdout, r.stdout
