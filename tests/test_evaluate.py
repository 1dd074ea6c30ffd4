"""mimpipe eval: k-NN and linear probe on hand-made features, and on a real encoder."""
from __future__ import annotations

import torch

from mimpipe.pipeline.manifest import load_manifest
from mimpipe.train.evaluate import evaluate, knn_accuracy, linear_probe_accuracy, load_encoder, split, standardize


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


def test_evaluate_a_real_encoder(sample_ds):
    r = evaluate(load_encoder("mae_vit_micro_patch8_64", None), load_manifest(sample_ds), holdout=4)
    assert (r["train"], r["test"]) == (90, 30) and 0.0 <= r["knn"] <= 1.0 and 0.0 <= r["linear"] <= 1.0


def test_a_checkpoint_with_loss_heads_evaluates(sample_ds, tmp_path):
    """Training checkpoints also hold the decoder and LUT's projector/predictor: eval reads the encoder."""
    from mimpipe.train.trainer import TrainConfig, train
    train(TrainConfig(shards=str(sample_ds), out=str(tmp_path), model="mae_vit_micro_patch8_64", batch_size=8,
                      max_steps=1, threads=1, lut=1.0, views="src,src+color", head_hidden=64))
    for part in ("model", "ema"):
        enc = load_encoder("mae_vit_micro_patch8_64", str(tmp_path / "checkpoint.pt"), part)
        r = evaluate(enc, load_manifest(sample_ds), holdout=4)
        assert r["test"] == 30
