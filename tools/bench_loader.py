"""loader throughput: our plan + DALI loader vs webdataset + DataLoader + PIL/torchvision.

On ImageNet-sized JPEGs (generated ~512x384 when no SHARDS are given), 224 px output, MAE's
RandomResizedCrop + flip + normalize, the same number of cores on both sides: DALI with N
threads vs a DataLoader with N worker processes. DALI runs as the trainer runs it: its pipelined
executor with --dali-prefetch batches in flight."""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def add_arguments(p) -> None:
    from mimpipe.pipeline.decode import HW_DECODER_LOAD
    from mimpipe.tools.argtypes import positive_int, unit_float
    p.add_argument("shards", nargs="?", type=Path, help="dataset folder (default: generate one)")
    p.add_argument("--n", type=int, default=640, help="images to generate (default 640)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batches", type=int, default=16, help="timed batches per contender and round")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="the contenders take turns this many times; figures are medians over the rounds "
                        "and each ratio the median of the rounds' ratios (the shared machine drifts)")
    p.add_argument("--dali-prefetch", type=positive_int, default=2,
                   help="batches in flight in DALI's pipelined executor (default 2)")
    p.add_argument("--hw-decoder-load", type=unit_float, default=HW_DECODER_LOAD,
                   help=f"share of JPEGs for the A100/H100 hardware decoder (GPU only; "
                        f"default {HW_DECODER_LOAD})")


class PhotoItem:
    """A photo-like JPEG (smooth structure + grain; ~50 KB at 512x384), deterministic from index."""

    def __init__(self, index: int):
        self.index, self.label, self.class_name = index, index % 10, f"c{index % 10}"
        self.relpath = f"photo-{index:06d}.jpg"

    def read(self):
        rng = np.random.default_rng(self.index)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        a = np.asarray(small.resize((512, 384), Image.Resampling.BICUBIC), np.float32)
        a = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), {}

    def __reduce__(self):
        return PhotoItem, (self.index,)


def make_photos(out: Path, n: int) -> Path:
    from mimpipe.tools.shard import ShardConfig, shard_items
    shard_items([PhotoItem(i) for i in range(n)], [f"c{i}" for i in range(10)], out,
                ShardConfig(name="photo", shard_bytes=None, samples_per_shard=128, workers=2),
                progress=False)
    return out


def _timed(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)   # start-up (worker spawn, pipeline build) is not throughput
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def loader_img_s(m, cfg, decoder: str, *, threads: int, batches: int, **loader_kw) -> float:
    """Images/s of our Loader over `batches` batches after the first (epochs chained)."""
    from mimpipe.pipeline.loader import Loader
    loader = Loader(m, cfg, decoder=decoder, threads=threads, **loader_kw)
    try:
        return _timed((b for e in range(10**6) for b in loader.epoch(e)), batches, cfg.batch_size)
    finally:
        loader.close()


def ours(m, args, decoder: str, interpolation: str) -> float:
    from mimpipe.pipeline.plan import PlanConfig
    cfg = PlanConfig(seed=0, batch_size=args.batch_size, img_size=args.img_size,
                     interpolation=interpolation)
    return loader_img_s(m, cfg, decoder, threads=args.threads, batches=args.batches,
                        dali_prefetch=args.dali_prefetch, hw_decoder_load=args.hw_decoder_load)


def baseline(m, args, interpolation: str) -> float:
    import torchvision.transforms as T
    import webdataset as wds
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    tf = T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=mode),
                    T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    urls = [str(m.shard_path(i)) for i in range(len(m.shards))]
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
          .repeat().decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int))
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.threads)
    return _timed(dl, args.batches, args.batch_size)


def run(args) -> dict:
    from mimpipe.pipeline.manifest import load_manifest
    torch.set_num_threads(1)   # the decoders own the cores, not intra-op torch
    with tempfile.TemporaryDirectory(prefix="mimpipe-bench-") as tmp:
        m = load_manifest(args.shards or make_photos(Path(tmp) / "photos", args.n))
        size = float(np.mean(m.table["size"])) / 1e3
        res = {"images": len(m), "mean_kb": round(size, 1), "threads": args.threads,
               "img_size": args.img_size, "batch_size": args.batch_size, "dali_prefetch": args.dali_prefetch,
               "rounds": args.rounds}
        # bicubic is MAE's recipe (the headline numbers); bilinear is torchvision's default
        for interp in ("bicubic", "bilinear"):
            rounds = [{"ours_img_s": ours(m, args, "dali", interp),
                       "pil_fallback_img_s": ours(m, args, "pil", interp),
                       "baseline_img_s": baseline(m, args, interp)} for _ in range(args.rounds)]
            r = {k: round(float(np.median([x[k] for x in rounds])), 1) for k in rounds[0]}
            for key, of in (("ratio", "ours_img_s"), ("pil_ratio", "pil_fallback_img_s")):
                r[key] = round(float(np.median([x[of] / x["baseline_img_s"] for x in rounds])), 3)
            res.update(r) if interp == "bicubic" else res.update(bilinear=r)
    return res


def table(r: dict) -> str:
    rows = [f"loader bench: {r['images']} JPEGs (mean {r['mean_kb']} KB), {r['img_size']} px output, "
            f"batch {r['batch_size']}, {r['threads']} threads / workers, DALI prefetch {r['dali_prefetch']}; "
            f"medians of {r['rounds']} rounds",
            f"{'path':<56}{'images/s':>10}{'vs baseline':>13}"]
    for interp, x in (("bicubic", r), ("bilinear", r["bilinear"])):
        base = x["baseline_img_s"]
        rows += [f"{'webdataset + DataLoader + PIL/torchvision, ' + interp:<56}{base:>10.0f}{1:>12.2f}x",
                 f"{'mimpipe Loader, PIL fallback, ' + interp:<56}{x['pil_fallback_img_s']:>10.0f}"
                 f"{x['pil_ratio']:>12.2f}x",
                 f"{'mimpipe Loader, DALI (CPU here), ' + interp:<56}{x['ours_img_s']:>10.0f}{x['ratio']:>12.2f}x"]
    return "\n".join(rows)
