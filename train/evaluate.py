"""`mimpipe eval`: representation quality of an encoder by k-NN and linear probes.

Features are the encoder's mean-pooled, final-normed patch tokens on the eval crop (central 87.5%,
no masking): what MAE's linear probing reads. They are stored in float16 (half the memory of
ImageNet's 1.28M x 768 train features, 2 GB), in a temporary np.memmap once they pass
`--memmap-over` bytes. The test set is `--val-shards`, or without it every `--holdout`-th sample
id of `--shards` (deterministic, so strategies are compared on equal terms).
- k-NN: DINO's weighted vote (cosine, k=20, T=0.07) on features standardized with the train
  split's statistics (the parameter-free BatchNorm in front of MAE's probe: MAE features have a
  few dimensions of large variance that otherwise decide every cosine). Computed in blocks of test
  rows against chunks of train rows with a running top-k, never the full test x train matrix.
- `linear`: logistic regression, full batch on standardized features (small sets only: it holds
  the train features in float32; skipped past --memmap-over).
- `linprobe`: MAE's main_linprobe head, BatchNorm1d(affine=False) + Linear (std 0.01 init), LARS
  (train/lars.py) or SGD, warm-up + cosine (train/optim.py), minibatches from the stored features.
  MAE trains it 90 epochs through RandomResizedCrop; here it reads the fixed centre-crop features
  (`--probe-epochs`, default MAE's 90), a cheaper and slightly lower estimate. Its defaults are
  MAE's ImageNet ones; on a small set (a few hundred steps) use `--probe-optimizer sgd`.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mimpipe.pipeline.loader import Loader
from mimpipe.pipeline.manifest import load_manifest
from mimpipe.pipeline.plan import PlanConfig, ViewConfig
from mimpipe.tools.argtypes import positive_float, positive_int, nonneg_float, int_range
from mimpipe.train.checkpoint import load_checkpoint
from mimpipe.train.lars import LARS
from mimpipe.train.model import MODELS, create_model, load_encoder_weights
from mimpipe.train.optim import Schedule, lr_at

MEMMAP_OVER = 1 << 30   # bytes of float16 features kept in memory; more go to a temporary memmap


def encoder_from_checkpoint(path: str, part: str = "model", model: str | None = None):
    """-> (encoder, model name) of a checkpoint: the model named in a `mimpipe train` checkpoint's
    config (at its --img-size), or `model` for an MAE release / timm file that has none."""
    state = load_checkpoint(path)
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    name = config.get("model") or model
    if name is None:
        raise ValueError(f"{path}: no config naming its model (an MAE or timm file?): pass --model")
    if model is not None and config.get("model") and model != config["model"]:
        raise ValueError(f"{path}: written by --model {config['model']}, but --model {model} was given")
    sd = state[part] if isinstance(state.get(part), dict) else state
    enc = load_encoder(name, None, img_size=config.get("img_size"))
    try:
        load_encoder_weights(enc, sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return enc, name


def load_encoder(model: str, checkpoint: str | None, part: str = "model", *, img_size: int | None = None):
    """An encoder freshly initialized (seed 0: the baseline to beat), or with a checkpoint's weights."""
    if checkpoint is not None:
        return encoder_from_checkpoint(checkpoint, part, model)[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(model, img_size, encoder_only=True)


def pooled(encoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> [B, D]: mean-pooled final-normed patch tokens (MAE's linear-probe input)."""
    return lambda x: encoder.norm(encoder.forward_features_until(x, encoder.cfg.depth))[:, 1:].mean(1)


@torch.no_grad()
def extract(fn, manifest, img_size: int, dim: int, *, batch_size: int = 128, decoder: str = "dali",
            threads: int = 2, device=None, dtype=np.float16, workdir: str | None = None,
            memmap_over: int = MEMMAP_OVER) -> np.ndarray:
    """fn(images [B, 3, S, S] on device) -> [B, dim] for every sample of the manifest on its centre
    crop -> [N, dim] by sample id (dtype; an np.memmap in workdir when over memmap_over bytes)."""
    cfg = PlanConfig(seed=0, batch_size=batch_size, img_size=img_size, views=(ViewConfig(crop="center", flip=0.0),))
    n = len(manifest)
    if n * dim * np.dtype(dtype).itemsize > memmap_over:
        out = np.memmap(Path(workdir or tempfile.gettempdir()) / f"features-{id(manifest)}.f16", dtype=dtype,
                        mode="w+", shape=(n, dim))
    else:
        out = np.zeros((n, dim), dtype)
    gpu = device is not None and torch.device(device).type == "cuda"
    loader = Loader(manifest, cfg, decoder=decoder, threads=threads, device="gpu" if gpu else "cpu")
    try:
        for b in loader.epoch(0):
            z = fn(b.images.to(device or "cpu", non_blocking=True)).float().cpu().numpy()
            ids = b.sample_ids[b.valid].numpy()
            out[ids] = z[b.valid.numpy()]
    finally:
        loader.close()
    return out


def features(encoder, manifest, img_size: int, **kw) -> tuple[np.ndarray, torch.Tensor]:
    """-> (features [N, D] float16, labels [N]) for every sample of the manifest, by id."""
    encoder.eval()
    device = next(encoder.parameters()).device   # the loader decodes onto the GPU where there is one
    x = extract(pooled(encoder), manifest, img_size, encoder.cfg.embed_dim, device=device, **kw)
    return x, torch.from_numpy(manifest.table["label"].astype(np.int64))


def split(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = torch.arange(n) % holdout == 0
    return ~test, test


def moments(x, rows: np.ndarray, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per dimension over x[rows], in float64 chunks (x may be a float16 memmap)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(rows), chunk):
        c = torch.from_numpy(np.asarray(x[rows[i:i + chunk]])).double()
        s, s2 = s + c.sum(0), s2 + (c * c).sum(0)
    n = len(rows)
    mean = s / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)   # unbiased, as torch.std
    return mean.float(), var.clamp(min=0).sqrt().float()


def standardize(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per dimension, with the statistics of the rows `train`."""
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)


def knn_predict(train_x, train_y: torch.Tensor, test_x, *, k: int = 20, t: float = 0.07,
                classes: int | None = None, mean=None, std=None, block: int = 2048,
                chunk: int = 16384, device="cpu") -> torch.Tensor:
    """DINO's weighted k-NN -> predicted class [len(test_x)]: each of the k nearest (cosine) train
    rows votes exp(sim / t). train_x, test_x: [N, D] arrays or tensors (float16 memmaps too), read
    `block` test rows x `chunk` train rows at a time (peak extra memory ~ one block x chunk float32 matrix);
    mean/std, if given, standardize both first."""
    classes = classes or int(train_y.max()) + 1
    k = min(k, len(train_x))

    def prep(a) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(a)).to(device, torch.float32)
        if mean is not None:
            a = (a - mean.to(device)) / (std.to(device) + 1e-6)
        return F.normalize(a, dim=1)

    labels = train_y.to(device)
    preds = []
    for i in range(0, len(test_x), block):
        q = prep(test_x[i:i + block])
        best_s = torch.full((len(q), 0), -math.inf, device=device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for j in range(0, len(train_x), chunk):
            s, i_ = (q @ prep(train_x[j:j + chunk]).T).topk(min(k, len(train_x) - j), dim=1)   # the chunk's own top-k,
            s, i_ = torch.cat([best_s, s], 1), torch.cat([best_i, i_ + j], 1)              # merged with the best so far
            best_s, top = s.topk(min(k, s.shape[1]), dim=1)
            best_i = i_.gather(1, top)
        votes = torch.zeros(len(q), classes, device=device).scatter_add_(1, labels[best_i], (best_s / t).exp())
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 20, t: float = 0.07, **kw) -> float:
    classes = int(max(train_y.max(), test_y.max())) + 1
    return float((knn_predict(train_x, train_y, test_x, k=k, t=t, classes=classes, **kw) == test_y).float().mean())


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


def linprobe_accuracy(train_x, train_y, test_x, test_y, *, epochs: int = 90, batch_size: int = 16384,
                      blr: float = 0.1, warmup_epochs: float = 10.0, optimizer: str = "lars", seed: int = 0,
                      device="cpu") -> float:
    """MAE's main_linprobe on stored features: BatchNorm1d(affine=False, eps=1e-6) + Linear
    (trunc_normal std 0.01, bias 0), weight decay 0, lr = blr x batch / 256 per iteration on MAE's
    warm-up + cosine; LARS (trust 0.001, momentum 0.9) or SGD (momentum 0.9). Minibatch order from
    a torch.Generator(seed). train_x, test_x: [N, D] arrays (float16 memmaps too).
    The defaults are MAE's ImageNet recipe (~7000 steps). LARS scales each weight step to
    0.001 x ||w||, so with a few hundred steps (a small set) its weights barely move: there use
    optimizer='sgd', or a blr in the hundreds."""
    g = torch.Generator().manual_seed(seed)
    classes, D = int(max(train_y.max(), test_y.max())) + 1, train_x.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = torch.nn.Linear(D, classes)
        torch.nn.init.trunc_normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(D, affine=False, eps=1e-6), head).to(device)
    opts = {"lars": lambda p: LARS(p, lr=0.0, weight_decay=0.0),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9, weight_decay=0.0)}
    if optimizer not in opts:
        raise ValueError(f"--probe-optimizer {optimizer!r}: choose from {', '.join(opts)}")
    opt = opts[optimizer](model.parameters())
    batch_size = min(batch_size, len(train_x))
    steps = len(train_x) // batch_size   # MAE drops the last partial batch
    sched = Schedule(lr=blr * batch_size / 256, epochs=epochs, warmup_epochs=warmup_epochs)
    ys = train_y.to(device)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for s in range(steps):
            for grp in opt.param_groups:
                grp["lr"] = lr_at(epoch + s / steps, sched)
            ids = order[s * batch_size:(s + 1) * batch_size].sort().values.numpy()   # sorted: memmap reads
            x = torch.from_numpy(np.asarray(train_x[ids])).to(device, torch.float32)
            loss = F.cross_entropy(model(x), ys[torch.from_numpy(ids).to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_x), 65536):
            x = torch.from_numpy(np.asarray(test_x[i:i + 65536])).to(device, torch.float32)
            correct += int((model(x).argmax(1).cpu() == test_y[i:i + 65536]).sum())
    return correct / len(test_x)


def evaluate(encoder, manifest, *, holdout: int = 5, val=None, decoder: str = "dali", threads: int = 2,
             batch_size: int = 128, memmap_over: int = MEMMAP_OVER, probe: dict | None = None) -> dict:
    """-> {knn, linear (None past memmap_over), linprobe, train, test}: train = the labeled samples of
    `manifest` (all of them with a `val` manifest, else all but every holdout-th), test = `val`'s
    labeled samples or the held-out ones. probe: linprobe_accuracy's keyword arguments."""
    device = next(encoder.parameters()).device
    with tempfile.TemporaryDirectory(prefix="mimpipe-eval-") as work:
        kw = dict(batch_size=batch_size, decoder=decoder, threads=threads, workdir=work, memmap_over=memmap_over)
        x, y = features(encoder, manifest, encoder.cfg.img_size, **kw)
        if val is None:
            tr, te = split(len(y), holdout)
            tx, ty = x, y
        else:
            tx, ty = features(encoder, val, encoder.cfg.img_size, **kw)
            tr, te = torch.ones(len(y), dtype=torch.bool), torch.ones(len(ty), dtype=torch.bool)
        tr, te = (tr & (y >= 0)).numpy().nonzero()[0], (te & (ty >= 0)).numpy().nonzero()[0]
        if len(tr) == 0 or len(te) == 0:
            where = manifest.root if len(tr) == 0 else (val or manifest).root
            raise ValueError(f"{where}: no labeled samples to {'train' if len(tr) == 0 else 'test'} on")
        train_x, test_x = _rows(x, tr, work, "train"), _rows(tx, te, work, "test")
        train_y, test_y = y[tr], ty[te]
        mean, std = moments(train_x, np.arange(len(tr)))
        r = {"knn": knn_accuracy(train_x, train_y, test_x, test_y, mean=mean, std=std, device=device),
             "linear": None, "train": len(tr), "test": len(te)}
        if train_x.size * 4 <= memmap_over:   # the full-batch probe holds the train features in float32
            z = lambda a: (torch.from_numpy(np.asarray(a)).float() - mean) / (std + 1e-6)
            r["linear"] = linear_probe_accuracy(z(train_x), train_y, z(test_x), test_y)
        r["linprobe"] = linprobe_accuracy(train_x, train_y, test_x, test_y, device=device, **(probe or {}))
    return r


def _rows(x: np.ndarray, rows: np.ndarray, work: str, name: str) -> np.ndarray:
    """x[rows] (no copy when rows is all of x), a memmap beside x's when x is one."""
    if len(rows) == len(x):
        return x
    if isinstance(x, np.memmap):
        out = np.memmap(Path(work) / f"{name}.f16", dtype=x.dtype, mode="w+", shape=(len(rows), x.shape[1]))
        for i in range(0, len(rows), 65536):
            out[i:i + 65536] = x[rows[i:i + 65536]]
        return out
    return x[rows]


def add_arguments(p) -> None:
    p.add_argument("--shards", default="shards/sample", help="a labeled dataset folder (the k-NN / probe train set)")
    p.add_argument("--val-shards", default=None, help="the test set (e.g. ImageNet val); default: every "
                   "--holdout-th sample of --shards")
    p.add_argument("--model", default=None, choices=list(MODELS), metavar="NAME",
                   help="our variant; default: the checkpoint's config (needed without --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file; none = a freshly initialized encoder")
    p.add_argument("--part", default="model", choices=["model", "ema"], help="student or EMA teacher")
    p.add_argument("--holdout", type=int_range(2), default=5, help="every n-th sample id is a test sample "
                   "(without --val-shards)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per feature-extraction batch")
    p.add_argument("--threads", type=positive_int, default=2, help="decoder threads")
    p.add_argument("--decoder", default="dali", choices=["dali", "pil"], help="image decoder")
    p.add_argument("--memmap-over", type=positive_int, default=MEMMAP_OVER,
                   help="bytes of float16 features kept in memory; more go to a temporary np.memmap")
    p.add_argument("--probe-epochs", type=positive_int, default=90, help="MAE linear probe epochs (MAE: 90)")
    p.add_argument("--probe-batch-size", type=positive_int, default=16384, help="MAE linear probe batch "
                   "(MAE: 16384), at most the train set")
    p.add_argument("--probe-blr", type=positive_float, default=0.1, help="probe lr = blr x batch / 256 (MAE: 0.1)")
    p.add_argument("--probe-warmup-epochs", type=nonneg_float, default=10.0, help="probe warm-up epochs (MAE: 10)")
    p.add_argument("--probe-optimizer", default="lars", choices=["lars", "sgd"], help="MAE uses LARS "
                   "(tuned for ImageNet's ~7000 steps); sgd (momentum 0.9) for small sets")


def main(args) -> int:
    if args.checkpoint is None and args.model is None:
        raise ValueError("--model is needed for a freshly initialized encoder (no --checkpoint)")
    encoder = load_encoder(args.model, args.checkpoint, args.part)
    val = load_manifest(args.val_shards) if args.val_shards else None
    probe = dict(epochs=args.probe_epochs, batch_size=args.probe_batch_size, blr=args.probe_blr,
                 warmup_epochs=args.probe_warmup_epochs, optimizer=args.probe_optimizer)
    r = evaluate(encoder.to("cuda" if torch.cuda.is_available() else "cpu"), load_manifest(args.shards),
                 holdout=args.holdout, val=val, decoder=args.decoder, threads=args.threads,
                 batch_size=args.batch_size, memmap_over=args.memmap_over, probe=probe)
    linear = "n/a (too large)" if r["linear"] is None else f"{r['linear']:.3f}"
    print(f"{args.checkpoint or 'random init'}: k-NN {r['knn']:.3f}, linear probe {linear}, "
          f"MAE linear probe ({args.probe_optimizer}) {r['linprobe']:.3f} ({r['train']} train / "
          f"{r['test']} test samples of {Path(args.val_shards or args.shards).name})")
    return 0
