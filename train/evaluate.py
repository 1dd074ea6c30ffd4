"""`mimpipe eval`: representation quality of an encoder by k-NN and linear probe.

Features are the encoder's mean-pooled, final-normed patch tokens on the eval crop (central 87.5%,
no masking): what MAE's linear probing reads. The labeled samples are split deterministically
(every `--holdout`-th sample id is a test sample), so strategies are compared on equal terms.
Both scores read the features standardized with the train split's statistics, as the
parameter-free BatchNorm in front of MAE's linear probe does: MAE features have a few dimensions
of large variance (colour, brightness) that otherwise decide every cosine similarity.
k-NN follows DINO's weighted vote (cosine similarity, k=20, temperature 0.07).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, ViewConfig
from mimpipe.train.model import create_model, load_encoder_weights, model_config, read_checkpoint


@torch.no_grad()
def features(encoder, manifest, img_size: int, *, batch_size: int = 128, decoder: str = "dali",
             threads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features [N, D], labels [N]) for every sample of the manifest, by id."""
    cfg = PlanConfig(seed=0, batch_size=batch_size, img_size=img_size, views=(ViewConfig(crop="center", flip=0.0),))
    loader = Loader(manifest, cfg, decoder=decoder, threads=threads)
    encoder.eval()
    feats = torch.zeros(len(manifest), encoder.cfg.embed_dim)
    try:
        device = next(encoder.parameters()).device   # the loader decodes onto the GPU where there is one
        for b in loader.epoch(0):
            x = b.images.to(device, non_blocking=True)
            z = encoder.norm(encoder.forward_features_until(x, encoder.cfg.depth))[:, 1:].mean(1).cpu()
            feats[b.sample_ids[b.valid]] = z[b.valid]
    finally:
        loader.close()
    return feats, torch.from_numpy(manifest.table["label"].astype(np.int64))


def split(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = torch.arange(n) % holdout == 0
    return ~test, test


def standardize(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per dimension, with the statistics of the rows `train`."""
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 20, t: float = 0.07) -> float:
    """DINO's weighted k-NN: each of the k nearest (cosine) votes exp(sim / t) for its class."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    sim, idx = (test_x @ train_x.T).topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), classes).scatter_add_(1, train_y[idx], (sim / t).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, epochs: int = 100, lr: float = 0.1,
                          seed: int = 0) -> float:
    """Logistic regression on frozen (standardized) features, full batch, SGD with momentum."""
    g = torch.Generator().manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = (torch.randn(train_x.shape[1], classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(train_x @ w + b, train_y).backward()
        opt.step()
    with torch.no_grad():
        return float(((test_x @ w + b).argmax(1) == test_y).float().mean())


def evaluate(encoder, manifest, *, holdout: int = 5, decoder: str = "dali", threads: int = 2) -> dict:
    x, y = features(encoder, manifest, encoder.cfg.img_size, decoder=decoder, threads=threads)
    keep = y >= 0
    if keep.sum() == 0:
        raise ValueError(f"{manifest.root}: no labeled samples to evaluate on")
    tr, te = split(len(y), holdout)
    tr, te = tr & keep, te & keep
    x = standardize(x, tr)
    return {"knn": knn_accuracy(x[tr], y[tr], x[te], y[te]),
            "linear": linear_probe_accuracy(x[tr], y[tr], x[te], y[te]),
            "train": int(tr.sum()), "test": int(te.sum())}


def load_encoder(model: str, checkpoint: str | None, part: str = "model"):
    """An encoder from a `mimpipe train` checkpoint (`model` = student, `ema` = teacher), an MAE or
    timm file, or, without a checkpoint, freshly initialized (seed 0): the baseline to beat."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = create_model(model, encoder_only=True)
    if checkpoint is None:
        return enc
    load_encoder_weights(enc, read_checkpoint(checkpoint, part))
    return enc


def add_arguments(p) -> None:
    p.add_argument("--shards", default="shards/sample", help="a labeled dataset folder")
    p.add_argument("--model", default="mae_vit_tiny_patch8_64")
    p.add_argument("--checkpoint", help="checkpoint file; none = a freshly initialized encoder")
    p.add_argument("--part", default="model", choices=["model", "ema"], help="student or EMA teacher")
    p.add_argument("--holdout", type=int, default=5, help="every n-th sample id is a test sample")
    p.add_argument("--decoder", default="dali", choices=["dali", "pil"])


def main(args) -> int:
    model_config(args.model)   # fail on a bad name before loading anything
    encoder = load_encoder(args.model, args.checkpoint, args.part)
    r = evaluate(encoder.to("cuda" if torch.cuda.is_available() else "cpu"), load_manifest(args.shards),
                 holdout=args.holdout, decoder=args.decoder)
    print(f"{args.checkpoint or 'random init'}: k-NN {r['knn']:.3f}, linear probe {r['linear']:.3f} "
          f"({r['train']} train / {r['test']} test samples of {Path(args.shards).name})")
    return 0
