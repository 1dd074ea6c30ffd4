"""k-NN at ImageNet scale: blocked k-NN (train/evaluate.py knn_predict) on random float16 features.

`mimpipe bench knn` times DINO's weighted k-NN (k 20) of --test x --train features of width --dim
and reports the process's peak resident memory above what the features themselves hold, next to
what the full test x train float32 similarity matrix alone would need."""
from __future__ import annotations

import resource
import time

import numpy as np
import torch

from mimpipe.tools.argtypes import positive_int
from mimpipe.train.evaluate import knn_predict, moments


def add_arguments(p) -> None:
    p.add_argument("--train", type=positive_int, default=100_000, help="train features")
    p.add_argument("--test", type=positive_int, default=10_000, help="test features")
    p.add_argument("--dim", type=positive_int, default=768, help="feature width (ViT-B: 768)")
    p.add_argument("--classes", type=positive_int, default=1000, help="labels drawn uniformly")
    p.add_argument("--block", type=positive_int, default=2048, help="test rows per block")
    p.add_argument("--chunk", type=positive_int, default=16384, help="train rows per chunk")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _features(n: int, dim: int, g: torch.Generator) -> np.ndarray:
    """[n, dim] float16 N(0, 1), drawn 8192 rows at a time: no float32 copy of the whole to raise the peak."""
    out = np.empty((n, dim), np.float16)
    for i in range(0, n, 8192):
        out[i:i + 8192] = torch.randn(min(8192, n - i), dim, generator=g).half().numpy()
    return out


def run(args) -> dict:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = _features(args.train, args.dim, g), _features(args.test, args.dim, g)
    train_y = torch.randint(0, args.classes, (args.train,), generator=g)
    base = _rss_mb()
    t0 = time.perf_counter()
    mean, std = moments(train_x, np.arange(args.train))
    pred = knn_predict(train_x, train_y, test_x, classes=args.classes, mean=mean, std=std,
                       block=args.block, chunk=args.chunk)
    dt = time.perf_counter() - t0
    return {"train": args.train, "test": args.test, "dim": args.dim, "seconds": round(dt, 2),
            "test_per_s": round(args.test / dt, 1), "threads": torch.get_num_threads(),
            "features_mb": round((train_x.nbytes + test_x.nbytes) / 2 ** 20, 1),
            "peak_rss_growth_mb": round(_rss_mb() - base, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "full_matrix_mb": round(args.test * args.train * 4 / 2 ** 20, 1), "predicted": int(len(pred))}


def table(r: dict) -> str:
    return (f"k-NN (k 20) of {r['test']} test x {r['train']} train features, width {r['dim']}, float16, "
            f"{r['threads']} threads\n"
            f"  time                 {r['seconds']} s ({r['test_per_s']} test features/s)\n"
            f"  peak RSS             {r['peak_rss_mb']} MB ({r['peak_rss_growth_mb']} MB above the features' "
            f"{r['features_mb']} MB)\n"
            f"  full sim matrix      {r['full_matrix_mb']} MB (never built)")
